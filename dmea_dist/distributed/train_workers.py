"""The ADAPT stage on Ray Train: one `AdaptJob` on a `TorchTrainer` with N data-parallel workers.

`RayTrainAdapter(engine, num_workers=..., cpus_per_worker=..., storage_path=...)`
is called with the coordinator's model and a job; it trains on Ray Train and
installs the trained weights into that model, exactly as the in-process
kernel leaves them.

One call:
1. The model and the job go to the object store once; the refs travel in
   `train_loop_config`. Ray resolves only top-level ObjectRef arguments of a
   task, not refs nested in a dict (checked on Ray 2.60), so each worker
   `ray.get`s them itself. The engine settings are plain values
   (`EngineSettings`: DeepSpeed's config dict and the eta clamp).
2. Ray Train starts one torch.distributed group over the workers (gloo on CPU,
   nccl on GPU; `TorchConfig`) and exports RANK/WORLD_SIZE/MASTER_*. The
   DeepSpeed engine (`engine.build_engine`) finds the group initialised and
   joins it instead of starting its own.
3. Every worker runs `run_adapt_job(model, job, shard=(rank, world))`: each
   rank takes every world-th example of each global batch of
   `train.batch_size` (`BatchStream`) with the global batch's loss
   denominator, and DeepSpeed averages the gradients: the same steps on the
   same examples for any worker count, equal to rounding; with one worker the
   job is the in-process one, step for step. Dropout draws from torch's
   global generator, seeded with `job.seed + rank`. With
   `train.virtual_shards` the ranks split fixed pieces of each batch instead
   and the results are equal bit for bit, dropout included (engine.py).
4. Fault tolerance: after every epoch each rank saves its part of a DeepSpeed
   checkpoint (`method.adapt_checkpoint`: trainable weights, optimizer, RNG,
   step) and reports it; Ray Train merges the ranks' files into one
   checkpoint. When a worker dies, Ray Train restarts the group (up to
   `max_failures` times) and `ray.train.get_checkpoint()` hands the last one
   to the new workers, which continue from that step as if nothing happened.
5. At the end rank 0 reports an adapters-only checkpoint: the trained weights
   (`trained_state`) as safetensors plus the `AdaptResult` as JSON; the
   coordinator reads it and `load_trained_state`s it.

Storage: Ray Train v2 persists checkpoints under `RunConfig.storage_path`
(`<run_dir>/_ray_train`, one folder per call). A call's folder is needed
only while it runs (restarts) and until its result is read, so the next call
and `close()` remove it: a long run keeps one folder, not one per task (a
failed call's folder stays, for its errors). That is a local path: a
multi-node cluster needs shared storage there (NFS, or an S3/GCS URI). GPU
workers (`use_gpu=True`) are written for but untested here (no GPU).
"""

from __future__ import annotations

import json
import os
import tempfile
import time
import uuid
from dataclasses import asdict
from pathlib import Path
from typing import Any

import ray
import torch
from safetensors.torch import load_file, save_file

from dmea_dist.distributed.cluster import worker_env
from dmea_dist.distributed.progress_relay import ProgressRelay, throttled
from dmea_dist.errors import ConfigError
from dmea_dist.method.adaptation import (
    AdaptJob,
    AdaptResult,
    load_trained_state,
    run_adapt_job,
    trained_state,
)
from dmea_dist.settings import EngineSettings

CHECKPOINT_FORMAT = "dmea-adapt-checkpoint"
CHECKPOINT_VERSION = 1
RESULT_FILE = "adapt_result.json"
WEIGHT_FILES = {"modules": "adapters.safetensors", "backbone": "backbone.safetensors"}


