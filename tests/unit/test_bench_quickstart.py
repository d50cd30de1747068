"""benchmarks/bench_quickstart.py keeps a timed run that pretrained out of the warm runs (no timing)."""

from __future__ import annotations

import importlib.util
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "bench_quickstart.py"


def test_a_run_that_pretrains_is_not_counted_as_warm():
    spec = importlib.util.spec_from_file_location("bench_quickstart", SCRIPT)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    cold = ("pretraining the tiny backbone (800 steps, first run only; cached in runs/_cache/abc)\n"
            "[1/3] synth.restaurant.00 expand\n")
    assert bench.warm_label("default", cold) == "default (pretrained: not warm)"
    assert bench.warm_label("default", "[1/3] synth.restaurant.00 expand\n") == "default"
