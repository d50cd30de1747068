"""The lifecycle coordinator as a Ray actor, and how the driver starts it.

    driver (dmea run / ray_jobs/run_sequence.py)
      connect(): embedded local Ray, or join a cluster (address / $RAY_ADDRESS)
      RayCoordinator: starts the actor on the driver's node, steps it, reads results
    LifecycleCoordinator (Ray actor)
      holds the pure `driver.Coordinator` (lifecycle state machine + executor)
      with distributed kernels: search candidates as Ray tasks, a pool of
      generation actors (pseudo samples, R-matrix answers), adaptation on
      Ray Train workers running the DeepSpeed engine.

The actor is pinned to the driver's node so the run directory it writes is
the driver's, which logs it to MLflow: the driver stays the only process that
talks to MLflow. The actor itself takes no CPU reservation: it only
orchestrates and runs the light stages (selection, recording).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import ray

from dmea_dist.config import RunConfig, config_from_dict


def connect(address: str | None = None, *, num_cpus: int | None = None) -> str:
    """Start an embedded local Ray, or join the cluster at `address` / $RAY_ADDRESS; returns which."""
    if ray.is_initialized():
        return "existing"
    address = address or os.environ.get("RAY_ADDRESS")
    env = {"TOKENIZERS_PARALLELISM": "false", "HF_HUB_OFFLINE": os.environ.get("HF_HUB_OFFLINE", "0")}
    if os.environ.get("DS_ACCELERATOR"):
        env["DS_ACCELERATOR"] = os.environ["DS_ACCELERATOR"]
    # Worker logs stay in Ray's log folder unless asked for: the driver prints progress and results itself,
    # and errors come back through ray.get. (Without a dashboard, Ray Train's cleaner actor logs retries.)
    logs = os.environ.get("DMEA_RAY_LOGS", "0") == "1"
    if address:
        ray.init(address=address, runtime_env={"env_vars": env}, log_to_driver=logs)
        return address
    ray.init(num_cpus=num_cpus, include_dashboard=False, runtime_env={"env_vars": env}, log_to_driver=logs)
    return "local"


class RayStages:
    """The executor kernels of a run as Ray work (sizes from its `ray:` section), noting where each ran."""

    def __init__(self, run):
        from dmea_dist.distributed.training import RayTrainAdapter
        from dmea_dist.distributed.workers import RayKernels

        cfg = run.config
        self.kernels = RayKernels.from_run(run, placement_strategy=cfg.ray.placement_strategy)
        self.adapter = None
        if cfg.ray.adapt_on == "ray_train":
            self.adapter = RayTrainAdapter.from_config(cfg, storage_path=Path(run.run_dir).resolve() / "_ray_train")
        self.nodes: dict[str, set[str]] = {"search": set(), "generation": set(), "train": set()}

    def executor_kwargs(self) -> dict[str, Any]:
        out = {"search_fn": self.search_fn, "generate_fn": self.generate_fn, "answer_fn": self.answer_fn}
        if self.adapter is not None:
            out["adapt_fn"] = self.adapt_fn
        return out

    def search_fn(self, model, jobs, common):
        results = self.kernels.search_fn(model, jobs, common)
        self.nodes["search"].update(self.kernels.search_nodes)
        return results

    def generate_fn(self, model, requests):
        out = self.kernels.generate_fn(model, requests)
        self.nodes["generation"].update(self.kernels.pool.node_ids() if self.kernels.pool.started else [])
        return out

    def answer_fn(self, model, requests):
        out = self.kernels.answer_fn(model, requests)
        self.nodes["generation"].update(self.kernels.pool.node_ids() if self.kernels.pool.started else [])
        return out

    def adapt_fn(self, model, job):
        result = self.adapter(model, job)
        self.nodes["train"].update(self.adapter.last_nodes)
        return result

    def shutdown(self) -> None:
        self.kernels.shutdown()


@ray.remote(num_cpus=0)
class LifecycleCoordinator:
    """Owns the lifecycle state machine and drives the stages as Ray work."""

    def __init__(self, config: dict[str, Any], run_dir: str, threads: int = 1):
        import torch

        from dmea_dist.driver import Coordinator

        run_config = config_from_dict(config, source="coordinator")
        if not run_config.ray.use_gpu:
            os.environ.setdefault("DS_ACCELERATOR", "cpu")  # CPU runs stay on CPU on GPU nodes too
        torch.set_num_threads(threads)  # the light stages only; heavy ones run in workers
        self.stages: RayStages | None = None
        self.inner = Coordinator(run_config, run_dir, kernels=self._kernels)

    def _kernels(self, run) -> dict[str, Any]:
        self.stages = RayStages(run)
        return self.stages.executor_kwargs()

    def step(self) -> dict[str, Any]:
        return self.inner.step()

    def results(self) -> dict[str, Any]:
        return self.inner.results()

    def placement(self) -> dict[str, list[str]]:
        """Node ids where search candidates, generation actors and training workers ran so far."""
        return {k: sorted(v) for k, v in self.stages.nodes.items()}

    def node_id(self) -> str:
        return ray.get_runtime_context().get_node_id()

    def shutdown(self) -> None:
        if self.stages is not None:
            self.stages.shutdown()


class RayCoordinator:
    """Driver-side handle: the coordinator actor on this node, stepped one stage per call."""

    def __init__(self, config: RunConfig, run_dir: str | Path, *, threads: int = 1):
        from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

        here = ray.get_runtime_context().get_node_id()
        self.actor = LifecycleCoordinator.options(
            scheduling_strategy=NodeAffinitySchedulingStrategy(node_id=here, soft=False),
        ).remote(config.to_dict(), str(Path(run_dir).resolve()), threads)

    def step(self) -> dict[str, Any]:
        return ray.get(self.actor.step.remote())

    def results(self) -> dict[str, Any]:
        return ray.get(self.actor.results.remote())

    def placement(self) -> dict[str, list[str]]:
        return ray.get(self.actor.placement.remote())

    def close(self) -> None:
        try:
            ray.get(self.actor.shutdown.remote(), timeout=60)
        finally:
            ray.kill(self.actor)


def ray_coordinator_factory(config: RunConfig, run_dir: str | Path, progress=None) -> RayCoordinator:
    """For `driver.run_sequence(coordinator_factory=...)`: Ray must be connected first (`connect`)."""
    return RayCoordinator(config, run_dir)
