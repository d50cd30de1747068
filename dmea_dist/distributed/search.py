"""Expansion candidates as parallel Ray tasks (the EXPAND stage's search).

`search_candidates(model, jobs, data, ...)` has the contract of the
in-process kernel's search: one `CandidateResult` per `SearchJob`, in job
order, each `kernels.run_search_job(<copy of model>, job, data)`, paired with
the id of the node that ran it.

Key decisions:
- The model (as a plain snapshot: config and tensors, see
  `generation_pool.model_snapshot`) and the `SearchData` (the task's batches
  and hyperparameters) go to the object store once (`ray.put`); every task
  reads the same two objects and builds its own model from the snapshot,
  which is the copy `search_candidate` mutates (in-process: a deep copy).
- At most `num_workers` candidates run at once, each in its own bundle of a
  placement group of `{CPU: cpus}` bundles (SPREAD by default, so candidates
  land on different nodes; PACK to keep them together). A finished
  candidate's bundle takes the next one. The group is released at the end.
- Each task sets torch's threads to its CPU share (and OMP_NUM_THREADS via its
  runtime_env): on a shared CPU, more threads than cores makes every
  candidate many times slower.
- `search_candidate` is deterministic given its seed (it seeds torch and the
  new modules' generator itself), so results equal the in-process search
  (tested: same paths, losses and weights to 1e-6). Float results could in
  principle depend on the thread count; on the tiny model 1 and 2 threads
  gave bit-identical candidates.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import ray
from ray.util.placement_group import remove_placement_group
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

from dmea_dist.distributed.cluster import configure_threads, reserve, worker_env
from dmea_dist.distributed.generation_pool import build_model, model_snapshot
from dmea_dist.kernels import SearchData, SearchJob, run_search_job
from dmea_dist.method.expansion import CandidateResult

STRATEGIES = ("SPREAD", "PACK", "STRICT_SPREAD", "STRICT_PACK")


def run_candidate(snapshot: dict[str, Any], job: SearchJob, data: SearchData, *,
                  cpus: float) -> tuple[CandidateResult, str]:
    """Body of one search task: (the candidate's result, the id of the node it ran on)."""
    configure_threads(cpus)
    result = run_search_job(build_model(snapshot), job, data)
    return result, ray.get_runtime_context().get_node_id()


def _ready(*after: Any) -> str:
    """A search worker's first task: its process is up and this module (torch, transformers) imported.
    `after`: values of the refs it waited for (Ray runs it only once they are ready), unused."""
    return ray.get_runtime_context().get_node_id()


def warm_search_workers(num_workers: int, *, cpus: float, after: Sequence = ()) -> list:
    """Start `num_workers` search worker processes, without waiting (refs of their first, empty task);
    with `after` (object refs), once those are ready.

    Ray keeps a task's worker process for later tasks with the same runtime environment, so the first
    search (at the second task) finds processes with their imports done instead of starting them.
    """
    task = ray.remote(_ready)
    return [task.options(num_cpus=cpus, num_gpus=0, runtime_env={"env_vars": worker_env(cpus)}).remote(*after)
            for _ in range(num_workers)]


def search_candidates(model, jobs: Sequence[SearchJob], data: SearchData, *, num_workers: int = 1,
                      cpus: float = 1.0, strategy: str = "SPREAD", ready_timeout_s: float = 120.0,
                      progress: Callable[[str, int, int], None] | None = None
                      ) -> list[tuple[CandidateResult, str]]:
    """Search every job as a Ray task, `num_workers` at a time; (result, node id) in job order."""
    check_resources(num_workers=num_workers, cpus=cpus, strategy=strategy)
    if not jobs:
        return []
    n_bundles = min(num_workers, len(jobs))
    pg = reserve(n_bundles, cpus=cpus, strategy=strategy, timeout_s=ready_timeout_s, what="the expansion search")
    try:
        model_ref, data_ref = ray.put(model_snapshot(model)), ray.put(data)  # once, shared by every candidate
        task = ray.remote(run_candidate)
        results: list[Any] = [None] * len(jobs)
        running: dict[Any, tuple[int, int]] = {}  # ref -> (job index, bundle)
        free, queue = list(range(n_bundles)), list(range(len(jobs)))
        while queue or running:
            while queue and free:
                index, bundle = queue.pop(0), free.pop(0)
                ref = task.options(
                    num_cpus=cpus, num_gpus=0, runtime_env={"env_vars": worker_env(cpus)},
                    scheduling_strategy=PlacementGroupSchedulingStrategy(pg, placement_group_bundle_index=bundle),
                ).remote(model_ref, jobs[index], data_ref, cpus=cpus)
                running[ref] = (index, bundle)
            (ref,), _ = ray.wait(list(running), num_returns=1)
            index, bundle = running.pop(ref)
            results[index] = ray.get(ref)
            free.append(bundle)
            if progress:
                progress("search", len(jobs) - len(queue) - len(running), len(jobs))
    finally:
        remove_placement_group(pg)  # also ends tasks still running after an error
    return results


def check_resources(*, num_workers: int, cpus: float, strategy: str) -> None:
    if not isinstance(num_workers, int) or num_workers < 1:
        raise ValueError(f"num_search_workers must be an int >= 1, got {num_workers!r}")
    if cpus <= 0:
        raise ValueError(f"search_cpus must be > 0, got {cpus!r}")
    if strategy not in STRATEGIES:
        raise ValueError(f"placement strategy {strategy!r} unknown; choose one of {list(STRATEGIES)}")
