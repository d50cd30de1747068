"""The driver with a fake coordinator and tracker: how a run directory given as typed (`.`, relative) is named."""

from __future__ import annotations

import re
import time
from pathlib import Path

import pytest
import yaml

from dmea_dist.config import config_from_dict
from dmea_dist.driver import resume_sequence, run_sequence
from dmea_dist.method.lifecycle import Stage
from dmea_dist.state import RunState, load_state, save_state

TASKS = ["synth.hotel.00", "synth.hotel.01"]


class FakeCoordinator:
    """Steps the lifecycle without work; a RECORD stage returns a record whose model_dir is under the run
    directory as it was given (as the real coordinator's `<run_dir>/tasks/NNN-<task>/modules`)."""

    def __init__(self, config, run_dir, *, resume, progress=None):
        self.run_dir = Path(run_dir)
        self.state = load_state(run_dir) if resume else RunState.new(list(config.data.tasks))
        save_state(self.state, run_dir)

    def state_position(self):
        return {"done": self.state.done, "next": None if self.state.done else (self.state.task_index,
                                                                                self.state.stage.value)}

    def step(self):
        task, stage = self.state.tasks[self.state.task_index], self.state.stage
        self.state.advance({}, seconds=0.0)
        save_state(self.state, self.run_dir)
        record = None
        if stage is Stage.RECORD:
            model_dir = self.run_dir / "tasks" / f"{task.index:03d}-{task.task_id}" / "modules"
            record = {"task_id": task.task_id, "task_index": task.index, "params": {"path": [0]}, "metrics": {},
                      "series": {}, "artifacts": {}, "model_dir": str(model_dir)}
        return {"finished": self.state.history[-1], "record": record, "done": self.state.done,
                "next": self.state_position()["next"]}

    def results(self):
        import numpy as np

        n = len(self.state.tasks)
        return {"R": np.full((n, n), 50.0), "similarity": np.full((n, n), np.nan), "baseline": None,
                "paths": None, "history": list(self.state.history)}

    def records(self):
        return []

    def tracking(self):
        return {"parent": self.state.mlflow_parent_run_id, "tasks": {t.task_id: t.mlflow_run_id
                                                                     for t in self.state.tasks}}

    def set_tracking(self, *, parent=None, task_id=None, run_id=None):
        if parent is not None:
            self.state.mlflow_parent_run_id = parent
        if task_id is not None:
            self.state.task(task_id).mlflow_run_id = run_id
        save_state(self.state, self.run_dir)

    def mark(self, status, message=""):
        pass

    def close(self):
        pass


class FakeTracker:
    made: list[FakeTracker] = []

    def __init__(self, *, uri, experiment, enabled):
        self.parent_run_id, self.run_names, self.registered = None, [], []
        FakeTracker.made.append(self)

    active = True

    def start_sequence(self, *, run_name, config, tasks, tags):
        self.run_names.append(run_name)
        self.parent_run_id = "parent"
        return "parent"

    def resume_sequence(self, run_id):
        self.parent_run_id = run_id
        return run_id

    def record_task(self, *, registered_model, **kwargs):
        self.registered.append(registered_model)
        return f"run-{kwargs['task_id']}"

    def log_sequence_metrics(self, metrics, artifacts=None):
        pass

    def finish_sequence(self, status="FINISHED"):
        pass


@pytest.fixture
def fakes(monkeypatch):
    import dmea_dist.serving
    import dmea_dist.tracking

    FakeTracker.made = []
    monkeypatch.setattr(dmea_dist.tracking, "Tracker", FakeTracker)
    monkeypatch.setattr(dmea_dist.serving, "stage_task", lambda run_dir, task_id, dst: Path(dst))
    monkeypatch.setattr("dmea_dist.driver.write_reports", lambda *args, **kwargs: None)
    return FakeTracker.made


def _config(tmp_path):
    return config_from_dict({"name": "fake", "output_dir": str(tmp_path / "runs"),
                             "data": {"tasks": TASKS, "synth_sizes": [4, 2, 2]},
                             "tracking": {"uri": f"sqlite:///{tmp_path}/mlflow.db"}})


