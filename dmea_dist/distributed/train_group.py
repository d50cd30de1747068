"""The ADAPT stage on a training group that lives for the run: N Ray actors, one torch.distributed group.

Ray Train builds a trainer, a placement group, worker processes, a process
group and a DeepSpeed build for every `fit`: ~13-33 s per task on a laptop,
for a second of compute (issue 9's measurement). `TrainGroup` pays that once:

* `launch`: N `TrainWorker` actors in a placement group (`ray.placement_strategy`, SPREAD by default),
  each with a model replica; they join one gloo (CPU) or nccl (GPU) process
  group over a TCP rendezvous that rank 0 offers: its TCPStore, opened on a
  port the OS picks and held from the start (dmea_dist/rendezvous.py), so no
  other process on a busy node can take the port before the group joins. DeepSpeed finds the group
  initialised and joins it (`engine.build_engine`). `dmea run` launches the
  ranks from the driver right after Ray is up, before any model exists
  (`launch_ranks`): their processes, imports and process group then come up
  while the coordinator actor imports and builds the run, and the
  coordinator's group adopts them (`adopt`) and gives them the model at its
  first job. Otherwise the group is launched when the run starts
  (`RayKernels.warm_up`) or at the first job.
* every call: the coordinator's model reaches the replicas as its module
  pools, paths and next_ids (adapter-sized; the backbone only when its
  checksum changed, e.g. full fine-tuning), then every rank runs
  `run_adapt_job(shard=(rank, N))`, with the global batch split over the
  ranks, and rank 0's trained weights are installed in the coordinator's
  model, as the in-process kernel leaves them.
* faults: every epoch the ranks checkpoint into `checkpoint_dir` (the task's
  folder in the run directory: shared storage on a multi-node cluster, as Ray
  Train's storage_path). If a worker dies (its process, its node), the call
  fails with RayActorError; the group is torn down, started afresh and the
  job rerun, continuing from the last complete checkpoint, up to
  `max_failures` times: Ray Train's FailureConfig guarantee, kept. The other
  ranks' collectives fail too (gloo: "Connection closed by peer"), often
  before Ray reports the death: a rank's error is taken as a rank's death when
  one of the ranks died (`_rank_died`). Any other failure tears the group down
  (ranks may be stuck in a collective) and is raised, as the generation pool does;
  so is a rank whose constructor raised (ActorDiedError with `actor_init_failed`):
  a fresh group would meet it again (distributed/generation_pool.py).
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import ray
from ray.exceptions import RayActorError
from ray.util.placement_group import remove_placement_group
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

from dmea_dist.distributed.cluster import (
    RESERVE_TIMEOUT_S,
    configure_threads,
    raise_constructor_error,
    reserve,
    worker_env,
)
from dmea_dist.distributed.progress_relay import ProgressRelay, throttled
from dmea_dist.errors import ConfigError
from dmea_dist.rendezvous import connect_store, open_store
from dmea_dist.settings import EngineSettings

RANK_DEATH_WAIT_S = 30.0  # how long a rank's error waits for word of another rank's death (`_rank_died`)

# torch, the model and the adaptation code are imported where a model is moved or trained, not here: the
# driver launches the ranks without a model (`launch_ranks`) right after Ray starts, and importing them
# (transformers' GPT-2, ~2 s) would delay that start
if TYPE_CHECKING:
    from dmea_dist.method.adaptation import AdaptJob, AdaptResult


def check_gpu() -> None:
    """Refuse a GPU rank (`worker_env` says cuda) whose torch sees no GPU: Ray counts the GPUs a node declares
    (`ray start --num-gpus`, a pod's resources), not what torch there can use (a CPU build of torch, no driver).
    Only the rank can tell; it failed later at its process group's join (no NCCL) or its engine, a traceback."""
    import torch

    if os.environ.get("DS_ACCELERATOR") == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"ray.use_gpu: a training rank on node {ray.util.get_node_ip_address()} holds one of "
                          f"the GPUs Ray counts there, but torch {torch.__version__} there sees none (CUDA build: "
                          f"{torch.version.cuda or 'no, a CPU build'}): give the GPU nodes a CUDA build of torch and "
                          f"their driver, or run with ray.use_gpu=false")


