"""Bad input next to a real MLflow record: refused before any work, the earlier record intact.

An earlier run is recorded in a real SQLite MLflow database (a FINISHED
parent run with one FINISHED task run) beside its run directory; every test
hashes all of it, runs the failing `dmea` command and checks the hashes and
the MLflow record afterwards. The unit layer (tests/unit/test_bad_input.py)
covers each bad input without MLflow.
"""

from __future__ import annotations

import hashlib
import shutil
from pathlib import Path

import pytest
import yaml

from dmea_dist.cli import _tracking_reported, main
from dmea_dist.config import config_from_dict
from dmea_dist.tracking import Tracker, find_task_runs

pytestmark = pytest.mark.integration

EXPERIMENT = "bad-input"


def snapshot(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def recorded(tmp_path_factory) -> Path:
    """A folder with runs/earlier/ and mlflow.db holding that run, FINISHED (made once, copied per test)."""
    root = tmp_path_factory.mktemp("recorded")
    run = root / "runs" / "earlier"
    (run / "tasks" / "000-synth.travel.00" / "modules").mkdir(parents=True)
    (run / "report.md").write_text("# earlier\n")
    (run / "tasks" / "000-synth.travel.00" / "modules" / "manifest.json").write_text("{}\n")
    tracker = Tracker(uri=f"sqlite:///{root}/mlflow.db", experiment=EXPERIMENT)
    parent = tracker.start_sequence(run_name="earlier", config={"data": {"tasks": ["synth.travel.00"]}},
                                    tasks=["synth.travel.00"])
    tracker.record_task(task_index=0, task_id="synth.travel.00", params={"path": [0]}, metrics={"score": 1.0},
                        artifacts={"report.md": run / "report.md"})
    tracker.finish_sequence()
    (root / "parent.txt").write_text(parent)
    return root


@pytest.fixture
def workspace(recorded, tmp_path, monkeypatch):
    root = tmp_path / "work"
    shutil.copytree(recorded, root)
    # the copied database names the original artifact folder: fine, nothing here writes artifacts
    monkeypatch.chdir(root)
    return root


def write_config(root: Path, tasks, data=None) -> Path:
    path = root / "run.yaml"
    path.write_text(yaml.safe_dump({
        "name": "bad", "output_dir": str(root / "runs"),
        "data": {"tasks": tasks, "synth_sizes": [16, 4, 4], **(data or {})},
        "model": {"tiny": {"n_layer": 1, "n_embd": 16, "n_head": 2, "n_positions": 64, "vocab_size": 300,
                           "pretrain": {"corpus": "none"}}, "max_length": 64},
        "tracking": {"uri": f"sqlite:///{root}/mlflow.db", "experiment": EXPERIMENT},
    }))
    return path


def assert_untouched(root: Path, before: dict[str, str]) -> None:
    after = {k: v for k, v in snapshot(root).items() if k != "run.yaml"}
    assert after == before
    assert [p.name for p in (root / "runs").iterdir()] == ["earlier"]


def test_truncated_mlflow_database_is_refused_before_any_work(workspace, capsys):
    db = workspace / "mlflow.db"
    db.write_bytes(db.read_bytes()[: db.stat().st_size // 2])
    before = snapshot(workspace)
    code = main(["run", str(write_config(workspace, ["synth.travel.00"])), "--in-process"])
    err = capsys.readouterr().err
    assert code == 2 and "Traceback" not in err, err
    assert f"error: {db}: the MLflow database is damaged or not a database (database disk image is malformed)" in err
    assert f"move {db} away" in err and "--set tracking.uri=" in err and "--set tracking.enabled=false" in err
    assert_untouched(workspace, before)


def test_foreign_sqlite_file_is_not_turned_into_an_mlflow_database(workspace, capsys):
    import sqlite3

    db = workspace / "mlflow.db"
    db.unlink()
    with sqlite3.connect(db) as con:
        con.execute("CREATE TABLE notes (text TEXT)")
    before = snapshot(workspace)
    code = main(["run", str(write_config(workspace, ["synth.travel.00"])), "--in-process"])
    err = capsys.readouterr().err
    assert code == 2 and f"error: {db}: an SQLite database without MLflow's tables (it has ['notes'])" in err
    assert_untouched(workspace, before)


def test_bad_data_leaves_the_mlflow_record_as_it_was(workspace, capsys):
    before = snapshot(workspace)
    code = main(["run", str(write_config(workspace, ["synth.travel.00", "e2e"], {"root": "no/corpora"})), "--in-process"])
    err = capsys.readouterr().err
    assert code == 2 and "data root 'no/corpora'" in err
    assert_untouched(workspace, before)
    parent = (workspace / "parent.txt").read_text()
    runs = find_task_runs(uri=f"sqlite:///{workspace}/mlflow.db", experiment=EXPERIMENT, parent_run_id=parent)
    assert [(r["task_id"], r["metrics"]["score"]) for r in runs] == [("synth.travel.00", 1.0)]


def test_tracking_failures_during_a_run_are_counted_and_reported(workspace, capsys):
    config = config_from_dict(yaml.safe_load(write_config(workspace, ["synth.travel.00"]).read_text()))
    with _tracking_reported(config):
        tracker = Tracker(uri=config.tracking.uri, experiment=EXPERIMENT)
        tracker.start_sequence(run_name="later", config={"a": 1}, tasks=["synth.travel.00"])
        run_id = tracker.record_task(task_index=0, task_id="synth.travel.00", params={}, metrics={"score": 2.0},
                                     artifacts={"gone": workspace / "no-such-file"})
        tracker.finish_sequence()
    err = capsys.readouterr().err
    assert (f"WARNING: tracking: 1 MLflow call(s) failed during this run, so its record at {config.tracking.uri} "
            f"is incomplete (the run directory has every result); first: logging artifact 'gone'") in err
    from mlflow import MlflowClient

    assert MlflowClient(tracking_uri=f"sqlite:///{workspace}/mlflow.db").get_run(run_id).info.status == "FAILED"
    assert err.count("WARNING: tracking:") == 1
