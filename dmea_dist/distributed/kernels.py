"""`RayKernels`: the four kernels of a run (dmea_dist.kernels.Kernels) as Ray work.

* search: candidates in parallel on a `SearchPool` of model replicas (distributed/search.py), kept for
  the whole run and brought to the coordinator's model by module deltas;
* generate / answer: a `GenerationPool` of model replicas sharing the work by task and
  by sample / row range (distributed/generation_pool.py), kept for the whole run;
  with `ray.shared_replicas` (by default where the roles take turns on the same
  cores) one `SearchPool` serves search, generation and evaluation: the stages
  run one after another, so one set of replicas, one process each, does;
* adapt: a training group of `num_train_workers` DeepSpeed ranks started once
  and kept for the run (distributed/train_group.py, the default), a Ray Train
  `TorchTrainer` per task (distributed/train_workers.py, `adapt_on:
  ray_train`), or the coordinator's own process (`adapt_on: coordinator`).

Built by `ray_kernels(run, progress)` inside the coordinator (on a cluster,
the coordinator actor) from the run's config, resolved here into plain
settings: search actors, generation actors and training workers receive
values (`SearchJob`, `DecodingSettings`, `EngineSettings`), never a config.
With `ray.warm_up`, `ray_kernels` also starts every worker at once
(`RayKernels.warm_up`), without waiting for them, so that their start-up
overlaps the run's set-up. Without it (the roles take turns on the same
cores, e.g. an embedded Ray on a laptop) the workers start in turn: the
training ranks first (`dmea run` launches them from the driver while this
coordinator starts, `ranks`; else at the first adaptation), and at the first
adaptation, once they are up, the generation actors, then the search actors
once the generation actors are (`_start_the_rest`):
adaptation runs one thread, so their imports use the core it leaves idle
instead of the later stages' time (on the quick start the first evaluation
and the second task's search no longer start processes: docs/BENCHMARKS.md).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import ray
import torch
from ray.exceptions import RayActorError

from dmea_dist.config import RayConfig
from dmea_dist.distributed.cluster import (
    RESERVE_TIMEOUT_S,
    Progress,
    actors_peak_memory,
    raise_constructor_error,
    require_ray,
)
from dmea_dist.distributed.generation_pool import GenerationPool
from dmea_dist.distributed.search import SearchPool, check_resources
from dmea_dist.distributed.train_group import LaunchedRanks, TrainGroup
from dmea_dist.distributed.train_workers import RayTrainAdapter
from dmea_dist.errors import ConfigError
from dmea_dist.kernels import AnswerRequest, GenerateRequest, SearchData, SearchJob
from dmea_dist.method.adaptation import AdaptJob, AdaptResult, run_adapt_job
from dmea_dist.method.expansion import CandidateResult
from dmea_dist.method.generation import PseudoSamples
from dmea_dist.settings import DecodingSettings, EngineSettings, decoding_settings, engine_settings


@dataclass
class Placement:
    """Node ids where search candidates, generation actors and training workers ran so far."""

    search: set[str] = field(default_factory=set)
    generation: set[str] = field(default_factory=set)
    train: set[str] = field(default_factory=set)
    generation_actors: int = 0  # the most generation actors and training ranks that served one call
    train_ranks: int = 0

    def as_dict(self) -> dict[str, Any]:
        return {"search": sorted(self.search), "generation": sorted(self.generation), "train": sorted(self.train),
                "generation_actors": self.generation_actors, "train_ranks": self.train_ranks}

    def saw_generation(self, nodes: list[str]) -> None:
        self.generation.update(nodes)
        self.generation_actors = max(self.generation_actors, len(nodes))

    def saw_train(self, nodes: list[str]) -> None:
        self.train.update(nodes)
        self.train_ranks = max(self.train_ranks, len(nodes))


class RayKernels:
    """The kernels as Ray work, sized by `sizes` (the config's `ray:` section)."""

    def __init__(self, *, tokenizer, max_length: int, engine: EngineSettings, decoding: DecodingSettings,
                 sizes: RayConfig, storage_path: str | Path, full_finetune: bool = False,
                 ready_timeout_s: float = RESERVE_TIMEOUT_S, progress: Progress | None = None,
                 ranks: LaunchedRanks | None = None):
        sizes = sizes.sized(local_cores=None)  # unset: 1 search worker (the CLI sizes it for where it runs)
        check_resources(num_workers=sizes.num_search_workers, cpus=sizes.search_cpus,
                        strategy=sizes.placement_strategy)
        self.sizes, self.engine, self.progress = sizes, engine, progress
        common = dict(tokenizer=tokenizer, max_length=max_length, decoding=decoding, strategy=sizes.placement_strategy,
                      always_sync_backbone=full_finetune, ready_timeout_s=ready_timeout_s)
        if sizes.shared_replicas:  # one pool serves both (config.RayConfig.shared_replicas)
            self.pool = self.search_pool = SearchPool(num_actors=sizes.replicas(), cpus=sizes.search_cpus, **common)
            self.pool.role = "the search and generation actors"
        else:
            self.pool = GenerationPool(num_actors=sizes.num_generation_actors, cpus=sizes.generation_cpus, **common)
            self.search_pool = SearchPool(num_actors=sizes.num_search_workers, cpus=sizes.search_cpus, **common)
        self.trainer, self.group = None, None
        if sizes.adapt_on == "ray_train":
            self.trainer = RayTrainAdapter(engine, num_workers=sizes.num_train_workers,
                                           cpus_per_worker=sizes.train_cpus, use_gpu=sizes.use_gpu,
                                           storage_path=storage_path, placement_strategy=sizes.placement_strategy,
                                           max_failures=sizes.max_failures, progress=progress)
        elif sizes.adapt_on == "train_group":
            self.group = TrainGroup(engine, num_workers=sizes.num_train_workers, cpus_per_worker=sizes.train_cpus,
                                    use_gpu=sizes.use_gpu, placement_strategy=sizes.placement_strategy,
                                    max_failures=sizes.max_failures, ready_timeout_s=ready_timeout_s,
                                    progress=progress)
        if ranks is not None:  # launched by the driver before the model existed (distributed/train_group.py)
            if self.group is not None and self.group.fits(ranks):
                self.group.adopt(ranks)
            else:
                ranks.release()
        self.placement = Placement()
        self._in_turn = not sizes.warm_up  # the first adaptation starts the other workers (`_start_the_rest`)

    def warm_up(self, model) -> None:
        """Start the run's workers now, without waiting for them: the generation actors, the training ranks
        (which also join their process group) and the search actors. Their start-up (processes, imports,
        replicas) then overlaps the run's own set-up instead of its first tasks; errors surface at first use."""
        require_ray()
        if not self.pool.started:
            self.pool.start(model)
        if self.group is not None and not self.group.started:
            self.group.launch(model)
        if not self.search_pool.started:
            self.search_pool.start(model)

    def _start_the_rest(self, model) -> None:
        """Start the training ranks and wait for them; then, without waiting, the generation actors and,
        once those are up, the search actors (module docstring: in turn)."""
        try:
            self.group.start(model)
        except RayActorError as err:  # a rank died before its first job: the job launches a fresh group
            self.group.shutdown()
            if err.actor_init_failed:  # its constructor raised: a fresh group's would too
                raise_constructor_error(err)
                raise
        if not self.pool.started:
            self.pool.start(model)
        if not self.search_pool.started:
            ready = [actor.node_id.remote() for actor in self.pool.actors]  # resolved once the actors are up
            self.search_pool.start(model, after=ready)

    def search(self, model, jobs: Sequence[SearchJob], data: SearchData) -> list[CandidateResult]:
        require_ray()
        pairs = self.search_pool.search(model, jobs, data, progress=self.progress)
        self.placement.search.update(node for _, node in pairs)
        return [result for result, _ in pairs]

    def generate(self, model, requests: Sequence[GenerateRequest]) -> list[PseudoSamples]:
        require_ray()
        out = self.pool.generate(model, requests, progress=self.progress)
        self.placement.saw_generation(self.pool.node_ids())
        return out

    def answer(self, model, requests: Sequence[AnswerRequest]) -> list[list[str]]:
        require_ray()
        out = self.pool.answer(model, requests, progress=self.progress)
        self.placement.saw_generation(self.pool.node_ids())
        return out

    def adapt(self, model, job: AdaptJob, *, checkpoint_dir: Path | None = None) -> AdaptResult:
        if self.group is not None:
            require_ray()
            if self._in_turn:
                self._in_turn = False
                self._start_the_rest(model)
            result = self.group(model, job, checkpoint_dir=checkpoint_dir)
            self.placement.saw_train(self.group.nodes)
            return result
        if self.trainer is not None:
            require_ray()
            result = self.trainer(model, job)
            self.placement.saw_train(self.trainer.last_nodes)
            return result
        progress = self.progress
        on_step = (lambda done, total, **info: progress("adapt", done, total, **info)) if progress else None
        # DeepSpeed moves the model onto its accelerator (a GPU on a GPU node): the later stages build CPU batches,
        # so the model goes back after, as in `InProcessKernels.adapt`
        device = next(model.parameters()).device
        try:
            return run_adapt_job(model, job, engine_factory=self.engine.factory(), checkpoint_dir=checkpoint_dir,
                                 on_step=on_step)
        finally:
            model.to(device)

    def worker_memory(self) -> dict[str, float]:
        """Each started pool's largest peak memory (`Kernels.worker_memory`); Ray Train's workers, which live
        for one job, are not asked."""
        pools = ({"replicas": self.pool} if self.pool is self.search_pool else
                 {"generation": self.pool, "search": self.search_pool})
        workers = {role: pool.actors for role, pool in pools.items()}
        if self.group is not None:
            workers["training"] = self.group.workers
        return actors_peak_memory(workers)

    def close(self) -> None:
        """Release the generation and search actors, the training group and their CPUs (Ray itself stays up)."""
        self.pool.shutdown()
        self.search_pool.shutdown()
        if self.group is not None:
            self.group.shutdown()
        if self.trainer is not None:
            self.trainer.close()


def coordinator_accelerator(sizes: RayConfig) -> str:
    """DeepSpeed's accelerator in the coordinator's process, said outright as `worker_env` says it for the ranks.

    The coordinator trains only with `adapt_on: coordinator`: on its node's GPU with `use_gpu` (an actor that
    reserves none still sees its node's GPUs), else on the CPU, GPU node or not. Left to the environment, it
    was the driver's DS_ACCELERATOR (`cpu` on the project's image and from the Makefile), and `use_gpu` then
    trained on the CPU without a word.
    """
    if not (sizes.use_gpu and sizes.adapt_on == "coordinator"):
        return "cpu"
    if not torch.cuda.is_available():
        raise ConfigError("ray.use_gpu with ray.adapt_on: coordinator trains in the coordinator, on the driver's "
                          "node, and it has no GPU: run adaptation on GPU ranks (ray.adapt_on: train_group, "
                          "one GPU each), or set ray.use_gpu=false")
    return "cuda"


def ray_kernels(run, progress: Progress | None = None, ranks: LaunchedRanks | None = None) -> RayKernels:
    """The kernels of `run` on the Ray this process is connected to (sizes from its `ray:` section); `ranks`:
    training ranks the driver launched ahead (`launch_ranks`)."""
    config = run.config
    os.environ["DS_ACCELERATOR"] = coordinator_accelerator(config.ray)
    if not ray.is_initialized():
        raise RuntimeError("ray_kernels needs a connected Ray (dmea_dist.distributed.cluster.connect)")
    kernels = RayKernels(tokenizer=run.tokenizer, max_length=run.formatter.max_length,
                         engine=engine_settings(config), decoding=decoding_settings(config),
                         sizes=config.ray, storage_path=Path(run.run_dir).resolve() / "_ray_train",
                         full_finetune=run.policy.full_finetune, progress=progress, ranks=ranks)
    if config.ray.warm_up:  # None (not sized for a place, e.g. in a notebook): at first use
        try:
            kernels.warm_up(run.model)
        except BaseException:  # a cluster too small for one role: release the roles started before it
            kernels.close()
            raise
    return kernels