class TrainWorker:
    """One rank of the group (a Ray actor; a plain class, so it also runs in-process)."""

    def __init__(self, snapshot: dict[str, Any] | None, *, engine: EngineSettings, cpus: float):
        configure_threads(cpus)
        check_gpu()
        from dmea_dist.distributed import train_workers  # noqa: F401 - now, not in the first job (ZeRO-3 gathering)
        from dmea_dist.distributed.generation_pool import build_model
        from dmea_dist.engine import import_deepspeed

        import_deepspeed()  # likewise, while the run starts

        self.model = build_model(snapshot) if snapshot is not None else None  # None: `load` gives it
        self.engine = engine
        self.rank = self.world = None
        self.store = None  # rank 0's rendezvous store (`address`); the process group keeps it after `join`

    def load(self, snapshot: dict[str, Any]) -> None:
        """The replica, for a rank launched before the model existed (`launch_ranks`)."""
        from dmea_dist.distributed.generation_pool import build_model

        self.model = build_model(snapshot)

    def address(self) -> tuple[str, int]:
        """Where rank 0 offers the rendezvous: this node's IP and the port of the store it opens now, on a port
        the OS picks, and holds from then on (dmea_dist/rendezvous.py: no other process can take the port
        before the group has joined)."""
        self.store = open_store()
        return ray.util.get_node_ip_address(), self.store.port

    def join(self, rank: int, world: int, master: tuple[str, int], backend: str) -> str:
        """Join the process group (once per group) through rank 0's store (`address`, called on rank 0 first);
        returns this worker's node id."""
        import torch.distributed as dist

        if rank == 0 and self.store is None:
            raise RuntimeError("join(rank=0) before address(): rank 0 hosts the rendezvous store that address() "
                               "opens; call address() on rank 0 first and give its result to every join")
        store = self.store if rank == 0 else connect_store(*master)
        # DeepSpeed looks for these before it sees the group initialised (engine.build_engine)
        os.environ.update(RANK=str(rank), LOCAL_RANK="0", WORLD_SIZE=str(world), MASTER_ADDR=master[0],
                          MASTER_PORT=str(master[1]))
        dist.init_process_group(backend, store=store, rank=rank, world_size=world)
        self.rank, self.world = rank, world
        return ray.get_runtime_context().get_node_id()

    def sync(self, state: dict[str, Any]) -> None:
        from dmea_dist.distributed.generation_pool import apply_model_state

        apply_model_state(self.model, state)

    def adapt(self, job: AdaptJob, checkpoint_dir: str | None,
              progress=None) -> tuple[AdaptResult, dict[str, Any] | None]:
        """Train this rank's share; rank 0 returns (result, trained weights), the others (result, None).

        `progress`: a `ray.util.queue.Queue` that gets (steps done, total, {"loss": ...}) at most twice a
        second and at the last step, for the driver's bar (given to rank 0 only).
        """
        import torch.distributed as dist

        from dmea_dist.distributed.train_workers import _check_trainable, _trained_weights
        from dmea_dist.method.adaptation import run_adapt_job

        _check_trainable(job.trainable, self.engine)
        result = run_adapt_job(self.model, job, engine_factory=self.engine.factory(), shard=(self.rank, self.world),
                               checkpoint_dir=checkpoint_dir, on_step=throttled(progress),
                               barrier=dist.barrier if self.world > 1 else None)
        state = _trained_weights(self.model, job)
        return result, state if self.rank == 0 else None

    def memory(self) -> dict[str, float]:
        from dmea_dist.kernels import process_memory

        return process_memory()

    def close(self) -> None:
        import torch.distributed as dist

        if dist.is_initialized():
            dist.destroy_process_group()


@dataclass
class LaunchedRanks:
    """Ranks launched without a model (`TrainGroup.launch()`), handed to the group that will use them
    (`TrainGroup.adopt`), e.g. from the driver to the coordinator actor: plain Ray handles, picklable."""

    workers: list
    placement_group: Any
    joining: list  # the ranks' `join` calls
    launched_at: float  # time.time() at launch (the driver and the coordinator share a node's clock)
    engine: EngineSettings
    cpus: float
    use_gpu: bool

    def release(self) -> None:
        """Stop the ranks and free their CPUs (idempotent: the group that adopted them may have already)."""
        for worker in self.workers:
            ray.kill(worker)
        try:
            remove_placement_group(self.placement_group)
        except Exception:  # noqa: BLE001 - Ray is down already (removing a removed group is a no-op)
            pass


