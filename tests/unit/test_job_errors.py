"""`ray stop` (or a dead node) under a running job: the driver's last words are one `error:` line after the
resume hint, not a Ray traceback with the actor's details printed three times."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import ray.exceptions

DETAIL = ("The actor died unexpectedly before finishing this task.\n\tclass_name: CoordinatorActor\n"
          "\tpid: 18961\nThe actor is dead because its owner has died. Worker exit detail: Owner's node has crashed.")


class ActorDiedError(ray.exceptions.ActorDiedError):  # its str as Ray's is, after `ray stop`
    def __str__(self):
        return DETAIL


def test_a_lost_coordinator_ends_the_job_in_one_line(tmp_path, monkeypatch, capsys):
    spec = importlib.util.spec_from_file_location("run_sequence_job", Path(__file__).parents[2] / "ray_jobs" /
                                                  "run_sequence.py")
    job = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(job)
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    monkeypatch.setattr(job, "check_input", lambda config: None)
    monkeypatch.setattr(job, "connect", lambda *a, **k: "local")

    def run_sequence(*a, **k):
        raise ActorDiedError()

    monkeypatch.setattr(job, "run_sequence", run_sequence)
    (tmp_path / "run.yaml").write_text("data: {tasks: [synth.hotel.00]}\n")
    assert job.main([str(tmp_path / "run.yaml"), "--set", "tracking.enabled=false"]) == 1
    err = capsys.readouterr().err
    assert err.splitlines() == [
        "error: Ray lost a part of the run (ActorDiedError: The actor died unexpectedly before finishing this "
        "task. ... The actor is dead because its owner has died. Worker exit detail: Owner's node has crashed.)"], err


def test_cleanup_warnings_after_an_error_are_one_line(capsys):
    from dmea_dist.driver import _try

    def close():
        raise ActorDiedError()

    _try(close)
    assert capsys.readouterr().err == "warning: The actor died unexpectedly before finishing this task.\n"


def test_resuming_a_finished_run_through_the_job_needs_no_ray(tmp_path, monkeypatch, capsys):
    """As `dmea resume`: a run with no stage left only reports its results; the job started an embedded Ray
    (or joined the cluster) and a coordinator actor for them."""
    import types

    spec = importlib.util.spec_from_file_location("run_sequence_job", Path(__file__).parents[2] / "ray_jobs" /
                                                  "run_sequence.py")
    job = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(job)
    from dmea_dist.config import RayConfig

    config = types.SimpleNamespace(tracking=None, ray=RayConfig())
    monkeypatch.setattr(job, "resume_config", lambda run_dir, sets: config)
    monkeypatch.setattr(job, "check_job_paths", lambda config: None)
    monkeypatch.setattr(job, "check_resume", lambda run_dir, config: None)
    calls = []

    def resume_sequence(run_dir, **kwargs):
        calls.append(kwargs)
        return types.SimpleNamespace(metrics={"final_average": 12.5}, parent_run_id="abc")

    def connect(*a, **k):
        raise AssertionError("a finished run connected to Ray")

    monkeypatch.setattr(job, "resume_sequence", resume_sequence)
    monkeypatch.setattr(job, "connect", connect)
    monkeypatch.setattr(job, "load_state", lambda run_dir: types.SimpleNamespace(done=True))
    assert job.main(["--resume", str(tmp_path)]) == 0
    assert calls and calls[0].get("coordinator_factory") is None
    assert capsys.readouterr().out.splitlines()[-1] == "final_average=12.50 parent_run_id=abc"

    monkeypatch.setattr(job, "load_state", lambda run_dir: types.SimpleNamespace(done=False))
    with pytest.raises(AssertionError, match="connected to Ray"):  # a run with stages left goes to Ray
        job.main(["--resume", str(tmp_path)])
