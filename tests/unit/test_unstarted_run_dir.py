"""A new run that fails or is stopped while its coordinator is being built (a cluster too small for its
pools, `ray job stop` during start-up) has done nothing: it leaves no run directory behind (an empty one
with a .lock, or one whose state says "running" at task 1, with no MLflow run and no resume hint)."""

from __future__ import annotations

import pytest

from dmea_dist.config import config_from_dict
from dmea_dist.driver import run_sequence
from dmea_dist.errors import ClusterTooSmall


def _config(tmp_path):
    return config_from_dict({"data": {"tasks": ["synth.hotel.00"]}, "output_dir": str(tmp_path / "runs"),
                             "tracking": {"enabled": False}})


class Unbuilt:
    """A coordinator actor whose build failed: its first call raises what the build raised."""

    def __init__(self, config, run_dir, **kwargs):
        (run_dir / "state.json").write_text("{}")  # the actor had written its start before failing
        self.error = kwargs.pop("error")

    def tracking(self):
        raise self.error

    def close(self):
        pass


@pytest.mark.parametrize("error", [ClusterTooSmall("could not reserve 1 x {CPU: 1}"), SystemExit(15)])
def test_a_run_that_fails_while_its_coordinator_is_built_leaves_no_run_directory(tmp_path, error):
    with pytest.raises(type(error)):
        run_sequence(_config(tmp_path), coordinator_factory=lambda c, d, **k: Unbuilt(c, d, error=error, **k),
                     progress=False, check=False)
    assert list((tmp_path / "runs").iterdir()) == []


def test_a_run_whose_training_ranks_cannot_start_leaves_no_run_directory(tmp_path):
    def factory(config, run_dir, **kwargs):  # launch_ranks, in the factory, before the actor exists
        raise ClusterTooSmall("could not reserve 4 x {CPU: 1} (SPREAD) for the training group")

    with pytest.raises(ClusterTooSmall):
        run_sequence(_config(tmp_path), coordinator_factory=factory, progress=False, check=False)
    assert list((tmp_path / "runs").iterdir()) == []


def test_a_run_directory_the_user_gave_that_existed_is_left_alone(tmp_path):
    run_dir = tmp_path / "mine"
    run_dir.mkdir()
    (run_dir / "notes.txt").write_text("mine")
    with pytest.raises(ClusterTooSmall):
        run_sequence(_config(tmp_path), run_dir=run_dir, progress=False, check=False,
                     coordinator_factory=lambda c, d, **k: Unbuilt(c, d, error=ClusterTooSmall("x"), **k))
    assert (run_dir / "notes.txt").read_text() == "mine"