class RayTrainAdapter:
    """`adapt(model, job) -> AdaptResult` running the job on Ray Train (module docstring).

    engine: DeepSpeed's config and the eta clamp (plain values); num_workers:
    data-parallel ranks; cpus_per_worker: CPUs reserved per rank (also its torch
    thread count); use_gpu: one GPU per rank (untested here); max_failures:
    worker-group restarts Ray Train makes after a worker dies, each from the
    last epoch checkpoint. storage_path: where Ray Train persists checkpoints
    (shared storage on multi-node clusters). Needs a running Ray (`ray.init`);
    `last_checkpoint` / `last_metrics` hold the latest call's final checkpoint
    and rank 0's reported metrics; its folder is removed by the next call or `close()`.
    """

    def __init__(self, engine: EngineSettings, *, num_workers: int, cpus_per_worker: float, storage_path: str | os.PathLike,
                 use_gpu: bool = False, placement_strategy: str = "PACK", max_failures: int = 2, progress=None):
        if not isinstance(num_workers, int) or num_workers < 1:
            raise ConfigError(f"ray.num_train_workers={num_workers!r} must be an int >= 1")
        if not cpus_per_worker > 0:
            raise ConfigError(f"ray.train_cpus={cpus_per_worker!r} must be > 0 (CPUs per training worker)")
        self.engine = engine
        self.num_workers = num_workers
        self.cpus_per_worker = float(cpus_per_worker)
        self.use_gpu = bool(use_gpu)
        self.placement_strategy = placement_strategy
        self.max_failures = max_failures
        # Ray Train wants an absolute path or a URI (s3://...); keep URIs as given.
        text = os.fspath(storage_path)
        self.storage_path = text if "://" in text else str(Path(text).resolve())
        self.last_checkpoint: ray.train.Checkpoint | None = None
        self.last_metrics: dict[str, Any] = {}
        self.last_nodes: list[str] = []  # node id of each rank of the latest call
        self._last_folder = None  # (pyarrow filesystem, path) of the latest finished call's folder
        # Progress: ("adapt", done, total, loss=...) from rank 0 while `fit()` runs
        self._relay = ProgressRelay(progress) if progress is not None else None

    def __call__(self, model, job: AdaptJob) -> AdaptResult:
        self._remove_last_folder()
        trainer = self._trainer(model, job)
        # fit() raises TrainingFailedError when the failures are used up
        result = self._relay.around(trainer.fit) if self._relay is not None else trainer.fit()
        if result.checkpoint is None:
            raise RuntimeError(f"Ray Train run {result.path} ended without the adapters checkpoint rank 0 reports")
        self.last_checkpoint = result.checkpoint
        self.last_metrics = dict(result.metrics or {})
        self._last_folder = (result.filesystem, result.path)
        with result.checkpoint.as_directory() as directory:
            state, adapt_result = read_adapt_checkpoint(directory, trainable=job.trainable)
            self.last_nodes = json.loads((Path(directory) / RESULT_FILE).read_text()).get("nodes", [])
        load_trained_state(model, job.trainable, state)
        return adapt_result

    def _trainer(self, model, job: AdaptJob):
        from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
        from ray.train.torch import TorchConfig, TorchTrainer

        # DeepSpeed's accelerator said outright: cpu on a GPU node for CPU runs (auto-detection picks cuda), cuda for GPU
        # ranks, which would inherit a driver's DS_ACCELERATOR=cpu otherwise (worker_env)
        env = worker_env(self._threads(), gpu=self.use_gpu)
        loop_config = {"model": ray.put(model), "job": ray.put(job), "engine": self.engine,
                       "threads": self._threads(), "use_gpu": self.use_gpu,
                       "progress": self._relay.queue() if self._relay is not None else None}
        return TorchTrainer(
            train_loop_per_worker,
            train_loop_config=loop_config,
            torch_config=TorchConfig(backend="nccl" if self.use_gpu else "gloo"),
            scaling_config=ScalingConfig(num_workers=self.num_workers, use_gpu=self.use_gpu,
                                         resources_per_worker={"CPU": self.cpus_per_worker},
                                         placement_strategy=self.placement_strategy),
            run_config=RunConfig(name=f"adapt-seed{job.seed}-{uuid.uuid4().hex[:8]}", storage_path=self.storage_path,
                                 checkpoint_config=CheckpointConfig(num_to_keep=1),
                                 failure_config=FailureConfig(max_failures=self.max_failures),
                                 worker_runtime_env={"env_vars": env}),
        )

    def _threads(self) -> int:
        return max(1, int(self.cpus_per_worker))

    def _remove_last_folder(self) -> None:
        """Delete the latest finished call's folder (its result is in the model and the run's records)."""
        if self._last_folder is None:
            return
        filesystem, path = self._last_folder
        self._last_folder, self.last_checkpoint = None, None
        try:
            filesystem.delete_dir(path)
        except (FileNotFoundError, OSError):  # already gone, or storage that refuses: leave it
            pass

    def close(self) -> None:
        self._remove_last_folder()
        if self._relay is not None:
            self._relay.shutdown()


# ------------------------------------------------------------------ the worker


