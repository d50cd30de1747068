"""A run's paths are absolute in what it saves, so `dmea resume` finds the same files from any directory."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from dmea_dist.config import config_from_dict
from dmea_dist.driver import resume_sequence, run_sequence
from dmea_dist.errors import DmeaError
from dmea_dist.preflight import resume_config, with_absolute_paths


def _relative_config():
    return config_from_dict({
        "data": {"tasks": ["synth.hotel.00"], "root": "data",
                 "user_tasks": {"mine": {"path": "mine.jsonl"}}},
        "output_dir": "runs", "tracking": {"uri": "sqlite:///mlflow.db?timeout=5"},
        "model": {"pretrained": "ckpt"},
    })


def test_relative_paths_become_absolute_from_the_working_directory(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "ckpt").mkdir()  # a local checkpoint folder; a hub name would stay a name
    config = with_absolute_paths(_relative_config())
    assert config.data.root == str(tmp_path / "data") and config.output_dir == str(tmp_path / "runs")
    assert config.data.user_tasks["mine"]["path"] == str(tmp_path / "mine.jsonl")
    assert config.tracking.uri == f"sqlite:///{tmp_path / 'mlflow.db'}?timeout=5"
    assert config.model.pretrained == str(tmp_path / "ckpt")
    assert with_absolute_paths(config) == config  # absolute ones stay as they are
    hub = config_from_dict({"data": {"tasks": ["a"]}, "model": {"pretrained": "gpt2"},
                            "tracking": {"uri": "http://mlflow:5000"}})
    resolved = with_absolute_paths(hub)
    assert resolved.model.pretrained == "gpt2" and resolved.tracking.uri == "http://mlflow:5000"


def _given_to_coordinator(drive):
    """The config `drive(coordinator_factory)` hands the coordinator (the drive stops right there)."""
    given = []

    class Given(Exception):
        pass

    def factory(config, run_dir, **kwargs):
        given.append(config)
        raise Given

    with pytest.raises(Given):
        drive(factory)
    (seen,) = given
    return seen


def test_a_run_is_driven_with_absolute_paths(tmp_path, monkeypatch):
    """What run_sequence hands the coordinator (and so what config.yaml holds) has no relative path."""
    monkeypatch.chdir(tmp_path)
    config = config_from_dict({"data": {"tasks": ["synth.hotel.00"]}, "tracking": {"enabled": False}})
    seen = _given_to_coordinator(lambda factory: run_sequence(config, run_dir=tmp_path / "run",
                                                              coordinator_factory=factory, progress=False,
                                                              check=False))
    assert Path(seen.data.root).is_absolute() and Path(seen.output_dir).is_absolute()
    assert seen.tracking.uri == f"sqlite:///{tmp_path / 'mlflow.db'}"


def test_paths_given_on_resume_are_made_absolute_as_on_run(tmp_path, monkeypatch):
    """`dmea resume RUN --set data.root=corpora`: the coordinator (on Ray, in another directory) gets the path
    from where the command was given."""
    from dmea_dist.state import RunState, save_state

    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / "config.yaml").write_text(yaml.safe_dump(with_absolute_paths(_relative_config()).to_dict()))
    save_state(RunState.new(["synth.hotel.00"]), run_dir)
    monkeypatch.chdir(tmp_path)
    seen = _given_to_coordinator(lambda factory: resume_sequence(
        run_dir, overrides=["data.root=moved", "tracking.uri=sqlite:///moved.db"], coordinator_factory=factory,
        progress=False, echo=lambda line: None))
    assert seen.data.root == str(tmp_path / "moved") and seen.tracking.uri == f"sqlite:///{tmp_path / 'moved.db'}"



def test_what_a_resume_moved_holds_for_the_next_resume(tmp_path, monkeypatch):
    """`dmea resume RUN --set tracking.uri=...` (the database moved) was not saved: a second, plain resume went
    back to the old store and split the run's records between two. config.yaml now records the change
    (atomically); a resume without overrides leaves the file as it was."""
    from dmea_dist.state import RunState, save_state

    run_dir = tmp_path / "run"
    run_dir.mkdir()
    monkeypatch.chdir(tmp_path)
    (run_dir / "config.yaml").write_text(yaml.safe_dump(with_absolute_paths(_relative_config()).to_dict()))
    save_state(RunState.new(["synth.hotel.00"]), run_dir)
    said = []
    resume = lambda overrides: _given_to_coordinator(lambda factory: resume_sequence(  # noqa: E731
        run_dir, overrides=overrides, coordinator_factory=factory, progress=False, echo=said.append))
    before = (run_dir / "config.yaml").read_bytes()
    assert resume([]).tracking.uri == f"sqlite:///{tmp_path / 'mlflow.db'}?timeout=5"
    assert (run_dir / "config.yaml").read_bytes() == before
    moved = resume(["data.root=moved", "tracking.uri=sqlite:///moved.db"])
    assert any("now records data.root=moved, tracking.uri=sqlite:///moved.db" in line for line in said), said
    monkeypatch.chdir(run_dir)  # the next resume, from elsewhere, without --set
    again = resume([])
    assert again == moved and again.tracking.uri == f"sqlite:///{tmp_path / 'moved.db'}"
    assert again.data.root == str(tmp_path / "moved")


def test_a_resume_saves_the_users_sets_not_the_sizes_a_cluster_gave(tmp_path, monkeypatch):
    """`dmea resume` and the job entry point add `ray.*` sizes for the keys the run left unset (the cluster's
    sizing); saved, they would pin the next resume, on another cluster, to this one's sizes."""
    from dmea_dist.state import RunState, save_state

    monkeypatch.chdir(tmp_path)
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / "config.yaml").write_text(yaml.safe_dump(with_absolute_paths(_relative_config()).to_dict()))
    save_state(RunState.new(["synth.hotel.00"]), run_dir)
    assert yaml.safe_load((run_dir / "config.yaml").read_text())["ray"]["num_search_workers"] is None
    seen = _given_to_coordinator(lambda factory: resume_sequence(
        run_dir, overrides=["data.root=moved", "ray.num_search_workers=2"], saved=["data.root=moved"],
        coordinator_factory=factory, progress=False, echo=lambda line: None))
    assert seen.ray.num_search_workers == 2 and seen.data.root == str(tmp_path / "moved")
    written = yaml.safe_load((run_dir / "config.yaml").read_text())
    assert written["data"]["root"] == str(tmp_path / "moved") and written["ray"]["num_search_workers"] is None

