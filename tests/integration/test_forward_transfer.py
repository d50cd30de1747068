"""eval.all_tasks: unseen tasks are scored before they are trained, against the untrained backbone (FWT)."""

from __future__ import annotations

import numpy as np
import pytest

from dmea_dist.driver import run_sequence
from tests.integration.tiny_run import tiny_config

pytestmark = pytest.mark.integration


def test_forward_transfer_is_computed_and_reported(tmp_path):
    config = tiny_config(tmp_path, data={"tasks": ["synth.hotel.00", "synth.hotel.01"]},
                         eval={"all_tasks": True}, method={"name": "adapter"})
    printed = []
    result = run_sequence(config, run_dir=tmp_path / "run", progress=False, echo=printed.append)
    R = result.R
    assert np.isfinite(R).all()  # the upper triangle too: task 1 scored after task 0
    import json

    record = json.loads(next((tmp_path / "run" / "tasks").glob("000-*/record.json")).read_text())
    baseline = record["params"]["baseline_scores"]
    assert set(baseline) == {"synth.hotel.00", "synth.hotel.01"}
    assert result.metrics["fwt"] == pytest.approx(R[0, 1] - baseline["synth.hotel.01"])
    assert "fwt=" in "\n".join(printed)