def train_loop_per_worker(config: dict[str, Any]) -> None:
    """One rank of the job: train its shard, checkpoint every epoch, report; rank 0 attaches the weights.

    A restarted worker group (a worker died) finds the last epoch checkpoint in
    `ray.train.get_checkpoint()` and continues from it (`run_adapt_job`).
    """
    import ray.train
    import ray.train.torch

    context = ray.train.get_context()
    rank, world_size = context.get_world_rank(), context.get_world_size()
    torch.set_num_threads(config["threads"])
    model, job = _resolve(config["model"]), _resolve(config["job"])
    _check_trainable(job.trainable, config["engine"])
    engine_factory = config["engine"].factory()  # joins Ray Train's process group (module docstring)
    with tempfile.TemporaryDirectory(prefix="dmea-adapt-") as local:
        local = Path(local)
        restored = ray.train.get_checkpoint()
        if restored is not None:  # a restarted attempt: continue from the last epoch checkpoint
            restored.to_directory(str(local))

        def report_checkpoint() -> None:
            ray.train.report({"checkpoint": 1.0}, checkpoint=ray.train.Checkpoint.from_directory(str(local)))

        start = time.perf_counter()
        result = run_adapt_job(model, job, engine_factory=engine_factory, shard=(rank, world_size),
                               checkpoint_dir=local, after_checkpoint=report_checkpoint,
                               on_step=throttled(config.get("progress")) if rank == 0 else None,
                               barrier=torch.distributed.barrier if world_size > 1 else None)
    metrics = adapt_metrics(result, wall_s=time.perf_counter() - start)
    state = _trained_weights(model, job)
    nodes = [ray.get_runtime_context().get_node_id()] * world_size
    if world_size > 1:  # where each rank ran, for the record (a collective)
        torch.distributed.all_gather_object(nodes, nodes[0])
    if rank != 0:
        ray.train.report(metrics)
        return
    with tempfile.TemporaryDirectory() as directory:
        write_adapt_checkpoint(directory, trainable=job.trainable, state=state, result=result, world_size=world_size,
                               nodes=nodes)
        ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(directory))


def _resolve(value):
    # Refs nested in train_loop_config arrive as refs (module docstring, step 1).
    return ray.get(value) if isinstance(value, ray.ObjectRef) else value


def _check_trainable(trainable: list[int] | None, settings: EngineSettings) -> None:
    """Refuse, before any training, what a worker cannot hand back."""
    if trainable is None and settings.partitions_model:
        raise ConfigError("full fine-tuning (lamol/finetune) on Ray Train supports ZeRO stage 1 or 2; "
                          "set deepspeed.zero_optimization.stage to 1 or 2")


def _trained_weights(model, job: AdaptJob) -> dict[str, Any]:
    """`trained_state` of the job. At ZeRO-3 `run_adapt_job` trained a copy and loaded its gathered weights
    into `model` on every rank, so the model holds them; the engine itself is closed by then."""
    return trained_state(model, job.trainable, job.rows)


def adapt_metrics(result: AdaptResult, *, wall_s: float) -> dict[str, float]:
    """What a rank reports: plain floats (Ray Train v2 requires them), identical on every rank but wall_s."""
    metrics = {"steps": float(result.steps), "wall_s": float(wall_s)}
    metrics.update({f"final_loss.{key}": float(values[-1]) for key, values in result.losses.items() if values})
    metrics.update({f"mean_eta.{key}": float(sum(values) / len(values)) for key, values in result.etas.items() if values})
    return metrics


# ------------------------------------------------------------- the checkpoint


def write_adapt_checkpoint(directory: str | os.PathLike, *, trainable: list[int] | None, state: dict[str, Any],
                           result: AdaptResult, world_size: int, nodes: list[str] | None = None) -> Path:
    """Write `trained_state` output as safetensors and the AdaptResult as JSON; returns the directory.

    Keys: modeling.io's (`layers.{layer}.modules.{id}.{name}`) in adapters.safetensors
    (the path's modules), or the backbone's own state-dict keys in backbone.safetensors
    (full fine-tuning).
    """
    directory = Path(directory)
    kind = "backbone" if trainable is None else "modules"
    tensors = dict(state[kind])
    save_file({k: t.detach().cpu().contiguous() for k, t in tensors.items()}, str(directory / WEIGHT_FILES[kind]),
              metadata={"format": "pt"})
    manifest = {"format": CHECKPOINT_FORMAT, "version": CHECKPOINT_VERSION, "kind": kind, "trainable": trainable,
                "world_size": world_size, "nodes": nodes or [], "result": asdict(result)}
    (directory / RESULT_FILE).write_text(json.dumps(manifest, indent=1) + "\n")
    return directory


def read_adapt_checkpoint(directory: str | os.PathLike, *,
                          trainable: list[int] | None) -> tuple[dict[str, Any], AdaptResult]:
    """(state for `load_trained_state`, AdaptResult) from a checkpoint of a job that trains `trainable`."""
    directory = Path(directory)
    file = directory / RESULT_FILE
    if not file.is_file():
        raise FileNotFoundError(f"{file}: not found; is {directory} a checkpoint written by write_adapt_checkpoint?")
    manifest = json.loads(file.read_text())
    if manifest.get("format") != CHECKPOINT_FORMAT or manifest.get("version") != CHECKPOINT_VERSION:
        raise ValueError(f"{file}: format {manifest.get('format')!r} version {manifest.get('version')!r} "
                         f"is not {CHECKPOINT_FORMAT!r} version {CHECKPOINT_VERSION}")
    if manifest["trainable"] != trainable:
        raise ValueError(f"{file}: holds the weights of trainable={manifest['trainable']}, "
                         f"the job trains {trainable}; was it written for another job?")
    tensors = load_file(str(directory / WEIGHT_FILES[manifest["kind"]]), device="cpu")
    return {manifest["kind"]: tensors}, AdaptResult(**manifest["result"])
