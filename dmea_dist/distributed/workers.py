"""`RayKernels`: the executor's search / generate / answer kernels, run as Ray work.

`InProcessExecutor` takes its heavy kernels as constructor arguments; this
factory builds distributed ones with the same contracts from a `Run`:

    kernels = RayKernels(run, num_search_workers=2, num_generation_actors=2)
    executor = InProcessExecutor(run, **kernels.executor_kwargs())
    ...
    kernels.shutdown()

* `search_fn(model, jobs, common) -> list[CandidateResult]`: candidates as
  parallel Ray tasks in a placement group (distributed/search.py);
* `generate_fn(model, requests) -> list[PseudoSamples]` and
  `answer_fn(model, requests) -> list[list[str]]`: a `GenerationPool` of
  model replicas sharing the work by task and by sample / row range
  (distributed/generation.py).

The caller owns Ray (`ray.init` / a cluster address) before the first call.
Generation and decoding settings come from the run's config (top-k of pseudo
samples, `eval.*`, `train.seed`), the same values the in-process kernels use.

Resources: the pool keeps its actors (and their CPUs) between calls by
default (`pool_lifetime="run"`: no restart, no model re-shipping), so the
search's placement group needs CPUs beyond the pool's; with
`pool_lifetime="call"` the pool is released after every call and restarted
at the next, freeing its CPUs for search and training on small machines.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Literal

import ray

from dmea_dist.distributed.generation import GenerationPool
from dmea_dist.distributed.search import check_resources, search_candidates
from dmea_dist.method.expansion import CandidateResult
from dmea_dist.method.generation import PseudoSamples
from dmea_dist.run import Run


class RayKernels:
    """Distributed search/generate/answer kernels for one run (see module docstring)."""

    def __init__(self, run: Run, *, num_search_workers: int = 1, search_cpus: float = 1.0,
                 num_generation_actors: int = 1, generation_cpus: float = 1.0,
                 placement_strategy: str = "SPREAD", min_chunk: int = 8,
                 pool_lifetime: Literal["run", "call"] = "run", ready_timeout_s: float = 120.0,
                 progress: Callable[[str, int, int], None] | None = None):
        check_resources(num_workers=num_search_workers, cpus=search_cpus, strategy=placement_strategy)
        if pool_lifetime not in ("run", "call"):
            raise ValueError(f"pool_lifetime {pool_lifetime!r} unknown; choose 'run' or 'call'")
        if min_chunk < 1:
            raise ValueError(f"min_chunk must be >= 1 (pseudo samples per generation range), got {min_chunk}")
        cfg = run.config
        self.num_search_workers, self.search_cpus = num_search_workers, search_cpus
        self.placement_strategy, self.ready_timeout_s = placement_strategy, ready_timeout_s
        self.min_chunk, self.pool_lifetime, self.progress = min_chunk, pool_lifetime, progress
        self.top_k_sampling = cfg.method.adaptation.top_k_sampling
        self.eval = cfg.eval
        self.seed = cfg.train.seed
        self.pool = GenerationPool(tokenizer=run.tokenizer, max_length=run.formatter.max_length,
                                   num_actors=num_generation_actors, cpus=generation_cpus,
                                   strategy=placement_strategy, always_sync_backbone=run.policy.full_finetune,
                                   ready_timeout_s=ready_timeout_s)
        self.search_nodes: list[str] = []  # node id of each candidate of the latest search

    @classmethod
    def from_run(cls, run: Run, **kwargs) -> RayKernels:
        """Sizes from the run's `ray:` config section (keyword arguments override)."""
        r = run.config.ray
        sizes = dict(num_search_workers=r.num_search_workers, search_cpus=r.search_cpus,
                     num_generation_actors=r.num_generation_actors, generation_cpus=r.generation_cpus)
        return cls(run, **{**sizes, **kwargs})

    def executor_kwargs(self) -> dict[str, Callable]:
        return {"search_fn": self.search_fn, "generate_fn": self.generate_fn, "answer_fn": self.answer_fn}

    def search_fn(self, model, jobs: list[dict], common: dict) -> list[CandidateResult]:
        _require_ray()
        pairs = search_candidates(model, jobs, common, num_workers=self.num_search_workers, cpus=self.search_cpus,
                                  strategy=self.placement_strategy, ready_timeout_s=self.ready_timeout_s,
                                  progress=self.progress)
        self.search_nodes = [node for _, node in pairs]
        return [result for result, _ in pairs]

    def generate_fn(self, model, requests: list[dict]) -> list[PseudoSamples]:
        _require_ray()
        try:
            return self.pool.generate(model, requests, top_k=self.top_k_sampling, batch_size=self.eval.batch_size,
                                      min_chunk=self.min_chunk, progress=self.progress)
        finally:
            self._after_call()

    def answer_fn(self, model, requests: list[dict]) -> list[list[str]]:
        _require_ray()
        ev = self.eval
        try:
            return self.pool.answer(model, requests, batch_size=ev.batch_size, max_new_tokens=ev.max_new_tokens,
                                    decoding=ev.decoding, top_k=ev.top_k, seed=self.seed, progress=self.progress)
        finally:
            self._after_call()

    def mark_backbone_changed(self) -> None:
        """Force the next call to ship the backbone too (besides the automatic checksum)."""
        self.pool.mark_backbone_changed()

    def _after_call(self) -> None:
        if self.pool_lifetime == "call":
            self.pool.shutdown()

    def shutdown(self) -> None:
        """Release the generation actors and their CPUs (Ray itself stays up)."""
        self.pool.shutdown()


def _require_ray() -> None:
    if not ray.is_initialized():
        raise RuntimeError("Ray is not initialised: call ray.init() (or connect to the cluster) before using "
                           "RayKernels, e.g. ray.init(num_cpus=2) on a laptop")
