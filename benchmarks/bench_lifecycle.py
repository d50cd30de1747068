"""Orchestration overhead: a sequence on Ray against the same sequence's compute in one process.

The same run (default: the quick start's tasks and settings) runs three times in one process: first in
process, untimed (it builds the cached backbone and warms this process: imports, DeepSpeed's op), then
side by side:
  1. in process (no Ray), one torch thread: each stage's time is pure compute;
  2. on embedded Ray, sized as `dmea run` sizes it on this machine (`cluster.sized_for`) but with one
     search worker, one generation actor and one training rank of one CPU each: the same computation
     plus scheduling, transfers and start-up.
Both skip MLflow. The Ray run is timed from before `ray.init` to `run_sequence`'s return (the driver's
own imports, done before, are not in it). A task's wall time on Ray is the time between the driver
receiving the previous task's RECORD step and this task's (the first task's from before `ray.init`): its
stages plus everything between them (the round trips of every step, the state saved after each, the
driver's per-task record). Per task it prints the in-process compute (summed stage seconds), Ray's stage
seconds, Ray's wall time and the overhead, wall minus compute. The one-time start-up is the first task's
overhead beyond the later tasks' median (Ray's start, the coordinator actor, building the run, the workers
starting; where the roles share the cores, as on a 2-core machine, the workers start during the first
adaptation: `ray.warm_up` off, distributed/kernels.py); "finish" is what follows the last task (reports,
closing the workers). The ratio is Ray's wall time without the start-up (the finish included) over the
in-process compute.

    .venv/bin/python benchmarks/bench_lifecycle.py [--config configs/quickstart.yaml] [--tasks 3]
        [--adapt-on train_group|ray_train|coordinator]
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from dmea_dist.config import load_config  # noqa: E402
from dmea_dist.driver import run_sequence  # noqa: E402


def per_task(history) -> list[float]:
    out: dict[int, float] = {}
    for h in history:
        out[h["task_index"]] = out.get(h["task_index"], 0.0) + h["seconds"]
    return [out[k] for k in sorted(out)]


def per_stage(history) -> dict[str, list[float]]:
    """Seconds of each stage, one entry per task (in task order)."""
    out: dict[str, dict[int, float]] = {}
    for h in history:
        row = out.setdefault(h["stage"], {})
        row[h["task_index"]] = row.get(h["task_index"], 0.0) + h["seconds"]
    return {stage: [row[k] for k in sorted(row)] for stage, row in out.items()}


def figures(compute: list[float], task_ends: list[float], start: float, end: float) -> dict:
    """Wall-time figures of the Ray run from the in-process compute per task and the driver's clock: `start`
    before `ray.init`, `task_ends[k]` when task k's RECORD step returned, `end` when the run returned."""
    walls = [b - a for a, b in zip([start, *task_ends[:-1]], task_ends, strict=True)]
    overhead = [w - c for w, c in zip(walls, compute, strict=True)]
    later = statistics.median(overhead[1:]) if len(overhead) > 1 else 0.0
    startup = overhead[0] - later
    wall = end - start
    return {"walls": walls, "overhead": overhead, "later": later, "startup": startup,
            "finish": end - task_ends[-1], "wall": wall, "ratio": (wall - startup) / sum(compute)}


class StampedCoordinator:
    """A coordinator whose `step` notes when each task's RECORD step came back to the driver."""

    def __init__(self, inner, stamps: list[float]):
        self._inner, self._stamps = inner, stamps

    def step(self):
        out = self._inner.step()
        if out.get("record") is not None:
            self._stamps.append(time.perf_counter())
        return out

    def __getattr__(self, name):
        return getattr(self._inner, name)


