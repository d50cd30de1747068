"""The coordinator on Ray: `dmea_dist.coordinator.Coordinator` as an actor, with `RayKernels`.

    driver (dmea run / dmea resume / ray_jobs/run_sequence.py)
      connect(): embedded local Ray, or join a cluster (address / $RAY_ADDRESS)
      ray_coordinator_factory(): the training ranks, launched without a model
        (`launch_ranks`), then the Coordinator as an actor on the driver's node
    Coordinator actor
      owns the run's state on disk and steps its stages; heavy work goes to
      RayKernels: search actors, generation actors, training ranks (or Ray Train workers)

The actor is pinned to the driver's node, so the run directory it writes is
the driver's, which logs it to MLflow: the driver stays the only process that
talks to MLflow. It takes no CPU reservation: it only orchestrates and runs
the light stages (selection, recording). The driver holds a `RemoteCoordinator`,
which has the Coordinator's methods and waits for each call. The actor's class
(`CoordinatorActor`) builds the Coordinator in the actor's process: the driver,
which only names that class, imports neither torch nor the model, and reaches
`ray.init` ~4 s sooner (tests/unit/test_driver_start.py).

The training ranks (`ray.adapt_on: train_group`) are launched first, before
any model exists: their processes, imports (DeepSpeed, ~4 s) and process
group come up while the actor imports and builds the run, instead of after
it, at the first adaptation. The actor's kernels adopt them and give them
the model at that first adaptation (distributed/train_group.py).

Live progress: the kernels report steps (search candidates, generation
requests, adaptation steps with the loss, evaluation) inside the actor. There
they go to a `ProgressRelay`; the actor runs two calls at once (a step and a
poll), and while a step runs the driver polls the relay twice a second and
feeds the events to its own bars, so `dmea run` on Ray shows the same bars and
plain lines as in process.
"""

from __future__ import annotations

import functools
import threading
from pathlib import Path
from typing import Any

import ray

from dmea_dist.config import RunConfig
from dmea_dist.distributed.cluster import connect  # noqa: F401 - the entry points' one import for Ray
from dmea_dist.distributed.train_group import LaunchedRanks, TrainGroup
from dmea_dist.settings import engine_settings  # not the Coordinator's modules: module docstring


class ProgressRelay:
    """A `Progress` callable that keeps the events it is given until `drain` takes them (thread-safe)."""

    def __init__(self):
        self._events: list[tuple[str, int, int, dict[str, float]]] = []
        self._lock = threading.Lock()

    def __call__(self, what: str, done: int, total: int, **info: float) -> None:
        with self._lock:
            if self._events and self._events[-1][0] == what:  # only the latest count of a kind matters
                self._events[-1] = (what, done, total, info)
            else:
                self._events.append((what, done, total, info))

    def drain(self) -> list[tuple[str, int, int, dict[str, float]]]:
        with self._lock:
            events, self._events = self._events, []
        return events


class CoordinatorActor:
    """The Coordinator as a Ray actor, built in the actor's process, with `RayKernels` and its kernels'
    progress kept in a relay the driver polls (module docstring). Every Coordinator method is reached
    through `call`; `step` runs beside `progress_events` (the actor runs two calls at once)."""

    def __init__(self, config: RunConfig, run_dir: str, *, resume: bool, ranks: LaunchedRanks | None):
        from dmea_dist.coordinator import Coordinator
        from dmea_dist.distributed.kernels import ray_kernels
        from dmea_dist.errors import DmeaError

        self.relay = ProgressRelay()
        self.failed: DmeaError | None = None
        try:
            self.coordinator = Coordinator(config, run_dir, resume=resume, progress=self.relay,
                                           kernels_factory=functools.partial(ray_kernels, ranks=ranks))
        except DmeaError as err:
            # kept for the first call: raised in __init__ it would reach the driver as ActorDiedError, a
            # traceback, where in process the same error (a damaged snapshot on resume) is one line
            self.failed = err

    def call(self, method: str, *args, **kwargs) -> Any:
        if self.failed is not None:
            if method == "close":  # nothing was built, nothing to release
                return None
            raise self.failed
        return getattr(self.coordinator, method)(*args, **kwargs)

    def progress_events(self) -> list[tuple[str, int, int, dict[str, float]]]:
        return self.relay.drain()


class RemoteCoordinator:
    """The driver's handle of the coordinator actor: the Coordinator's methods, each call waited for."""

    POLL_S = 0.5

    def __init__(self, actor, progress=None, ranks: LaunchedRanks | None = None):
        self.actor, self.progress, self.ranks = actor, progress, ranks

    def __getattr__(self, name: str):
        if name.startswith("_"):  # pickling and copying probe these: not the Coordinator's
            raise AttributeError(name)
        return lambda *args, **kwargs: ray.get(self.actor.call.remote(name, *args, **kwargs))

    def step(self) -> dict[str, Any]:
        """The actor's step; meanwhile its kernels' progress is fed to the driver's bars."""
        ref = self.actor.call.remote("step")
        if self.progress is None:
            return ray.get(ref)
        while True:
            ready, _ = ray.wait([ref], timeout=self.POLL_S)
            for what, done, total, info in ray.get(self.actor.progress_events.remote()):
                self.progress(what, done, total, **info)
            if ready:
                return ray.get(ref)

    def close(self) -> None:
        try:
            ray.get(self.actor.call.remote("close"), timeout=60)
        finally:
            ray.kill(self.actor)
            if self.ranks is not None:  # the actor's kernels released them, unless it failed before it had any
                self.ranks.release()


def launch_ranks(config: RunConfig) -> LaunchedRanks | None:
    """The run's training ranks, launched now without a model, for its coordinator to adopt (module
    docstring); None where adaptation does not run on a training group."""
    sizes = config.ray
    if sizes.adapt_on != "train_group":
        return None
    group = TrainGroup(engine_settings(config), num_workers=sizes.num_train_workers, cpus_per_worker=sizes.train_cpus,
                       use_gpu=sizes.use_gpu, placement_strategy=sizes.placement_strategy)
    try:
        group.launch()
    except BaseException:  # Ctrl-C or an error after its reservation: no ranks or CPUs held for nothing
        group.shutdown()
        raise
    return group.launched()


def ray_coordinator_factory(config: RunConfig, run_dir: str | Path, *, resume: bool = False,
                            progress=None) -> RemoteCoordinator:
    """For `driver.run_sequence(coordinator_factory=...)`: Ray must be connected first (`connect`)."""
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    ranks = launch_ranks(config)
    try:
        here = ray.get_runtime_context().get_node_id()
        # two calls at once: a step, and the driver's polls of its progress (only those run beside a step)
        actor = ray.remote(num_cpus=0, max_concurrency=2)(CoordinatorActor).options(
            scheduling_strategy=NodeAffinitySchedulingStrategy(node_id=here, soft=False),
        ).remote(config, str(Path(run_dir).resolve()), resume=resume, ranks=ranks)
    except BaseException:  # no coordinator for the driver to close: the ranks it launched are released here
        if ranks is not None:
            ranks.release()
        raise
    return RemoteCoordinator(actor, progress=progress, ranks=ranks)
