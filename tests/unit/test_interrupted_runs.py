"""A run interrupted as runs are (Ctrl-C, SIGTERM, a second command on the same run) ends in a state a user can
read and resume: MLflow never left RUNNING, one clear line, nothing started or written for a refused command."""

from __future__ import annotations

import numpy as np
import pytest

from dmea_dist.config import config_from_dict
from dmea_dist.driver import run_sequence


class _Tracker:
    active, parent_run_id = True, "parent"

    def __init__(self, ends=None, **kwargs):
        self.ends = ends

    def resume_sequence(self, run_id):
        return run_id

    def log_sequence_metrics(self, metrics, artifacts=None):
        pass

    def finish_sequence(self, status="FINISHED"):
        self.ends.append(status)


class _Done:
    """A coordinator whose every stage has finished: the driver has only the results left to write."""

    def tracking(self):
        return {"parent": "parent", "tasks": {"synth.hotel.00": "task-run"}}

    def records(self):
        return []

    def state_position(self):
        return {"done": True, "next": None}

    def results(self):
        return {"R": np.array([[50.0]]), "similarity": np.full((1, 1), np.nan), "baseline": None, "paths": None,
                "history": []}

    def mark(self, status, message):
        pass

    def close(self):
        pass


@pytest.mark.parametrize("interruption, status, said", [
    (KeyboardInterrupt(), "KILLED", "stopped"),  # Ctrl-C while the report is drawn (1-2 s at the quick start's end)
    (SystemExit(15), "KILLED", "stopped"),  # SIGTERM, as Ray's driver handler raises it
    (RuntimeError("disk full"), "FAILED", "failed"),
])
def test_a_stop_while_the_results_are_written_ends_the_parent_run_and_says_how_to_finish(
        tmp_path, monkeypatch, capsys, interruption, status, said):
    """Every stage is done and the driver writes R, the report and the sequence metrics: a Ctrl-C there left the
    MLflow parent run RUNNING and the command ended without a word (exit 130)."""
    import dmea_dist.driver as driver
    import dmea_dist.tracking

    ends = []
    monkeypatch.setattr(dmea_dist.tracking, "Tracker", lambda **kwargs: _Tracker(ends))

    def interrupted(*args, **kwargs):
        raise interruption

    monkeypatch.setattr(driver, "write_reports", interrupted)
    config = config_from_dict({"data": {"tasks": ["synth.hotel.00"]},
                               "tracking": {"uri": f"sqlite:///{tmp_path / 'mlflow.db'}"}})
    run_dir = tmp_path / "run"
    with pytest.raises(type(interruption)):
        run_sequence(config, run_dir=run_dir, coordinator_factory=lambda *a, **k: _Done(), progress=False,
                     check=False)
    assert ends == [status]
    out = capsys.readouterr().out
    assert f"{said} while writing the results of {run_dir}" in out
    assert f"dmea resume {run_dir}" in out
