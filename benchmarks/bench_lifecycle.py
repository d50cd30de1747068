"""Orchestration overhead: the lifecycle's wall time on Ray over the sum of its stages' compute time.

The same tiny sequence runs twice in one process, side by side:
  1. in process (no Ray), one torch thread: each stage's time is pure compute;
  2. on embedded Ray with one search worker, one generation actor and one Ray
     Train worker (one CPU each): the same computation plus scheduling, object
     transfer, actor and Ray Train start-up.
Prints per-stage seconds of both and the ratio of (2)'s lifecycle wall time to
(1)'s summed stage compute time. Model build (tokenizer, backbone
pretraining, cached) is excluded from both.

    .venv/bin/python benchmarks/bench_lifecycle.py [--tasks 3]
"""

from __future__ import annotations

import argparse
import collections
import os
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from dmea_dist.driver import run_sequence  # noqa: E402
from tests.integration.tiny_run import tiny_config  # noqa: E402

TASKS = ["synth.hotel.00", "synth.listops.00", "synth.hotel.01", "synth.weather.00"]


def stage_seconds(history) -> dict[str, float]:
    totals: dict[str, float] = collections.defaultdict(float)
    for h in history:
        totals[h["stage"]] += h["seconds"]
    return dict(totals)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tasks", type=int, default=3)
    parser.add_argument("--adapt-on", choices=["train_group", "ray_train", "coordinator"], default="train_group",
                        help="train_group: ranks started once per run (default); ray_train: a TorchTrainer per task; "
                             "coordinator: adaptation in the coordinator actor")
    args = parser.parse_args()
    import ray

    from dmea_dist.distributed.cluster import logical_cpus
    from dmea_dist.distributed.coordinator import connect, ray_coordinator_factory

    with tempfile.TemporaryDirectory() as tmp:
        config = tiny_config(tmp, data={"tasks": TASKS[: args.tasks]}, tracking={"enabled": False},
                             ray={"num_search_workers": 1, "num_generation_actors": 1, "num_train_workers": 1,
                                  "adapt_on": args.adapt_on})
        torch.set_num_threads(1)
        run_sequence(config, run_dir=f"{tmp}/warm", progress=False, echo=lambda s: None)  # builds the cached backbone
        local = run_sequence(config, run_dir=f"{tmp}/local", progress=False, echo=lambda s: None)
        connect(None, num_cpus=logical_cpus(config.ray))
        start = time.perf_counter()
        distributed = run_sequence(config, run_dir=f"{tmp}/ray", progress=False, echo=lambda s: None,
                                   coordinator_factory=ray_coordinator_factory)
        wall = time.perf_counter() - start
        ray.shutdown()
    compute, on_ray = stage_seconds(local.history), stage_seconds(distributed.history)
    print(f"{'stage':<10} {'in-process compute s':>22} {'on Ray s':>10}")
    for stage in compute:
        print(f"{stage:<10} {compute[stage]:>22.1f} {on_ray.get(stage, 0):>10.1f}")
    total = sum(compute.values())
    print(f"lifecycle wall time on Ray (incl. coordinator start): {wall:.1f} s")
    print(f"sum of stage compute time (in process):               {total:.1f} s")
    print(f"orchestration overhead ratio: {wall / total:.2f}x  ({args.tasks} tasks, adaptation on {args.adapt_on}, "
          f"{os.cpu_count()} cores)")


if __name__ == "__main__":
    main()
