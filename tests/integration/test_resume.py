"""Durable runs, tried as a user would: SIGKILL the driver mid-adaptation of the second task, `dmea resume`.

Three real processes of the `dmea` command on one tiny config (real DeepSpeed,
real MLflow): an uninterrupted run; a run killed with SIGKILL while the second
task's adaptation is between two epoch checkpoints; `dmea resume` of the
killed run. The resumed run must finish with the uninterrupted run's paths
and R matrix, continue the adaptation from its checkpoint (not from step 0),
and leave MLflow with one parent run holding each task exactly once, nothing
RUNNING. Beside them, in process: a finished run resumed records its sequence metrics once, and a
resume records again, into the same MLflow run and model version, each task whose record did not finish.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import yaml

from tests.integration.tiny_run import tiny_config

pytestmark = pytest.mark.integration


def _dmea(*args, cwd: Path) -> subprocess.Popen:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "DS_ACCELERATOR": "cpu", "TOKENIZERS_PARALLELISM": "false"}
    return subprocess.Popen([sys.executable, "-m", "dmea_dist.cli", *args], cwd=cwd, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def _finish(proc: subprocess.Popen, timeout: float = 600) -> str:
    out, _ = proc.communicate(timeout=timeout)
    assert proc.returncode == 0, out[-3000:]
    return out


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("resume")
    config = tiny_config(tmp, method={"adaptation": {"epochs": 3}})  # a checkpoint after each epoch
    config_file = tmp / "config.yaml"
    config_file.write_text(yaml.safe_dump(config.to_dict()))
    # The uninterrupted reference runs beside the run to be killed (one thread each on the 2 cores); it
    # records nothing in MLflow, which then holds the killed run's records only. The killed run starts once
    # the reference has pretrained the backbone both load from the cache: pretraining uses two threads, and
    # two such processes at once on two cores crawl (docs/BENCHMARKS.md, "The test suite").
    reference = _dmea("run", str(config_file), "--in-process", "--quiet", "--run-dir", str(tmp / "reference"),
                      "--set", "tracking.enabled=false", cwd=tmp)

    try:
        cache, deadline = Path(config.output_dir) / "_cache", time.time() + 600
        while reference.poll() is None and time.time() < deadline and not list(cache.glob("backbone-*/model.safetensors")):
            time.sleep(0.05)
        killed = tmp / "killed"
        proc = _dmea("run", str(config_file), "--in-process", "--quiet", "--run-dir", str(killed), cwd=tmp)
        deadline = time.time() + 600
        progress = None
        while time.time() < deadline and proc.poll() is None:
            progress = next(killed.glob("tasks/001-*/adapt_checkpoint/adapt_progress.json"), None)
            if progress is not None:
                break
            time.sleep(0.05)
        assert progress is not None, "the second task's adaptation never wrote a checkpoint"
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        state_at_kill = json.loads((killed / "state.json").read_text())
        out = _finish(_dmea("resume", str(killed), "--in-process", "--quiet", cwd=tmp))
        _finish(reference)
    finally:
        if reference.poll() is None:  # a failure above: leave no run behind
            reference.kill()
            reference.wait()
    return config, tmp / "reference", killed, state_at_kill, out


def _state(run_dir: Path) -> dict:
    return json.loads((run_dir / "state.json").read_text())


def test_killed_then_resumed_equals_uninterrupted(runs):
    config, reference, killed, at_kill, out = runs
    assert (at_kill["task_index"], at_kill["stage"]) == (1, "adapt"), "killed during the second adaptation"
    assert "resuming" in out
    ref, got = _state(reference), _state(killed)
    assert got["status"] == "finished"
    assert [t["path"] for t in got["tasks"]] == [t["path"] for t in ref["tasks"]]
    np.testing.assert_allclose(np.load(killed / "R.npy"), np.load(reference / "R.npy"), atol=1e-6, equal_nan=True)
    stages = [(h["task_index"], h["stage"]) for h in got["history"]]
    assert len(stages) == len(set(stages)) == 6 * len(config.data.tasks)  # every stage once: nothing redone
    adapt = next(h for h in got["history"] if (h["task_index"], h["stage"]) == (1, "adapt"))
    assert adapt["resumed_from"] > 0  # from the epoch checkpoint, not from the start
    assert not list(killed.glob("tasks/*/adapt_checkpoint"))  # superseded by the snapshot, removed
    # the same training, not only the same scores: every adaptation's last losses and every task's modules
    losses = [[h["final_losses"] for h in s["history"] if h["stage"] == "adapt"] for s in (got, ref)]
    for resumed, uninterrupted in zip(*losses, strict=True):
        assert resumed == pytest.approx(uninterrupted, rel=1e-5, abs=1e-6)
    from safetensors.torch import load_file

    files = sorted(p.relative_to(reference) for p in reference.glob("tasks/*/modules/modules.safetensors"))
    assert len(files) == len(config.data.tasks)
    for file in files:
        a, b = load_file(str(killed / file)), load_file(str(reference / file))
        assert a.keys() == b.keys(), file
        for key in a:
            np.testing.assert_allclose(a[key].numpy(), b[key].numpy(), rtol=1e-5, atol=1e-6, err_msg=f"{file}:{key}")


def test_mlflow_holds_one_parent_with_each_task_once(runs):
    import mlflow

    from dmea_dist.tracking import find_task_runs

    config, _, killed, _, _ = runs
    parent = _state(killed)["mlflow_parent_run_id"]
    client = mlflow.MlflowClient(config.tracking.uri)
    assert client.get_run(parent).info.status == "FINISHED"
    tasks = find_task_runs(uri=config.tracking.uri, experiment=config.tracking.experiment, parent_run_id=parent)
    assert [r["task_id"] for r in tasks] == list(config.data.tasks)
    experiment = client.get_experiment_by_name(config.tracking.experiment)
    named = client.search_runs([experiment.experiment_id], filter_string=f"attributes.run_name = '{killed.name}'")
    assert [r.info.run_id for r in named] == [parent]  # the resume reattached, it opened no second parent
    running = client.search_runs([experiment.experiment_id], filter_string="attributes.status = 'RUNNING'")
    assert running == []


def test_resume_refuses_a_changed_config_and_a_folder_that_is_no_run(runs, tmp_path, capsys):
    from dmea_dist.cli import main

    _, _, killed, _, _ = runs
    before = (killed / "state.json").read_bytes()
    assert main(["resume", str(killed), "--in-process", "--set", "train.lr=0.5"]) == 2
    assert "train.lr" in capsys.readouterr().err
    assert main(["resume", str(tmp_path), "--in-process"]) == 2
    assert "not a run directory" in capsys.readouterr().err
    assert (killed / "state.json").read_bytes() == before  # nothing of the run was touched


def test_a_finished_run_resumed_records_each_sequence_metric_once(tmp_path):
    """`dmea resume` of a finished run (to record a task a kill left out, or after a kill between the final
    metrics and the end of the parent run) logged final_average, bwt, ... again: two points in each history."""
    import mlflow

    from dmea_dist.driver import resume_sequence, run_sequence

    config = _tiny_two_tasks(tmp_path)
    first = run_sequence(config, run_dir=tmp_path / "run", progress=False, echo=lambda line: None)
    again = resume_sequence(tmp_path / "run", progress=False, echo=lambda line: None)
    assert again.parent_run_id == first.parent_run_id and again.metrics == first.metrics
    client = mlflow.MlflowClient(config.tracking.uri)
    parent = client.get_run(first.parent_run_id)
    assert {"final_average", "bwt", "forgetting"} <= set(parent.data.metrics)
    points = {key: [(m.step, m.value) for m in client.get_metric_history(parent.info.run_id, key)]
              for key in parent.data.metrics}
    assert points == {key: [(0, value)] for key, value in parent.data.metrics.items()}
    assert parent.info.status == "FINISHED"


def _tiny_two_tasks(tmp_path):
    return tiny_config(tmp_path, data={"tasks": ["synth.hotel.00", "synth.hotel.01"], "synth_sizes": [16, 8, 8]},
                       model={"tiny": {"n_layer": 2, "n_embd": 32, "n_head": 2, "n_positions": 96, "vocab_size": 400,
                                       "pretrain": {"steps": 5, "batch_size": 8, "seq_len": 48,
                                                    "heldout_tasks": 1}}})


def test_a_resume_records_again_a_task_whose_record_did_not_finish(tmp_path, monkeypatch):
    """MLflow failed at the first task's registration (its run ends FAILED) and at the second's end call (left
    RUNNING, then ended KILLED by the resume). The state named both runs, so the resume recorded neither again,
    and `dmea generate RUN_ID` (download_run, which takes FINISHED task runs) found no task of the run."""
    import mlflow

    from dmea_dist.driver import resume_sequence, run_sequence
    from dmea_dist.tracking import TrackingWarning, download_run, find_task_runs

    config = _tiny_two_tasks(tmp_path)
    first_task, second_task = config.data.tasks
    real_version, real_end = mlflow.MlflowClient.create_model_version, mlflow.MlflowClient.set_terminated
    failed = []

    def create_model_version(self, name, *args, tags=None, **kwargs):  # the store fails once, for task 0
        if (tags or {}).get("task_id") == first_task and not failed:
            failed.append("register")
            raise mlflow.exceptions.MlflowException("registry unavailable")
        return real_version(self, name, *args, tags=tags, **kwargs)

    def set_terminated(self, run_id, status=None, *args, **kwargs):  # and once at task 1's end call
        if self.get_run(run_id).data.tags.get("dmea.task_id") == second_task and "end" not in failed:
            failed.append("end")
            raise mlflow.exceptions.MlflowException("connection reset")
        return real_end(self, run_id, status, *args, **kwargs)

    monkeypatch.setattr(mlflow.MlflowClient, "create_model_version", create_model_version)
    monkeypatch.setattr(mlflow.MlflowClient, "set_terminated", set_terminated)
    with pytest.warns(TrackingWarning):
        first = run_sequence(config, run_dir=tmp_path / "run", progress=False, echo=lambda line: None)
    assert failed == ["register", "end"]
    uri, experiment, parent = config.tracking.uri, config.tracking.experiment, first.parent_run_id
    assert find_task_runs(uri=uri, experiment=experiment, parent_run_id=parent) == []

    resume_sequence(tmp_path / "run", progress=False, echo=lambda line: None)
    found = find_task_runs(uri=uri, experiment=experiment, parent_run_id=parent)
    assert [r["task_id"] for r in found] == [first_task, second_task]
    assert [t["mlflow_run_id"] for t in _state(tmp_path / "run")["tasks"]] == [r["run_id"] for r in found]
    folder, _ = download_run(uri=uri, run_id=parent, dst=tmp_path / "served")
    assert sorted(p.name for p in (folder / "tasks").iterdir()) == [f"000-{first_task}", f"001-{second_task}"]
    client = mlflow.MlflowClient(uri)
    experiment_id = client.get_experiment_by_name(experiment).experiment_id
    assert client.search_runs([experiment_id], filter_string="attributes.status = 'RUNNING'") == []
    # recorded again into the runs the first attempts left, not beside them: one run and one version per task
    task_runs = client.search_runs([experiment_id], filter_string=f"tags.`mlflow.parentRunId` = '{parent}'")
    assert sorted(r.info.run_id for r in task_runs) == sorted(r["run_id"] for r in found)
    versions = client.search_model_versions(f"name = '{found[0]['model_version'].split('/')[0]}'")
    assert sorted(v.run_id for v in versions) == sorted(r["run_id"] for r in found)


def test_a_resume_keeps_the_version_a_driver_killed_before_ending_a_task_run_registered(tmp_path, monkeypatch):
    """The driver died after registering the second task's model version, before setting its alias and ending
    its run: the resume recorded the task in a new run and registered a second version beside the one of the
    killed run. It now records into that run again and keeps its version, aliased, served by its alias."""
    import mlflow

    from dmea_dist.driver import resume_sequence, run_sequence
    from dmea_dist.tracking import download_registered_model

    class Killed(BaseException):  # as SIGKILL: no guard of the tracker catches it
        pass

    config = _tiny_two_tasks(tmp_path)
    real_alias = mlflow.MlflowClient.set_registered_model_alias

    def set_registered_model_alias(self, name, alias, version):
        if alias == "synth-hotel-01":
            raise Killed
        return real_alias(self, name, alias, version)

    monkeypatch.setattr(mlflow.MlflowClient, "set_registered_model_alias", set_registered_model_alias)
    with pytest.raises(Killed):
        run_sequence(config, run_dir=tmp_path / "run", progress=False, echo=lambda line: None)
    monkeypatch.setattr(mlflow.MlflowClient, "set_registered_model_alias", real_alias)
    client = mlflow.MlflowClient(config.tracking.uri)
    [name] = [m.name for m in client.search_registered_models()]
    stale = {v.tags["task_id"]: v for v in client.search_model_versions(f"name = '{name}'")}

    resume_sequence(tmp_path / "run", progress=False, echo=lambda line: None)
    versions = client.search_model_versions(f"name = '{name}'")
    assert sorted(v.version for v in versions) == sorted(v.version for v in stale.values())
    task_runs = [t["mlflow_run_id"] for t in _state(tmp_path / "run")["tasks"]]
    assert [stale[task].run_id for task in config.data.tasks] == task_runs
    assert {client.get_run(run_id).info.status for run_id in task_runs} == {"FINISHED"}
    assert client.get_registered_model(name).aliases == {"synth-hotel-00": 1, "synth-hotel-01": 2}
    _, task = download_registered_model(uri=config.tracking.uri, model_uri=f"models:/{name}@synth-hotel-01",
                                        dst=tmp_path / "served")
    assert task == "synth.hotel.01"
