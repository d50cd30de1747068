"""Using a run's tasks: `dmea generate` from a run directory, a run id and the registry, several tasks in one
batch; the registered pyfunc model in Python and behind a real `mlflow models serve` on localhost.

One module-scoped tiny run (3 generated tasks, tracked in a local MLflow
database) backs every test.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from dmea_dist.cli import main
from dmea_dist.data.registry import load_task
from dmea_dist.driver import run_sequence
from dmea_dist.tracking import registered_model_name, task_alias

from .tiny_run import tiny_config

pytestmark = pytest.mark.integration

VENV_BIN = Path(sys.executable).parent


@pytest.fixture(scope="module")
def tracked_run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("serving")
    config = tiny_config(tmp)
    result = run_sequence(config, run_dir=tmp / "run", progress=False, echo=lambda line: None)
    name = registered_model_name(config.name, config.method.name, result.run_dir.name)
    return config, result, name, tmp


@pytest.fixture(scope="module")
def inputs(tracked_run):
    """100 inputs, the three tasks interleaved, as a JSONL file of {context, question, task}."""
    config, _, _, tmp = tracked_run
    per_task = []
    for task in config.data.tasks:
        data = load_task(task, data_root=None, synth_seed=config.data.synth_seed, synth_sizes=config.data.synth_sizes)
        rows = [r for split in ("test", "validation", "train") for r in data[split].to_list()
                if len(r["context"]) < 120]  # prompts well inside this tiny model's max_length
        per_task.append([{"context": r["context"], "question": r["question"], "task": task} for r in rows])
    mixed = [rows[i] for i in range(40) for rows in per_task if i < len(rows)][:100]
    assert len(mixed) == 100 and len({r["task"] for r in mixed}) == 3
    file = tmp / "inputs.jsonl"
    file.write_text("".join(json.dumps(r) + "\n" for r in mixed))
    return file, mixed


def _generate(args: list[str], out: Path) -> list[dict]:
    # 16 new tokens fit next to the widest prompt of any batch (n_positions 96, max_length 80), so an answer
    # does not depend on the batch it is in: this tiny, briefly trained model rarely says eos
    assert main(["generate", *args, "--max-new-tokens", "16", "--output", str(out)]) == 0
    return [json.loads(line) for line in out.read_text().splitlines()]


def test_generate_100_inputs_of_3_tasks_from_run_dir_run_id_and_registry_alike(tracked_run, inputs, tmp_path):
    config, result, name, _ = tracked_run
    file, rows = inputs
    uri = config.tracking.uri
    from_dir = _generate([str(result.run_dir), "--input", str(file)], tmp_path / "dir.jsonl")
    from_run = _generate([result.parent_run_id, "--input", str(file), "--tracking-uri", uri], tmp_path / "run.jsonl")
    alias = task_alias(config.data.tasks[0])
    from_registry = _generate([f"models:/{name}@{alias}", "--input", str(file), "--tracking-uri", uri],
                              tmp_path / "registry.jsonl")
    assert [(r["context"], r["task"]) for r in from_dir] == [(r["context"], r["task"]) for r in rows]
    answers = [r["answer"] for r in from_dir]
    assert answers == [r["answer"] for r in from_run] == [r["answer"] for r in from_registry]
    assert sum(bool(a.strip()) for a in answers) > 50, "the tasks answer (not empty strings)"
    # a batch of three tasks answers each row as a batch of its own task does
    task = config.data.tasks[1]
    own = _generate([str(result.run_dir), task, *[r["context"] for r in rows if r["task"] == task],
                     "--format", "jsonl"], tmp_path / "own.jsonl")
    assert [r["answer"] for r in own] == [r["answer"] for r in from_dir if r["task"] == task]


def test_load_task_model_in_one_call(tracked_run, inputs):
    import dmea_dist

    config, result, name, _ = tracked_run
    _, rows = inputs
    task = config.data.tasks[2]
    served = dmea_dist.load_task_model(f"models:/{name}@{task}", tracking_uri=config.tracking.uri)  # task id as alias
    assert served.tasks == [task] and served.task == task
    mine = [r for r in rows if r["task"] == task][:5]
    from_dir = dmea_dist.load_task_model(result.run_dir, task)
    assert served.generate([r["context"] for r in mine]) == from_dir.generate(mine)
    with pytest.raises(dmea_dist.DmeaError, match="is not loaded"):
        served.generate([{"context": "x", "task": config.data.tasks[0]}])


def test_registry_versions_have_aliases_and_tags(tracked_run):
    from mlflow import MlflowClient

    config, result, name, _ = tracked_run
    client = MlflowClient(config.tracking.uri, registry_uri=config.tracking.uri)
    model = client.get_registered_model(name)
    assert set(model.aliases) == {task_alias(t) for t in config.data.tasks}
    assert model.tags["dmea.method"] == "dmea" and model.tags["dmea.run_dir"] == str(result.run_dir)
    for index, task in enumerate(config.data.tasks):
        version = client.get_model_version_by_alias(name, task_alias(task))
        assert version.tags["dmea.task_id"] == task and version.tags["task_index"] == str(index)
        assert json.loads(version.tags["dmea.path"]) == json.loads((result.run_dir / "state.json").read_text())[
            "tasks"][index]["path"]
        assert version.tags["dmea.parent_run_id"] == result.parent_run_id


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _post(port: int, body: dict) -> dict:
    request = urllib.request.Request(f"http://127.0.0.1:{port}/invocations", data=json.dumps(body).encode(),
                                     headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=60) as response:
        return json.loads(response.read())


def test_pyfunc_model_loads_in_python_and_serves_what_dmea_generate_says(tracked_run, inputs, tmp_path):
    import mlflow

    config, _, name, _ = tracked_run
    _, rows = inputs
    task = config.data.tasks[0]
    model_uri = f"models:/{name}@{task_alias(task)}"
    contexts = [r["context"] for r in rows if r["task"] == task][:4]
    expected = [r["answer"] for r in _generate([model_uri, *contexts, "--tracking-uri", config.tracking.uri,
                                                "--format", "jsonl"], tmp_path / "cli.jsonl")]
    mlflow.set_tracking_uri(config.tracking.uri)
    try:
        loaded = mlflow.pyfunc.load_model(model_uri)
    finally:
        mlflow.set_tracking_uri(None)
    assert loaded.predict([{"context": c} for c in contexts], params={"max_new_tokens": 16}) == expected

    port = _free_port()
    env = {**os.environ, "PATH": f"{VENV_BIN}{os.pathsep}{os.environ.get('PATH', '')}",
           "MLFLOW_TRACKING_URI": config.tracking.uri, "OMP_NUM_THREADS": "1"}
    server = subprocess.Popen([str(VENV_BIN / "mlflow"), "models", "serve", "-m", model_uri, "--env-manager",
                               "local", "-h", "127.0.0.1", "-p", str(port), "-w", "1"], env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.monotonic() + 180
        while True:
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{port}/ping", timeout=2)
                break
            except OSError:
                assert server.poll() is None, server.stdout.read().decode()[-3000:]
                assert time.monotonic() < deadline, "mlflow models serve did not answer /ping in 180 s"
                time.sleep(1)
        answer = _post(port, {"dataframe_records": [{"context": c} for c in contexts],
                              "params": {"max_new_tokens": 16}})
        assert answer == {"predictions": expected}
        shorter = _post(port, {"inputs": [{"context": contexts[0]}], "params": {"max_new_tokens": 2}})
        assert len(shorter["predictions"][0].split()) <= 3
    finally:
        os.killpg(server.pid, signal.SIGTERM)  # mlflow and the uvicorn it starts
        server.wait(timeout=30)
