"""Expansion candidates on a pool of long-lived search actors (the EXPAND stage's search).

`SearchPool.search(model, jobs, data)` has the contract of the in-process
kernel's search: one `CandidateResult` per `SearchJob`, in job order, each
`kernels.run_search_job(<copy of model>, job, data)`, paired with the id of the
node that ran it.

Key decisions:
- The actors live for the run, like the generation actors (it is the same
  pool, `generation_pool.GenerationPool`, with actors that also search): each
  holds a model replica, built once from a snapshot, and before every search
  the pool sends what changed since the last one: the module pools, paths and
  `next_ids` (adapter-sized), the backbone only when its checksum moved. A run's
  expansions thus ship the backbone once, not once per task (a whole snapshot
  per expansion was ~3 GB of object store and a model build per candidate for
  gpt2-large). The price: each actor keeps its replica in memory for the run,
  as a generation actor does, where search tasks held one only while they ran.
- A candidate runs on the replica itself, and the replica is then put back to
  the state last synced (`apply_model_state`: every module rebuilt from the
  synced tensors, the candidate's new modules dropped, `next_ids` and token
  rows restored; the backbone is frozen in a search). So each candidate starts
  from exactly the coordinator's model, as the in-process kernel's deep copy
  does (tested: same paths, losses and weights, also for a replica that ran
  other candidates before).
- Job i goes to actor i mod n, and each actor runs its jobs one after another;
  `search_candidate` is deterministic given its seed (it seeds torch and the new
  modules' generator itself), so which actor runs a job, and how many there
  are, never changes a result.
- Each actor reserves `{CPU: cpus}` in the pool's placement group (SPREAD by
  default, so candidates land on different nodes) and sets torch's threads to
  that share: on a shared CPU, more threads than cores makes every candidate
  many times slower.
- An actor lost mid-search (process or node) gets the pool rebuilt and the
  search redone (`GenerationPool._run`).
- With `ray.shared_replicas` (the default where the roles take turns on the
  same cores) this pool is also the run's generation pool: the stages run one
  after another, so the same replicas generate, evaluate and search
  (`RayKernels`).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import ray

from dmea_dist.distributed.generation_pool import (
    GenerationPool,
    GenerationWorker,
    apply_model_state,
)
from dmea_dist.kernels import SearchData, SearchJob, run_search_job
from dmea_dist.method.expansion import CandidateResult

STRATEGIES = ("SPREAD", "PACK", "STRICT_SPREAD", "STRICT_PACK")


class SearchWorker(GenerationWorker):
    """A model replica that runs expansion candidates on itself (a Ray actor; also runs in-process)."""

    def __init__(self, snapshot: dict[str, Any], *args: Any, **kwargs: Any):
        super().__init__(snapshot, *args, **kwargs)
        self._synced = _without_backbone(snapshot)

    def sync(self, state: dict[str, Any]) -> None:
        super().sync(state)
        self._synced = _without_backbone(state)

    def search(self, job: SearchJob, data: SearchData) -> tuple[CandidateResult, str]:
        """(one candidate's result, the id of the node it ran on); the replica is as synced after."""
        try:
            result = run_search_job(self.model, job, data)
        finally:
            apply_model_state(self.model, self._synced)  # drops the candidate's modules, rebuilds the others
        return result, ray.get_runtime_context().get_node_id()


def _without_backbone(state: dict[str, Any]) -> dict[str, Any]:
    """What puts a replica back after a candidate: its modules, paths and next_ids (a search leaves the frozen
    backbone as it was)."""
    return {"modules": state["modules"], "paths": state["paths"], "next_ids": state["next_ids"], "backbone": None}


class SearchPool(GenerationPool):
    """`num_actors` long-lived search actors (see module docstring); started by `start` or the first search."""

    worker_class = SearchWorker
    role = "the expansion search"

    def search(self, model, jobs: Sequence[SearchJob], data: SearchData, *,
               progress: Callable[[str, int, int], None] | None = None) -> list[tuple[CandidateResult, str]]:
        """Every job on the actors (job i on actor i mod n), after bringing them to `model`; in job order."""
        jobs = list(jobs)
        if not jobs:
            return []
        data_ref = ray.put(data)  # once, read by every candidate
        outs = self._run(model, list(range(len(jobs))), lambda i: self.actors[i % self.num_actors].search.remote(
            jobs[i], data_ref), label="search", progress=progress)
        return [outs[i] for i in range(len(jobs))]


def check_resources(*, num_workers: int, cpus: float, strategy: str) -> None:
    if not isinstance(num_workers, int) or num_workers < 1:
        raise ValueError(f"num_search_workers must be an int >= 1, got {num_workers!r}")
    if cpus <= 0:
        raise ValueError(f"search_cpus must be > 0, got {cpus!r}")
    if strategy not in STRATEGIES:
        raise ValueError(f"placement strategy {strategy!r} unknown; choose one of {list(STRATEGIES)}")
