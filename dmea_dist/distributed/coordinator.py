"""The coordinator on Ray: `dmea_dist.coordinator.Coordinator` as an actor, with `RayKernels`.

    driver (dmea run / dmea resume / ray_jobs/run_sequence.py)
      connect(): embedded local Ray, or join a cluster (address / $RAY_ADDRESS)
      ray_coordinator_factory(): the Coordinator as an actor on the driver's node
    Coordinator actor
      owns the run's state on disk and steps its stages; heavy work goes to
      RayKernels: search tasks, generation actors, Ray Train workers

The actor is pinned to the driver's node, so the run directory it writes is
the driver's, which logs it to MLflow: the driver stays the only process that
talks to MLflow. It takes no CPU reservation: it only orchestrates and runs
the light stages (selection, recording). The driver holds a `RemoteCoordinator`,
which has the Coordinator's methods and waits for each call.
"""

from __future__ import annotations

from pathlib import Path

import ray

from dmea_dist.config import RunConfig
from dmea_dist.coordinator import Coordinator
from dmea_dist.distributed.cluster import connect  # noqa: F401 - the entry points' one import for Ray
from dmea_dist.distributed.kernels import ray_kernels


class RemoteCoordinator:
    """The driver's handle of the coordinator actor: the same methods, each call waited for."""

    def __init__(self, actor):
        self.actor = actor

    def __getattr__(self, name: str):
        method = getattr(self.actor, name)
        return lambda *args, **kwargs: ray.get(method.remote(*args, **kwargs))

    def close(self) -> None:
        try:
            ray.get(self.actor.close.remote(), timeout=60)
        finally:
            ray.kill(self.actor)


def ray_coordinator_factory(config: RunConfig, run_dir: str | Path, *, resume: bool = False,
                            progress=None) -> RemoteCoordinator:
    """For `driver.run_sequence(coordinator_factory=...)`: Ray must be connected first (`connect`)."""
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    here = ray.get_runtime_context().get_node_id()
    actor = ray.remote(num_cpus=0)(Coordinator).options(
        scheduling_strategy=NodeAffinitySchedulingStrategy(node_id=here, soft=False),
    ).remote(config, str(Path(run_dir).resolve()), resume=resume, kernels_factory=ray_kernels)
    return RemoteCoordinator(actor)
