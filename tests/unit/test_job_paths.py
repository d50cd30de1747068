"""A `ray job submit --working-dir` job runs in Ray's temporary copy of the repository
(/tmp/ray/session_*/runtime_resources/working_dir_files/...): a relative output_dir or sqlite
tracking.uri would put the run and its records there, out of sight and deleted with the session.
The job entry point refuses them at once, in one line naming the key and the fix."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

JOB_ENV = "RAY_JOB_CONFIG_JSON_ENV_VAR"  # what Ray's job supervisor gives the entry point


def _job():
    spec = importlib.util.spec_from_file_location("run_sequence_job", Path(__file__).parents[2] / "ray_jobs" /
                                                  "run_sequence.py")
    job = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(job)
    return job


def _in_a_job(monkeypatch, tmp_path, *, working_dir: bool):
    runtime_env = {"working_dir": "gcs://_ray_pkg_0123.zip"} if working_dir else {}
    monkeypatch.setenv(JOB_ENV, json.dumps({"runtime_env": {**runtime_env, "env_vars": {}}}))
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr("dmea_dist.distributed.coordinator.connect",
                        lambda *a, **k: pytest.fail("reached Ray: the paths were not checked first"))


def _config(tmp_path) -> Path:
    path = tmp_path / "run.yaml"
    path.write_text("data: {tasks: [synth.hotel.00]}\n")
    return path


@pytest.mark.parametrize(("overrides", "key"), [
    ([], "output_dir"),  # the default, runs
    (["output_dir=runs"], "output_dir"),
    (["tracking.uri=sqlite:///mlflow.db"], "tracking.uri"),
])
def test_a_working_dir_job_refuses_relative_output_paths_before_any_work(tmp_path, monkeypatch, capsys,
                                                                        overrides, key):
    _in_a_job(monkeypatch, tmp_path, working_dir=True)
    absolute = [f"output_dir={tmp_path / 'out'}", f"tracking.uri=sqlite:///{tmp_path / 'mlflow.db'}"]
    given = [o for o in absolute if o.split("=")[0] != key] + overrides
    args = [str(_config(tmp_path))] + [a for o in given for a in ("--set", o)]
    assert _job().main(args) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: {key} ") and "--working-dir" in err and f"--set {key}=" in err, err
    assert len(err.splitlines()) == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run.yaml"]  # nothing written: no runs/, no database


def test_a_job_without_working_dir_keeps_relative_paths(tmp_path, monkeypatch):
    """Without --working-dir the job runs where Ray's dashboard started: relative paths mean what they say."""
    from dmea_dist.config import config_from_dict
    from dmea_dist.preflight import check_job_paths

    _in_a_job(monkeypatch, tmp_path, working_dir=False)
    check_job_paths(config_from_dict({"data": {"tasks": ["synth.hotel.00"]}}))  # no error
    monkeypatch.delenv(JOB_ENV)  # run by hand, outside a job
    check_job_paths(config_from_dict({"data": {"tasks": ["synth.hotel.00"]}}))


def test_a_working_dir_job_refuses_a_resume_that_moves_the_run_to_a_relative_path(tmp_path, monkeypatch, capsys):
    import yaml

    from dmea_dist.config import config_from_dict

    _in_a_job(monkeypatch, tmp_path, working_dir=True)
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    config = config_from_dict({"data": {"tasks": ["synth.hotel.00"]}, "output_dir": str(tmp_path),
                               "tracking": {"uri": f"sqlite:///{tmp_path / 'mlflow.db'}"}})
    (run_dir / "config.yaml").write_text(yaml.safe_dump(config.to_dict()))
    assert _job().main(["--resume", str(run_dir), "--set", "tracking.uri=sqlite:///mlflow.db"]) == 2
    assert capsys.readouterr().err.startswith("error: tracking.uri 'sqlite:///mlflow.db' is relative")


def test_a_stopped_job_says_how_to_resume_it_as_a_job(tmp_path, monkeypatch, capsys):
    """`ray job stop` of a job: the hint is the job entry point's --resume (what the README documents for a
    cluster), not `dmea resume`, which would run it on an embedded Ray of whatever machine types it."""
    from dmea_dist.config import config_from_dict
    from dmea_dist.driver import run_sequence

    class Terminated:
        def tracking(self):
            return {"parent": None, "tasks": {}}

        def records(self):
            return []

        def state_position(self):
            return {"done": False, "next": (0, "expand")}

        def step(self):
            raise SystemExit(15)  # what Ray's SIGTERM handler raises in a job's driver

        def mark(self, status, message):
            pass

        def close(self):
            pass

    config = config_from_dict({"data": {"tasks": ["synth.hotel.00"]}, "tracking": {"enabled": False}})
    for in_job, hint in ((True, f"python ray_jobs/run_sequence.py --resume {tmp_path / 'job'}"),
                         (False, f"dmea resume {tmp_path / 'local'}")):
        if in_job:
            monkeypatch.setenv(JOB_ENV, json.dumps({"runtime_env": {"working_dir": "gcs://_ray_pkg_0123.zip"}}))
        else:
            monkeypatch.delenv(JOB_ENV, raising=False)
        with pytest.raises(SystemExit):
            run_sequence(config, run_dir=tmp_path / ("job" if in_job else "local"),
                         coordinator_factory=lambda *a, **k: Terminated(), progress=False, check=False)
        out = capsys.readouterr().out
        assert hint in out, out
        assert ("ray job submit" in out) == in_job
