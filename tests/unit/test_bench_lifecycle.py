"""benchmarks/bench_lifecycle.py's figures, against numbers worked out by hand (no timing)."""

from __future__ import annotations

import pytest

from tests.unit.bench_script import load_script


@pytest.fixture(scope="module")
def bench():
    return load_script("bench_lifecycle")


def test_overhead_is_wall_minus_compute_and_start_up_counts_from_before_ray_init(bench):
    # in-process compute 5, 8, 16 s; the Ray run starts (ray.init) at 100, its tasks' RECORD steps come back
    # at 115, 124 and 141, the run returns at 144
    f = bench.figures([5.0, 8.0, 16.0], [115.0, 124.0, 141.0], start=100.0, end=144.0)
    assert f["walls"] == pytest.approx([15.0, 9.0, 17.0])
    assert f["overhead"] == pytest.approx([10.0, 1.0, 1.0])  # what runs between stages counts per task
    assert f["later"] == pytest.approx(1.0)
    assert f["startup"] == pytest.approx(9.0)  # ray.init included: the clock starts before it
    assert f["finish"] == pytest.approx(3.0)
    assert f["wall"] == pytest.approx(44.0)
    assert f["ratio"] == pytest.approx((44.0 - 9.0) / 29.0)


def test_the_stamped_coordinator_notes_only_record_steps(bench):
    class Inner:
        closed = False

        def __init__(self):
            self.outs = iter([{"record": None}, {"record": {"task_index": 0}}, {"record": None}])

        def step(self):
            return next(self.outs)

        def close(self):
            Inner.closed = True

    stamps: list[float] = []
    coordinator = bench.StampedCoordinator(Inner(), stamps)
    for _ in range(3):
        coordinator.step()
    coordinator.close()
    assert len(stamps) == 1 and Inner.closed