def test_resume_may_move_the_corpus_and_the_store_but_not_what_the_run_computes(tmp_path):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / "config.yaml").write_text(yaml.safe_dump(_relative_config().to_dict()))
    moved = resume_config(run_dir, ["data.root=/data/corpora", "tracking.uri=sqlite:////srv/mlflow.db",
                                    "output_dir=/srv/runs", "ray.num_generation_actors=2"])
    assert moved.data.root == "/data/corpora" and moved.tracking.uri == "sqlite:////srv/mlflow.db"
    with pytest.raises(DmeaError, match=r"refused for \['train.lr'\]"):
        resume_config(run_dir, ["train.lr=0.5"])


def test_resume_with_other_threads_or_ranks_says_the_rest_is_not_bit_for_bit(tmp_path, capsys):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / "config.yaml").write_text(yaml.safe_dump(_relative_config().to_dict()))
    resume_config(run_dir, ["ray.num_generation_actors=2"])
    assert "floating-point" not in capsys.readouterr().err
    resume_config(run_dir, ["ray.train_cpus=2", "ray.num_train_workers=2"])
    err = capsys.readouterr().err
    assert "ray.num_train_workers=2" in err and "ray.train_cpus=2.0" in err and "floating-point" in err


class _Tracker:
    active, parent_run_id = True, "parent"


def test_a_task_model_that_cannot_be_staged_is_recorded_without_it(tmp_path):
    """Staging a task's model for the registry (a copy in /tmp) may fail: a warning, never a failed run."""
    from dmea_dist.driver import _servable
    from dmea_dist.tracking import TrackingWarning

    config = config_from_dict({"data": {"tasks": ["synth.hotel.00"]}})
    rec = {"task_id": "synth.hotel.00", "params": {}, "model_dir": str(tmp_path / "gone/tasks/000-x/modules")}
    with pytest.warns(TrackingWarning, match=r"staging synth.hotel.00's model .* without a registered model"):
        with _servable(_Tracker(), config, rec) as servable:
            assert servable is None


