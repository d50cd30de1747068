"""Tracking against a real MLflow (sqlite in tmp_path): runs, params, series, artifacts, registry.

Each test chdirs into tmp_path, so the default `sqlite:///mlflow.db` and its
artifacts land there, never in the repository.
"""

from __future__ import annotations

import json
import math
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import yaml

from dmea_dist.tracking import (
    MAX_KEY_LENGTH,
    MAX_PARAM_LENGTH,
    PARENT_TAG,
    Tracker,
    TrackingError,
    TrackingWarning,
    download_task_modules,
    find_task_runs,
    flatten,
    mlflow_key,
)

pytestmark = pytest.mark.integration

LONG_KEY = "k" * 300
CONFIG = {
    "name": "t",
    "data": {"tasks": ["a", "b"], "synth_sizes": (8, 4)},
    "train": {"lr": 1e-3, "batch_size": 4, "max_steps": None},
    "deepspeed": {},
    "notes": "x" * 7000,  # longer than MLflow's 6000-character param limit
    LONG_KEY: 1,
}


def _client(uri: str):
    from mlflow import MlflowClient

    return MlflowClient(tracking_uri=uri, registry_uri=uri)


def _write_modules(folder: Path, seed: int) -> Path:
    (folder / "layer0").mkdir(parents=True)
    (folder / "layer0" / "module.bin").write_bytes(bytes(range(seed, seed + 200)))
    (folder / "path.json").write_text(json.dumps({"path": [seed, 0, 1]}))
    return folder


def _record(tracker: Tracker, tmp_path: Path, index: int, task_id: str) -> str:
    report = tmp_path / f"report{index}.txt"
    report.write_text(f"report of {task_id}\n")
    samples = tmp_path / f"samples{index}"
    samples.mkdir()
    (samples / "pseudo.jsonl").write_text('{"answer": "x"}\n' * (index + 1))
    run_id = tracker.record_task(
        task_index=index,
        task_id=task_id,
        params={
            "path": [index, 0, 1],
            "candidate_scores": {"c0": 1.5, "c1": 2.0},
            "selected": [],
            "seed": 3,
        },
        metrics={"val_loss": 1.0 + index, "rouge_l": float("nan")},
        series={"eta": [3.0, 2.0, 1.5 + index], "loss": [2.0, 1.0]},
        tags={"stage": "done"},
        artifacts={"reports": report, "pseudo_samples": samples},
        model_dir=_write_modules(tmp_path / f"modules{index}", seed=index),
        registered_model="dmea-test",
    )
    assert run_id is not None
    return run_id


