"""Scale-out on a simulated multi-node cluster: the same sequence with 1, 2 and 4 workers, same results.

A `ray.cluster_utils.Cluster` of N nodes on this machine (head without CPUs, so every worker is on a
worker node) runs the same config with (training ranks, generation actors, search workers) = (w, w, w)
for each w in --workers. With `--virtual-shards V` (default 4: `train.virtual_shards`) adaptation reduces
over V fixed pieces of every batch, so the training rank count changes nothing, dropout included; with
`--virtual-shards 0` (each rank's share in one forward, the default of a run) dropout is turned off, as each
rank would draw its own masks, and the results still differ by rounding across rank counts.
Prints per run the wall time, the stage seconds by stage and whether paths, selections, pseudo-sample
counts, adaptation losses and R equal those of the first run, exactly; on 2 cores the extra workers share
the same cores, so the times show the cost of coordination, not a speed-up. The backbone is pretrained into
the runs' cache before the first timed run (the input check), so no run's wall time includes it.

    .venv/bin/python benchmarks/bench_scale_out.py [--config configs/quickstart.yaml] [--workers 1 2 4]
        [--virtual-shards 4]
"""

from __future__ import annotations

import argparse
import collections
import math
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from dmea_dist.config import load_config  # noqa: E402
from dmea_dist.driver import run_sequence  # noqa: E402
from dmea_dist.preflight import check_input, with_absolute_paths  # noqa: E402


def stage_seconds(history) -> dict[str, float]:
    out: dict[str, float] = collections.defaultdict(float)
    for h in history:
        out[h["stage"]] += h["seconds"]
    return dict(out)


def decisions(result) -> list:
    keep = {"expand": "path", "select": "selected", "generate": "pseudo_samples", "adapt": "final_losses"}
    return [(h["task_index"], h["stage"], h.get(keep[h["stage"]])) for h in result.history if h["stage"] in keep]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="configs/quickstart.yaml")
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2, 4])
    parser.add_argument("--nodes", type=int, default=2)
    parser.add_argument("--virtual-shards", type=int, default=4)
    args = parser.parse_args()
    shards = [f"train.virtual_shards={args.virtual_shards}"] + ([] if args.virtual_shards else ["model.dropout=0.0"])
    import ray
    from ray.cluster_utils import Cluster

    from dmea_dist.distributed.coordinator import connect, ray_coordinator_factory

    cpus_per_node = max(args.workers)  # logical: roles take turns on the machine's cores
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 0})
    for _ in range(args.nodes):
        cluster.add_node(num_cpus=cpus_per_node)
    cluster.wait_for_nodes()
    connect(cluster.address)
    results = []
    try:
        with tempfile.TemporaryDirectory() as tmp:
            # untimed: the input check pretrains the backbone into {tmp}/runs/_cache, which every run then loads
            # (the key holds the tiny model, tasks and seed, not the worker counts)
            check_input(with_absolute_paths(load_config(args.config, [f"output_dir={tmp}/runs", "tracking.enabled=false",
                                                                   *shards])))
            for w in args.workers:
                # One CPU share for every worker count, sized so that the largest count's 3w equal reservations
                # fit on the nodes however SPREAD lays them out (up to ceil(3w / nodes) per node). The share sets
                # each worker's torch threads (`configure_threads`), and a different thread count sums floats in
                # a different order: results are equal across worker counts at equal threads, not otherwise.
                share = math.floor(100 * cpus_per_node / math.ceil(3 * max(args.workers) / args.nodes)) / 100
                config = load_config(args.config, [
                    f"output_dir={tmp}/runs", "tracking.enabled=false", *shards,
                    f"ray.num_train_workers={w}", f"ray.train_cpus={share}", f"ray.num_generation_actors={w}",
                    f"ray.generation_cpus={share}", f"ray.num_search_workers={w}", f"ray.search_cpus={share}",
                    "ray.placement_strategy=SPREAD"])
                start = time.perf_counter()
                result = run_sequence(config, run_dir=f"{tmp}/w{w}", coordinator_factory=ray_coordinator_factory,
                                      progress=False, echo=lambda s: None)
                results.append((w, time.perf_counter() - start, result))
    finally:
        ray.shutdown()
        cluster.shutdown()
    base = results[0][2]
    print(f"{args.nodes} nodes x {cpus_per_node} logical CPUs; config {args.config}; {' '.join(shards)}; "
          f"{share} CPU ({max(1, int(share))} torch threads) per worker")
    print(f"| workers | wall s | {' | '.join(s for s in stage_seconds(base.history))} | decisions equal | "
          f"R equal (max diff) | final average |")
    print("|---|---|" + "---|" * len(stage_seconds(base.history)) + "---|---|---|")
    for w, wall, result in results:
        stages = " | ".join(f"{v:.1f}" for v in stage_seconds(result.history).values())
        diff = float(np.nanmax(np.abs(result.R - base.R)))
        same = np.array_equal(result.R, base.R, equal_nan=True)
        print(f"| {w} | {wall:.1f} | {stages} | {decisions(result) == decisions(base)} | "
              f"{'yes' if same else 'no'} ({diff:.1e}) | {result.metrics['final_average']:.2f} |")


if __name__ == "__main__":
    main()
