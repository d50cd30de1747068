"""benchmarks/bench_quickstart.py keeps a timed run that pretrained out of the warm runs (no timing)."""

from __future__ import annotations

from tests.unit.bench_script import load_script


def test_a_run_that_pretrains_is_not_counted_as_warm():
    bench = load_script("bench_quickstart")
    cold = ("pretraining the tiny backbone (800 steps, first run only; cached in runs/_cache/abc)\n"
            "[1/3] synth.restaurant.00 expand\n")
    assert bench.warm_label("default", cold) == "default (pretrained: not warm)"
    assert bench.warm_label("default", "[1/3] synth.restaurant.00 expand\n") == "default"
