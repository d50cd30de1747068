"""Ray kernels: parallel expansion search and the generation pool, against their sequential forms.

Side by side in one run, on one embedded Ray:

* search: the same C candidates (C = --candidates) of one EXPAND stage, in
  parallel (C search actors of 1 CPU) vs in sequence (1 search actor), plus the
  in-process loop (1 thread) for reference; wall seconds and speedup;
* generation: the same pseudo-sample requests (--requests x --samples) by a
  pool of 2 actors vs 1 actor (1 CPU each); generated samples/s and speedup.

    .venv/bin/python benchmarks/bench_ray_workers.py [--candidates 2] [--epochs 6] [--samples 48] [--repeats 3]

Sides are interleaved per repeat (machine-load drift hits both) and the
median is printed; pool start-up is excluded (warm-up call first). Both
pools of a kind stay up during the measurement (Ray gets max(C + 1, 3) logical
CPUs for that), but only one works at a time. The run is a tiny GPT-2 (--layers x --width) on two synthetic tasks,
built in a temporary directory; its task-0 modules are untrained, so most
samples run to the full token budget: a fixed cost per sample on both sides.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import os
import statistics
import tempfile
import time
from pathlib import Path

import ray
import torch

from dmea_dist import stages
from dmea_dist.config import config_from_dict
from dmea_dist.coordinator import decoding_settings, engine_settings, in_process_kernels
from dmea_dist.distributed.kernels import RayKernels
from dmea_dist.kernels import GenerateRequest, run_search_job
from dmea_dist.run import build_run
from dmea_dist.state import RunState


def build(root: Path, args) -> tuple:
    """(run, captured search arguments of task 1) for a tiny two-task run."""
    config = config_from_dict({
        "name": "bench", "output_dir": str(root),
        "data": {"tasks": ["synth.restaurant.00", "synth.listops.00"], "synth_sizes": [args.train, 16, 16],
                 "overlength": "truncate"},
        "model": {"tiny": {"n_layer": args.layers, "n_embd": args.width, "n_head": 4, "n_positions": 128,
                           "vocab_size": 500, "pretrain": {"steps": 50, "batch_size": 16, "seq_len": 64,
                                                           "heldout_tasks": 1}},
                  "max_length": args.max_length, "bottleneck": args.width // 2},
        "train": {"batch_size": 16},
        "method": {"expansion": {"epochs": args.epochs, "warmup_epochs": 1,
                                 "candidates": [{"beta": 0.15 * (1 + i), "seed": i} for i in range(args.candidates)]}},
        "eval": {"batch_size": 32},
        "tracking": {"enabled": False},
    })
    run = build_run(config, run_dir=root / "bench")
    captured = {}
    reference = in_process_kernels(run)

    class Capture:  # keeps the arguments; searches one candidate to finish EXPAND quickly
        def search(self, model, jobs, data):
            captured.update(model=copy.deepcopy(model), jobs=list(jobs), data=data)
            return reference.search(model, jobs[:1], data)

    ctx = stages.RunContext(run=run, state=RunState.new(list(config.data.tasks)), kernels=Capture(),
                            settings=stages.StageSettings.from_config(config))
    stages.expand(ctx, run.tasks[0])
    stages.expand(ctx, run.tasks[1])
    return run, captured


def ray_kernels(run, **sizes) -> RayKernels:
    return RayKernels(tokenizer=run.tokenizer, max_length=run.formatter.max_length, engine=engine_settings(run.config),
                      decoding=decoding_settings(run.config), sizes=dataclasses.replace(run.config.ray, **sizes),
                      storage_path=run.run_dir / "_ray_train")


def timed(fn) -> tuple[float, object]:
    start = time.perf_counter()
    out = fn()
    return time.perf_counter() - start, out


def bench_search(run, cap, repeats: int, candidates: int) -> dict[str, list[float]]:
    parallel = ray_kernels(run, num_search_workers=candidates, search_cpus=1)
    sequence = ray_kernels(run, num_search_workers=1, search_cpus=1)
    args = (cap["model"], cap["jobs"], cap["data"])
    times: dict[str, list[float]] = {"parallel": [], "sequence": [], "in-process": []}
    try:
        for kernels in (parallel, sequence):  # warm-up: starts the search actors
            kernels.search(*args)
        for _ in range(repeats):
            t, par = timed(lambda: parallel.search(*args))
            times["parallel"].append(t)
            t, seq = timed(lambda: sequence.search(*args))
            times["sequence"].append(t)
            t, _ = timed(lambda: [run_search_job(copy.deepcopy(args[0]), job, args[2]) for job in args[1]])
            times["in-process"].append(t)
            assert [r.path for r in par] == [r.path for r in seq]
    finally:
        parallel.close()
        sequence.close()
    return times


def bench_generation(run, requests, repeats: int) -> dict[str, list[float]]:
    """Generated samples/s of a 2-actor and a 1-actor pool, interleaved; pool start-up untimed."""
    pools = {"2 actors": ray_kernels(run, num_generation_actors=2, generation_cpus=1),
             "1 actor": ray_kernels(run, num_generation_actors=1, generation_cpus=1)}
    rates: dict[str, list[float]] = {name: [] for name in pools}
    try:
        for kernels in pools.values():  # start + warm every actor
            kernels.generate(run.model, [dataclasses.replace(requests[0], n=8 * kernels.pool.num_actors)])
        for _ in range(repeats):
            for name, kernels in pools.items():
                t, out = timed(lambda k=kernels: k.generate(run.model, requests))
                rates[name].append(sum(o.generated for o in out) / t)
    finally:
        for kernels in pools.values():
            kernels.close()
    return rates


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--candidates", type=int, default=2)
    parser.add_argument("--epochs", type=float, default=6.0)
    parser.add_argument("--train", type=int, default=192)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--width", type=int, default=64)
    parser.add_argument("--max-length", type=int, default=64)
    parser.add_argument("--requests", type=int, default=2)
    parser.add_argument("--samples", type=int, default=48)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    torch.set_num_threads(1)  # the in-process reference gets one core, as each Ray worker does

    with tempfile.TemporaryDirectory() as tmp:
        run, cap = build(Path(tmp), args)
        # logical CPUs: both search pools (C + 1 actors), then both generation pools (3 actors), stay up, but
        # only one pool works at a time
        num_cpus = max(args.candidates + 1, 3)
        ray.init(address="local", num_cpus=num_cpus, include_dashboard=False, log_to_driver=False)
        try:
            search = bench_search(run, cap, args.repeats, args.candidates)
            path = run.model.path_of("synth.restaurant.00")
            requests = [GenerateRequest(task_id="synth.restaurant.00", task_index=0, path=path, n=args.samples, seed=i)
                        for i in range(args.requests)]
            generation = bench_generation(run, requests, args.repeats)
        finally:
            ray.shutdown()

    med = {k: statistics.median(v) for k, v in {**search, **generation}.items()}
    load = ", ".join(f"{x:.1f}" for x in os.getloadavg())
    print(f"machine: {os.cpu_count()} cores (load average {load} at the end); ray num_cpus={num_cpus} (logical); "
          f"model {args.layers}x{args.width}; median of {args.repeats}")
    print(f"search, {args.candidates} candidates x {len(cap['data'].train)} batches x "
          f"{args.epochs:g} epochs:")
    for name in ("parallel", "sequence", "in-process"):
        print(f"  {name:<11} {med[name]:7.2f} s   (runs: {', '.join(f'{t:.2f}' for t in search[name])})")
    print(f"  speedup parallel / sequence: {med['sequence'] / med['parallel']:.2f}x")
    print(f"generation, {args.requests} requests x {args.samples} samples:")
    for name in ("2 actors", "1 actor"):
        print(f"  {name:<9} {med[name]:7.1f} samples/s   (runs: {', '.join(f'{r:.1f}' for r in generation[name])})")
    print(f"  speedup 2 actors / 1 actor: {med['2 actors'] / med['1 actor']:.2f}x")


if __name__ == "__main__":
    main()