def test_a_store_that_cannot_be_read_at_resume_leaves_tasks_unrecorded_not_the_run_failed(monkeypatch):
    import dmea_dist.tracking
    from dmea_dist.driver import _record_unrecorded
    from dmea_dist.tracking import TrackingWarning

    class Coordinator:
        def tracking(self):
            return {"tasks": {}}

        def records(self):
            return [{"task_id": "synth.hotel.00"}]

        def set_tracking(self, **kwargs):
            raise AssertionError("nothing is recorded while MLflow's records are unknown")

    def unreadable(**kwargs):
        raise OSError("database is locked")

    monkeypatch.setattr(dmea_dist.tracking, "find_task_runs", unreadable)
    config = config_from_dict({"data": {"tasks": ["synth.hotel.00"]}})
    with pytest.warns(TrackingWarning, match=r"records of \['synth.hotel.00'\] failed .*database is locked"):
        _record_unrecorded(_Tracker(), Coordinator(), config)


def test_sigterm_stops_the_run_as_stopped_not_failed(tmp_path, capsys):
    """In a Ray driver SIGTERM (`ray job stop`, a scheduler) arrives as SystemExit from Ray's handler: the
    run is marked stopped (resumable, MLflow KILLED), like Ctrl-C, not failed."""
    marks = []

    class Terminated:
        def tracking(self):
            return {"parent": None, "tasks": {}}

        def set_tracking(self, **kwargs):
            pass

        def records(self):
            return []

        def state_position(self):
            return {"done": False, "next": (0, "expand")}

        def step(self):
            raise SystemExit(15)  # what ray's sigterm_handler raises

        def mark(self, status, message):
            marks.append((status, message))

        def close(self):
            pass

    config = config_from_dict({"data": {"tasks": ["synth.hotel.00"]}, "tracking": {"enabled": False}})
    with pytest.raises(SystemExit):
        run_sequence(config, run_dir=tmp_path / "run", coordinator_factory=lambda *a, **k: Terminated(),
                     progress=False, check=False)
    assert marks == [("stopped", "stopped by SIGTERM")]
    assert "stopped: the state of" in capsys.readouterr().out


def test_the_job_entry_point_refuses_an_unusable_store_on_resume_before_ray(tmp_path, capsys):
    """`ray_jobs/run_sequence.py --resume` checks the store as `dmea resume` does: at once, in one line."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("run_sequence_job", Path(__file__).parents[2] / "ray_jobs" /
                                                  "run_sequence.py")
    job = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(job)
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    config = config_from_dict({"data": {"tasks": ["synth.hotel.00"]},
                               "tracking": {"uri": f"sqlite:///{tmp_path / 'gone' / 'mlflow.db'}"}})
    (run_dir / "config.yaml").write_text(yaml.safe_dump(config.to_dict()))
    assert job.main(["--resume", str(run_dir)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: tracking.uri") and "does not exist" in err and len(err.splitlines()) == 1


def test_the_coordinator_starts_before_mlflow_connects_and_is_closed_if_connecting_is_interrupted(tmp_path,
                                                                                                  monkeypatch):
    """On Ray the coordinator actor imports and builds the run while the driver opens MLflow (2-4 s), so the
    factory is called first; a Ctrl-C while MLflow connects leaves no coordinator behind."""
    import dmea_dist.tracking

    events = []

    class Coordinator:
        def close(self):
            events.append("coordinator closed")

    def factory(config, run_dir, **kwargs):
        events.append("coordinator started")
        return Coordinator()

    class Tracker:
        def __init__(self, **kwargs):
            events.append("mlflow connecting")
            raise KeyboardInterrupt

    monkeypatch.setattr(dmea_dist.tracking, "Tracker", Tracker)
    config = config_from_dict({"data": {"tasks": ["synth.hotel.00"]}, "tracking": {"enabled": False}})
    with pytest.raises(KeyboardInterrupt):
        run_sequence(config, run_dir=tmp_path / "run", coordinator_factory=factory, progress=False, check=False)
    assert events == ["coordinator started", "mlflow connecting", "coordinator closed"]