def print_stages(local, distributed) -> None:
    """Where Ray's overhead sits: per stage, the first task that ran it against the median of the later ones
    (a kernel's pool starts at its first use: the search pool at the second task's expansion)."""
    compute, on_ray = per_stage(local), per_stage(distributed)
    print(f"\n{'stage':<10} {'in process s':>13} {'on Ray s':>9} {'overhead at first use s':>24} "
          f"{'median overhead after s':>24}")
    for stage, c in compute.items():
        r = on_ray[stage]
        # a stage that does no work on the first task (no search, no generation) has nothing to start there
        first = next((i for i, x in enumerate(c) if x > 0.05), 0)
        over = [b - a for a, b in zip(c, r, strict=True)]
        later = statistics.median(over[first + 1:]) if len(over) > first + 1 else 0.0
        print(f"{stage:<10} {sum(c):>13.1f} {sum(r):>9.1f} {over[first]:>24.2f} {later:>24.2f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="configs/quickstart.yaml")
    parser.add_argument("--tasks", type=int, default=None, help="the first N tasks of the config (default: all)")
    parser.add_argument("--adapt-on", choices=["train_group", "ray_train", "coordinator"], default="train_group",
                        help="train_group: ranks started once per run (default); ray_train: a TorchTrainer per task; "
                             "coordinator: adaptation in the coordinator actor")
    args = parser.parse_args()
    import ray

    from dmea_dist.distributed.cluster import connect, logical_cpus, sized_for
    from dmea_dist.distributed.coordinator import ray_coordinator_factory

    with tempfile.TemporaryDirectory() as tmp:
        base = load_config(args.config, [f"output_dir={tmp}/runs", "tracking.enabled=false",
                                         f"ray.adapt_on={args.adapt_on}", "ray.num_search_workers=1",
                                         "ray.num_generation_actors=1", "ray.num_train_workers=1"])
        tasks = list(base.data.tasks)[: args.tasks] if args.tasks else list(base.data.tasks)
        config = load_config(args.config, [f"output_dir={tmp}/runs", "tracking.enabled=false",
                                           f"ray.adapt_on={args.adapt_on}", "ray.num_search_workers=1",
                                           "ray.num_generation_actors=1", "ray.num_train_workers=1",
                                           f"data.tasks=[{','.join(tasks)}]"])
        config = dataclasses.replace(config, ray=sized_for(config.ray, None))  # as `dmea run` on this machine
        torch.set_num_threads(1)
        quiet = {"progress": False, "echo": lambda s: None}
        run_sequence(config, run_dir=f"{tmp}/warm", **quiet)  # builds the cached backbone, warms DeepSpeed's op
        local = run_sequence(config, run_dir=f"{tmp}/local", **quiet)
        stamps: list[float] = []

        def factory(*a, **kw):
            return StampedCoordinator(ray_coordinator_factory(*a, **kw), stamps)

        start = time.perf_counter()
        connect(None, num_cpus=logical_cpus(config.ray), dashboard=config.ray.dashboard)
        started = time.perf_counter()
        distributed = run_sequence(config, run_dir=f"{tmp}/ray", coordinator_factory=factory, **quiet)
        end = time.perf_counter()
        ray.shutdown()
    compute, on_ray = per_task(local.history), per_task(distributed.history)
    f = figures(compute, stamps, start, end)
    print(f"ray: {config.ray.layout()}; warm_up {config.ray.warm_up}")
    print(f"{'task':<24} {'in process s':>13} {'Ray stages s':>13} {'Ray wall s':>11} {'overhead s':>11}")
    for name, c, r, w, o in zip(tasks, compute, on_ray, f["walls"], f["overhead"], strict=True):
        print(f"{name:<24} {c:>13.1f} {r:>13.1f} {w:>11.1f} {o:>11.1f}")
    print(f"Ray wall time {f['wall']:.1f} s (ray.init {started - start:.1f} s); outside the stages "
          f"{f['wall'] - sum(on_ray):.1f} s; after the last task (reports, closing) {f['finish']:.1f} s")
    print(f"one-time start-up: {f['startup']:.1f} s; per-task overhead after it, wall minus compute (median of "
          f"tasks 2..): {f['later']:.2f} s")
    print_stages(local.history, distributed.history)
    print(f"ratio, Ray wall time without the start-up / in-process compute: {f['ratio']:.2f}x "
          f"({len(tasks)} tasks, adaptation on {args.adapt_on}, {os.cpu_count()} cores, load "
          f"{os.getloadavg()[0]:.1f})")


if __name__ == "__main__":
    main()