@pytest.mark.parametrize("where", [".", "relative"])
def test_a_run_resumed_from_a_relative_directory_keeps_its_registered_model_and_run_name(tmp_path, monkeypatch,
                                                                                         fakes, where):
    """`dmea resume .` from inside the run directory: its tasks are registered under the run's own model,
    not under `<config>-<method>-` (the name of a folder called "."), which every run resumed that way shares."""
    config = _config(tmp_path)
    run_dir = tmp_path / "runs" / "fake-20260101-000000-abcd"
    run_dir.mkdir(parents=True)
    (run_dir / "config.yaml").write_text(yaml.safe_dump(config.to_dict(), sort_keys=False))
    state = RunState.new(TASKS)
    state.task_index, state.stage, state.mlflow_parent_run_id = 1, Stage.EXPAND, "parent"
    save_state(state, run_dir)
    monkeypatch.chdir(run_dir if where == "." else run_dir.parent)
    result = resume_sequence("." if where == "." else run_dir.name, coordinator_factory=FakeCoordinator,
                             progress=False, echo=lambda line: None)
    (tracker,) = fakes
    assert tracker.registered == ["fake-dmea-20260101-000000-abcd"]
    assert result.run_dir.name == run_dir.name


def test_a_run_started_in_a_relative_directory_is_named_after_it(tmp_path, monkeypatch, fakes):
    config = _config(tmp_path)
    run_dir = tmp_path / "fake-20260101-000000-abcd"
    run_dir.mkdir()
    monkeypatch.chdir(run_dir)
    run_sequence(config, run_dir=".", coordinator_factory=FakeCoordinator, progress=False, echo=lambda line: None,
                 check=False)
    (tracker,) = fakes
    assert tracker.run_names == [run_dir.name]
    assert tracker.registered == ["fake-dmea-20260101-000000-abcd"] * 2


class SlowCoordinator(FakeCoordinator):
    """Each stage takes 0.05 s: 6 stages x 2 tasks."""

    def step(self):
        time.sleep(0.05)
        return super().step()


def test_the_run_says_where_its_time_went_start_up_once_then_the_stages(tmp_path, fakes):
    """Issue 9: start-up is paid once per run and shown in the run's output. The CLI passes its process's start,
    so the start-up counts its imports, input check and a first run's pretraining."""
    lines = []
    started = time.time() - 100.0
    run_sequence(_config(tmp_path), coordinator_factory=SlowCoordinator, progress=False, echo=lines.append,
                 check=False, started=started)
    line = next(x for x in lines if x.strip().startswith("time:"))
    total, start, stages, finish = (float(x) for x in re.findall(r"(\d+\.\d) s", line))
    assert 100.0 <= start < 105.0 and 0.6 <= stages < 5.0 and total == pytest.approx(start + stages + finish, abs=0.15)
    assert "(imports, input check, the backbone, Ray, the coordinator; once per run)" in line
    lines.clear()
    run_sequence(_config(tmp_path), coordinator_factory=SlowCoordinator, progress=False, echo=lines.append,
                 check=False)  # called from Python: the drive's own start
    line = next(x for x in lines if x.strip().startswith("time:"))
    assert float(re.findall(r"(\d+\.\d) s to start", line)[0]) < 5.0 and "(the coordinator and tracking;" in line


class WarningCoordinator(FakeCoordinator):
    """A GENERATE stage whose pseudo samples fell short: its summary carries the warning, as stages.generate's."""

    def step(self):
        stage = self.state.stage
        out = super().step()
        if stage is Stage.GENERATE:
            out["finished"] = {**out["finished"], "warnings": [f"pseudo samples of x (learning {TASKS[1]}): 3 of 8"]}
        return out


def test_a_stages_warnings_are_printed_loudly_in_the_run_output(tmp_path, monkeypatch, fakes):
    config = _config(tmp_path)
    lines = []
    run_sequence(config, run_dir=tmp_path / "run", coordinator_factory=WarningCoordinator, progress=False,
                 echo=lines.append, check=False)
    assert [line for line in lines if line.startswith("WARNING:")] == [
        f"WARNING: pseudo samples of x (learning {TASKS[1]}): 3 of 8"] * 2  # one GENERATE per task