def test_sequence_with_nested_task_runs(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with warnings.catch_warnings():
        warnings.simplefilter("error", TrackingWarning)  # any tracking failure fails this test
        tracker = Tracker(experiment="exp-a")
        parent = tracker.start_sequence(
            run_name="seq", config=CONFIG, tasks=["a", "b"], tags={"who": "test"}
        )
        run_ids = [_record(tracker, tmp_path, 0, "a"), _record(tracker, tmp_path, 1, "b")]
        tracker.log_sequence_metrics({"A_T": 0.5, "bwt": -0.1}, step=2)
        tracker.finish_sequence()
    uri = "sqlite:///mlflow.db"  # the readers resolve it from the current directory, like Tracker
    assert (tmp_path / "mlflow.db").is_file() and (tmp_path / "mlruns" / "exp-a").is_dir()
    client = _client(f"sqlite:///{tmp_path}/mlflow.db")
    experiment = client.get_experiment_by_name("exp-a")
    assert Path(experiment.artifact_location) == tmp_path / "mlruns" / "exp-a"

    run = client.get_run(parent)
    assert run.info.status == "FINISHED" and run.data.tags["who"] == "test"
    assert run.data.params["train.lr"] == "0.001" and run.data.params["train.max_steps"] == "None"
    assert json.loads(run.data.params["data.synth_sizes"]) == [8, 4]
    assert run.data.params["deepspeed"] == "{}"
    assert json.loads(run.data.params["sequence.tasks"]) == ["a", "b"]
    assert len(run.data.params["notes"]) == MAX_PARAM_LENGTH
    (long_key,) = [k for k in run.data.params if k.startswith("kkk")]
    assert len(long_key) == MAX_KEY_LENGTH
    assert run.data.metrics == {"A_T": 0.5, "bwt": -0.1}
    config_file = client.download_artifacts(parent, "config.yaml", str(tmp_path))
    assert yaml.safe_load(Path(config_file).read_text()) == json.loads(json.dumps(CONFIG))

    nested = client.search_runs(
        [experiment.experiment_id], filter_string=f"tags.`{PARENT_TAG}` = '{parent}'"
    )
    assert sorted(r.info.run_id for r in nested) == sorted(run_ids)
    for index, task_id in enumerate(["a", "b"]):
        task_run = client.get_run(run_ids[index])
        assert task_run.info.status == "FINISHED" and task_run.info.run_name == task_id
        assert (
            task_run.data.tags["dmea.task_id"] == task_id and task_run.data.tags["stage"] == "done"
        )
        assert json.loads(task_run.data.params["path"]) == [index, 0, 1]
        assert json.loads(task_run.data.params["candidate_scores"]) == {"c0": 1.5, "c1": 2.0}
        assert task_run.data.metrics["val_loss"] == 1.0 + index and math.isnan(
            task_run.data.metrics["rouge_l"]
        )
        history = client.get_metric_history(run_ids[index], "eta")
        assert [(m.step, m.value) for m in sorted(history, key=lambda m: m.step)] == [
            (0, 3.0),
            (1, 2.0),
            (2, 1.5 + index),
        ]
        # artifacts come back byte-identical, under their sub-paths
        got = Path(client.download_artifacts(run_ids[index], "", str(tmp_path / f"dl{index}")))
        assert (got / "reports" / f"report{index}.txt").read_bytes() == (
            tmp_path / f"report{index}.txt"
        ).read_bytes()
        assert (got / "pseudo_samples" / "pseudo.jsonl").read_bytes() == (
            tmp_path / f"samples{index}" / "pseudo.jsonl"
        ).read_bytes()
        _assert_same_tree(got / "modules", tmp_path / f"modules{index}")

    # the registry holds one version per task, made from the plain modules folder
    versions = sorted(
        client.search_model_versions("name = 'dmea-test'"), key=lambda v: int(v.version)
    )
    assert [
        (str(v.version), v.tags["task_id"], v.tags["task_index"], v.run_id) for v in versions
    ] == [("1", "a", "0", run_ids[0]), ("2", "b", "1", run_ids[1])]
    for index, version in enumerate(versions):
        assert version.source.endswith("/modules")
        _assert_same_tree(Path(version.source), tmp_path / f"modules{index}")

    # the reader API
    found = find_task_runs(uri=uri, experiment="exp-a", parent_run_id=parent)
    assert [(f["task_index"], f["task_id"], f["run_id"]) for f in found] == [
        (0, "a", run_ids[0]),
        (1, "b", run_ids[1]),
    ]
    assert found[1]["metrics"]["val_loss"] == 2.0 and found[1]["metrics"]["eta"] == 2.5
    assert found[0]["model_version"] == "dmea-test/1"
    local = download_task_modules(uri=uri, run_id=run_ids[1], dst=tmp_path / "served")
    assert local == (tmp_path / "served" / "modules").resolve()
    _assert_same_tree(local, tmp_path / "modules1")


def _assert_same_tree(got: Path, expected: Path) -> None:
    files = sorted(p.relative_to(expected) for p in expected.rglob("*") if p.is_file())
    assert files == sorted(p.relative_to(got) for p in got.rglob("*") if p.is_file())
    for rel in files:
        assert (got / rel).read_bytes() == (expected / rel).read_bytes(), rel


def test_resume_after_crash_and_partial_failure(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    first = Tracker(experiment="exp-b")
    parent = first.start_sequence(run_name="seq", config={"a": 1}, tasks=["a", "b"])
    run_a = first.record_task(task_index=0, task_id="a", params={}, metrics={"val_loss": 1.0})
    del first  # the driver crashed; a new process reattaches to the same parent run

    second = Tracker(experiment="exp-b")
    assert second.resume_sequence(parent) == parent and second.parent_run_id == parent
    # a missing artifact and a non-numeric metric: warned, the rest recorded, the run marked FAILED
    with pytest.warns(TrackingWarning) as caught:
        broken = second.record_task(
            task_index=1,
            task_id="b",
            params={"seed": 1},
            metrics={"val_loss": 2.0, "bad": "high"},
            artifacts={"missing": tmp_path / "nope.txt"},
        )
    messages = " ".join(str(w.message) for w in caught)
    assert "'missing'" in messages and "nope.txt" in messages and "bad" in messages
    client = _client(f"sqlite:///{tmp_path}/mlflow.db")
    assert client.get_run(broken).info.status == "FAILED"
    assert client.get_run(broken).data.metrics == {"val_loss": 2.0}
    run_b = second.record_task(
        task_index=1, task_id="b", params={"seed": 1}, metrics={"val_loss": 2.5}
    )
    second.finish_sequence("FAILED")
    assert client.get_run(parent).info.status == "FAILED"
    # the retried task replaces the failed record; the first task survives the crash
    found = find_task_runs(uri="sqlite:///mlflow.db", experiment="exp-b", parent_run_id=parent)
    assert [(f["task_id"], f["run_id"]) for f in found] == [("a", run_a), ("b", run_b)]
    with pytest.raises(TrackingError, match="modules/ of run .*recorded with model_dir"):
        download_task_modules(uri="sqlite:///mlflow.db", run_id=run_b, dst=tmp_path / "x")


def test_disabled_tracker_does_nothing_and_never_imports_mlflow(tmp_path):
    code = (
        "import sys\n"
        "from dmea_dist.tracking import Tracker\n"
        "t = Tracker(enabled=False)\n"
        "assert t.start_sequence(run_name='r', config={'a': 1}, tasks=['a']) is None\n"
        "assert t.resume_sequence('abc') is None\n"
        "assert t.record_task(task_index=0, task_id='a', params={}, metrics={'x': 1.0}, model_dir='m',"
        " registered_model='m') is None\n"
        "t.log_sequence_metrics({'x': 1.0}); t.finish_sequence()\n"
        "assert 'mlflow' not in sys.modules, 'mlflow imported'\n"
    )
    done = subprocess.run(
        [sys.executable, "-W", "error", "-c", code], cwd=tmp_path, capture_output=True, text=True
    )
    assert done.returncode == 0, done.stderr
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("kind", ["garbage-scheme", "db-under-a-file"])
def test_broken_uri_only_warns(tmp_path, monkeypatch, kind):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "a_file").write_text("not a directory")
    uri = (
        "garbage://nowhere"
        if kind == "garbage-scheme"
        else f"sqlite:///{tmp_path}/a_file/mlflow.db"
    )
    with pytest.warns(TrackingWarning, match="connecting to"):
        tracker = Tracker(uri=uri)
    assert not tracker.active
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # an inactive tracker is silent: it already said so
        assert tracker.start_sequence(run_name="r", config={"a": 1}, tasks=["a"]) is None
        assert tracker.record_task(task_index=0, task_id="a", params={}, metrics={"x": 1.0}) is None
        tracker.log_sequence_metrics({"x": 1.0})
        tracker.finish_sequence()
    with pytest.raises(TrackingError):
        find_task_runs(uri=uri, experiment="dmea-dist", parent_run_id="abc")


def test_record_without_sequence_and_failing_db_warn(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    tracker = Tracker(experiment="exp-c")
    with pytest.warns(TrackingWarning, match="no sequence run"):
        assert tracker.record_task(task_index=0, task_id="a", params={}, metrics={}) is None
    assert tracker.start_sequence(run_name="r", config={}, tasks=["a"]) is not None

    def unreachable(*args, **kwargs):
        raise ConnectionError("database is gone")

    # the backend fails under a running tracker (root ignores file modes, so fail the client)
    monkeypatch.setattr(tracker._client, "create_run", unreachable)
    monkeypatch.setattr(tracker._client, "set_terminated", unreachable)
    with pytest.warns(TrackingWarning, match="creating the run of task 0"):
        assert tracker.record_task(task_index=0, task_id="a", params={}, metrics={"x": 1.0}) is None
    with pytest.warns(TrackingWarning, match="ending the sequence run"):
        tracker.finish_sequence()


def test_flatten_and_keys():
    flat = flatten(
        {"a": {"b": 1, "c": {"d": [1, 2]}, "e": {}}, "f": None, "g": Path("/x"), "h": True}
    )
    assert flat == {"a.b": "1", "a.c.d": "[1, 2]", "a.e": "{}", "f": "None", "g": "/x", "h": "True"}
    assert mlflow_key("eval/rouge@L") == "eval/rouge_L"
    assert mlflow_key("/a//../b/") == "a/__/b"
    long_a, long_b = mlflow_key("x" * 300 + "a"), mlflow_key("x" * 300 + "b")
    assert len(long_a) == MAX_KEY_LENGTH and long_a != long_b