class TrainGroup:
    """`adapt(model, job, checkpoint_dir)` on N long-lived ranks (module docstring)."""

    def __init__(self, engine: EngineSettings, *, num_workers: int, cpus_per_worker: float, use_gpu: bool = False,
                 placement_strategy: str = "PACK", max_failures: int = 2, ready_timeout_s: float = RESERVE_TIMEOUT_S,
                 progress=None):
        self.engine, self.num_workers, self.cpus = engine, num_workers, cpus_per_worker
        self.progress = progress  # Progress: ("adapt", done, total, loss=...) from rank 0 while a job runs
        self.use_gpu, self.strategy, self.max_failures = use_gpu, placement_strategy, max_failures
        self.ready_timeout_s = ready_timeout_s
        self.workers: list = []
        self.nodes: list[str] = []
        self.restarts = 0  # group restarts after a worker died
        self.start_seconds = 0.0  # what starting the group cost, paid once (and at a restart)
        self._pg = None
        self._joining: list | None = None  # the ranks' join calls, from `launch` until `start` has waited
        self._empty = False  # ranks launched without a model: `start` loads it
        self._launched = 0.0
        self._checksum: tuple[float, ...] | None = None
        self._relay = ProgressRelay(progress) if progress is not None else None  # rank 0's steps, to `progress`

    @property
    def started(self) -> bool:
        return bool(self.workers)

    def launch(self, model=None) -> None:
        """Create the ranks, replicas of `model` as it is now, and have them join their process group,
        without waiting: the first job waits (`start`). With `ray.warm_up` the group is launched when the
        run starts (`RayKernels.warm_up`), so its start-up overlaps the run's own set-up. Without `model`
        the ranks hold none until `start` gives them one (`launched`, `adopt`)."""
        self._launched = time.time()
        bundle = {"CPU": float(self.cpus), **({"GPU": 1.0} if self.use_gpu else {})}
        self._pg = reserve(self.num_workers, cpus=self.cpus, strategy=self.strategy, timeout_s=self.ready_timeout_s,
                           what="the training group", bundle=bundle)
        env = worker_env(self.cpus, gpu=self.use_gpu)
        snapshot = checksum = None
        if model is not None:
            from dmea_dist.distributed.generation_pool import backbone_checksum, model_snapshot

            snapshot, checksum = ray.put(model_snapshot(model)), backbone_checksum(model)
        cls = ray.remote(TrainWorker)
        self.workers = [
            cls.options(num_cpus=self.cpus, num_gpus=1 if self.use_gpu else 0, runtime_env={"env_vars": env},
                        scheduling_strategy=PlacementGroupSchedulingStrategy(self._pg, placement_group_bundle_index=i))
            .remote(snapshot, engine=self.engine, cpus=self.cpus)
            for i in range(self.num_workers)
        ]
        master = self.workers[0].address.remote()  # resolved by Ray before each join runs
        backend = "nccl" if self.use_gpu else "gloo"
        self._joining = [w.join.remote(rank, self.num_workers, master, backend) for rank, w in enumerate(self.workers)]
        self._empty, self._checksum = model is None, checksum

    def launched(self) -> LaunchedRanks:
        """The ranks of `launch()` (no model), to be adopted by the group that uses them; this group lets
        go of them."""
        if not self._empty or self._joining is None:
            raise RuntimeError("launched(): only ranks just launched without a model can be handed over")
        ranks = LaunchedRanks(workers=self.workers, placement_group=self._pg, joining=self._joining,
                              launched_at=self._launched, engine=self.engine, cpus=self.cpus, use_gpu=self.use_gpu)
        self.workers, self._pg, self._joining, self._empty = [], None, None, False
        return ranks

    def fits(self, ranks: LaunchedRanks) -> bool:
        """Whether `ranks` are what this group would launch (their number, CPUs, device and DeepSpeed settings)."""
        return ((len(ranks.workers), ranks.cpus, ranks.use_gpu, ranks.engine)
                == (self.num_workers, self.cpus, self.use_gpu, self.engine))

    def adopt(self, ranks: LaunchedRanks) -> None:
        """Use ranks launched elsewhere without a model (`launch()`, `launched`) as this group's; the first job
        gives them the model (`start`)."""
        if self.started or not self.fits(ranks):
            raise RuntimeError("adopt(): the group is started already, or the ranks are not the group's size")
        self.workers, self._pg, self._joining = list(ranks.workers), ranks.placement_group, list(ranks.joining)
        self._launched, self._empty, self._checksum = ranks.launched_at, True, None

    def start(self, model) -> None:
        """Launch the group unless it was, wait until every rank has joined, and give ranks launched without
        a model `model` as it is now."""
        from dmea_dist.distributed.generation_pool import backbone_checksum, model_snapshot

        if not self.started:
            self.launch(model)
        waited = self._joining is not None or self._empty
        if self._joining is not None:
            self.nodes = ray.get(self._joining)
            self._joining = None
        if self._empty:
            snapshot = ray.put(model_snapshot(model))
            ray.get([w.load.remote(snapshot) for w in self.workers])
            self._checksum, self._empty = backbone_checksum(model), False
        if waited:
            self.start_seconds += time.time() - self._launched

    def __call__(self, model, job: AdaptJob, *, checkpoint_dir: Path | None = None) -> AdaptResult:
        from dmea_dist.method.adaptation import load_trained_state

        for attempt in range(self.max_failures + 1):
            try:
                self._sync(model)
                outs = self._adapt(job, str(checkpoint_dir) if checkpoint_dir else None)
                break
            except RayActorError as err:
                self.shutdown()  # a dead rank: a fresh group continues from the last checkpoint
                if err.actor_init_failed or attempt == self.max_failures:
                    raise_constructor_error(err)  # a rank's constructor raised: a fresh group's would too
                    raise
                self.restarts += 1
            except Exception:
                self.shutdown()  # ranks may be stuck in a collective the failed one left: start afresh next call
                raise
        result, state = outs[0]
        load_trained_state(model, job.trainable, state)
        return result

    def _adapt(self, job: AdaptJob, checkpoint_dir: str | None) -> list:
        """Every rank's `adapt`, waited for; meanwhile rank 0's steps are fed to `progress`. A rank's error
        when another rank died is that death (RayActorError: the job is rerun), not the error."""
        if self.progress is None:
            refs = [w.adapt.remote(job, checkpoint_dir) for w in self.workers]
        else:
            queue = self._relay.queue()  # one small actor for the group's life, however many tasks and restarts
            refs = [w.adapt.remote(job, checkpoint_dir, queue if rank == 0 else None)
                    for rank, w in enumerate(self.workers)]
        try:
            if self.progress is not None:
                pending = refs
                while pending:
                    ready, pending = ray.wait(pending, num_returns=len(pending), timeout=0.5)
                    ray.get(ready)  # a rank that failed raises here, at once
                    self._relay.drain()
            return ray.get(refs)
        except RayActorError:
            raise
        except Exception:
            died = _rank_died(refs, timeout_s=RANK_DEATH_WAIT_S)
            if died is not None:
                raise died from None
            raise

    def _sync(self, model) -> None:
        """Start the group, or bring its replicas to `model` (modules always, backbone if it changed)."""
        from dmea_dist.distributed.generation_pool import backbone_checksum, model_state

        if not self.started or self._empty:
            self.start(model)
            return  # the replicas are `model` as of now
        self.start(model)  # launched ahead (warm_up): wait for its ranks, then sync
        checksum = backbone_checksum(model)
        ref = ray.put(model_state(model, with_backbone=checksum != self._checksum))
        ray.get([w.sync.remote(ref) for w in self.workers])
        self._checksum = checksum

    def shutdown(self) -> None:
        for worker in self.workers:
            ray.kill(worker)
        self.workers, self.nodes, self._joining, self._empty = [], [], None, False
        if self._pg is not None:
            remove_placement_group(self._pg)
            self._pg = None
        self._checksum = None
        if self._relay is not None:
            self._relay.shutdown()


def _rank_died(refs: list, *, timeout_s: float) -> RayActorError | None:
    """The RayActorError of a rank whose call in `refs` failed because it died, waiting up to `timeout_s` for
    the calls still running; None if none did. When a rank dies its peers' collectives fail at once
    ("Connection closed by peer"), and their errors can reach the caller before Ray's word of the death."""
    deadline, pending = time.monotonic() + timeout_s, list(refs)
    while pending:
        left = deadline - time.monotonic()
        if left <= 0:
            return None
        ready, pending = ray.wait(pending, num_returns=1, timeout=left)
        for ref in ready:
            try:
                ray.get(ref)
            except RayActorError as err:
                return err
            except Exception:  # noqa: BLE001, S110 - a rank's own error: look on for a death
                pass
    return None
