"""What an expansion search costs beyond its compute as the backbone grows, checkouts side by side.

Each consecutive search of a run (one per task) must bring the search workers to the coordinator's
model. Measured here: the wall time of `RayKernels.search` for `--tasks` consecutive searches of the same
two candidates on one embedded Ray (two workers of 1 CPU), against the slowest of them run in process
(`run_search_job` on a deep copy, one thread: what two parallel workers need at least), for a backbone of
`--layers` x `--width` (random weights: only their size matters; 12 x 768 is GPT-2 small's body). The
first search includes starting the workers; "later" is the median of the others, what every further
task of a long run pays.

    .venv/bin/python benchmarks/bench_search_sync.py --code ../before,.          # two checkouts, alternating
    .venv/bin/python benchmarks/bench_search_sync.py --layers 4 --width 64       # the quick start's size

Each checkout runs in a fresh process with it as working directory and PYTHONPATH (`--measure` is that
process); checkouts alternate per repeat, so drift of a shared machine hits both alike.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def measure(args) -> dict:
    """In this process, on this checkout: the first search's s, the later ones' median s, the slowest candidate's
    s in process."""
    import ray
    import torch

    from dmea_dist import stages
    from dmea_dist.config import config_from_dict
    from dmea_dist.coordinator import decoding_settings, engine_settings, in_process_kernels
    from dmea_dist.distributed.kernels import RayKernels
    from dmea_dist.kernels import run_search_job
    from dmea_dist.run import build_run
    from dmea_dist.state import RunState

    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as tmp:
        config = config_from_dict({
            "name": "bench", "output_dir": tmp,
            "data": {"tasks": ["synth.restaurant.00", "synth.restaurant.01"], "synth_sizes": [8, 4, 4],
                     "overlength": "truncate"},
            "model": {"tiny": {"n_layer": args.layers, "n_embd": args.width, "n_head": max(1, args.width // 64),
                               "n_positions": 64, "vocab_size": 400, "pretrain": {"corpus": "none"}},
                      "max_length": 48, "bottleneck": 32},
            "train": {"batch_size": 4},
            "method": {"expansion": {"epochs": 1, "warmup_epochs": 0,
                                     "candidates": [{}, {"beta": 0.3, "seed": 1}]}},
            "eval": {"batch_size": 4},
            "tracking": {"enabled": False},
        })
        run = build_run(config, run_dir=Path(tmp) / "bench")
        captured, reference = {}, in_process_kernels(run)

        class Capture:  # keeps the second task's search arguments
            def search(self, model, jobs, data):
                captured.update(model=copy.deepcopy(model), jobs=list(jobs), data=data)
                return reference.search(model, jobs, data)

        ctx = stages.RunContext(run=run, state=RunState.new(list(config.data.tasks)), kernels=Capture(),
                                settings=stages.StageSettings.from_config(config))
        for task in run.tasks:
            stages.expand(ctx, task)
        model, jobs, data = captured["model"], captured["jobs"], captured["data"]
        params = sum(p.numel() for p in model.backbone.parameters())

        ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
        kernels = RayKernels(tokenizer=run.tokenizer, max_length=run.formatter.max_length,
                             engine=engine_settings(config), decoding=decoding_settings(config),
                             sizes=dataclasses.replace(config.ray, num_search_workers=2, search_cpus=1),
                             storage_path=Path(tmp) / "_ray_train")
        try:
            walls = []
            for _ in range(args.tasks):
                start = time.perf_counter()
                kernels.search(model, jobs, data)
                walls.append(time.perf_counter() - start)
        finally:
            kernels.close()
            ray.shutdown()
        in_process = 0.0  # the slowest candidate: what two parallel workers need at least
        for job in jobs:
            start = time.perf_counter()
            run_search_job(copy.deepcopy(model), job, data)
            in_process = max(in_process, time.perf_counter() - start)
    return {"first": walls[0], "later": statistics.median(walls[1:]), "in_process": in_process,
            "params": params, "candidates": len(jobs)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--code", default=".", help="comma-separated checkouts to compare")
    ap.add_argument("--layers", type=int, default=12)
    ap.add_argument("--width", type=int, default=768)
    ap.add_argument("--tasks", type=int, default=4, help="consecutive searches per measurement")
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--measure", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.measure:
        print(json.dumps(measure(args)))
        return
    codes = [Path(c).resolve() for c in args.code.split(",")]
    rows: dict[Path, list[dict]] = {c: [] for c in codes}
    for _ in range(args.repeats):
        for code in codes:
            env = {**os.environ, "PYTHONPATH": str(code), "DS_ACCELERATOR": "cpu", "TOKENIZERS_PARALLELISM": "false"}
            cmd = [sys.executable, str(Path(__file__).resolve()), "--measure", "--layers", str(args.layers),
                   "--width", str(args.width), "--tasks", str(args.tasks)]
            out = subprocess.run(cmd, cwd=code, env=env, capture_output=True, text=True)
            if out.returncode != 0:
                raise SystemExit(f"{code}: {out.stderr[-3000:]}")
            rows[code].append(json.loads(out.stdout.strip().splitlines()[-1]))
            print(f"  {code.name}: {rows[code][-1]}", file=sys.stderr, flush=True)
    some = next(iter(rows.values()))[0]
    print(f"backbone {args.layers} x {args.width} ({some['params'] / 1e6:.1f}M parameters), "
          f"{some['candidates']} candidates, 2 search workers of 1 CPU, {args.tasks} consecutive searches, "
          f"median of {args.repeats} runs per checkout")
    print("| checkout | first search s | each later search s | slowest candidate in process s | later - in process s |")
    print("| --- | --- | --- | --- | --- |")
    for code, runs in rows.items():
        med = {k: statistics.median(r[k] for r in runs) for k in ("first", "later", "in_process")}
        print(f"| {code.name} | {med['first']:.2f} | {med['later']:.2f} | {med['in_process']:.2f} | "
              f"{med['later'] - med['in_process']:.2f} |")


if __name__ == "__main__":
    main()
