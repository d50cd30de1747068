"""A user's journey with their own task files: what the commands say about the run and its data."""

from __future__ import annotations

from pathlib import Path

from dmea_dist.config import config_from_dict


def test_an_untracked_run_does_not_name_a_tracking_store_at_its_end():
    """`tracking: {enabled: false}`: the run's last lines said `tracking: sqlite:////.../mlflow.db`, a database
    the run never wrote (nor created), so a user looked for the run there."""
    from dmea_dist import driver

    off = config_from_dict({"data": {"tasks": ["synth.hotel.00"]}, "tracking": {"enabled": False}})
    line = driver.where_line(Path("/runs/r"), off)
    assert "tracking: off" in line and "mlflow.db" not in line, line
    on = config_from_dict({"data": {"tasks": ["synth.hotel.00"]}, "tracking": {"uri": "sqlite:////x/mlflow.db"}})
    assert "tracking: sqlite:////x/mlflow.db" in driver.where_line(Path("/runs/r"), on)
