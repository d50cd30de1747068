"""Adaptation: train the new task with knowledge transfer and pseudo-sample replay.

Sub-batch streams (`Source`), by key:

* `new`: the new task's real data, through the new task's path (g_j);
* `transfer:<task>`: pseudo samples of a selected similar task, through the
  new task's path (knowledge transfer; added unscaled);
* `replay:<task>`: pseudo samples of an earlier task, through that task's own
  path (against forgetting of the modules it shares with the new path);
  scaled by eta_i (dynamic gradient scaling) when the job scales;
* a task id per task for multitask's joint training (no scaling).

Every optimizer step takes the next batch of the first stream (the anchor:
the new task, or the first task for multitask) and, by `mixing`:

* `alternate` (default): one batch of one replayed task, round-robin over the
  replay streams in an order reshuffled every round: ACM's order (one new-task
  batch, then one batch of one replayed task), with the pair combined in one
  engine step so that dynamic gradient scaling can compare them; and, when
  there are transfer streams, one batch of one of them by a second rotation;
* `all`: one batch of every other stream.

With `virtual_shards` V > 0 every sub-batch is V fixed pieces of its global
batch (`BatchStream.shard_batches`), each its own forward with dropout seeded
by (job seed, step, stream, piece): the engine reduces them in a fixed order,
so the result does not depend on how many ranks share the pieces
(dmea_dist.engine's docstring).

Every stream is a `BatchStream`: it cycles through its examples reshuffled
every epoch. An epoch is one pass over the anchor's batches; `t` of exp(-t)
is the fractional epoch (or the fraction of training, by option). The engine
(`Engine`: the DeepSpeed wrapper in dmea_dist.engine, or anything with the
same contract) combines the sub-batch gradients as `g_j + sum_i eta_i g_i`.
"""

from __future__ import annotations

import copy
import functools
import math
import random
import zlib
from collections.abc import Callable, Collection, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import torch

from dmea_dist.data.formatting import BatchStream, Example
from dmea_dist.errors import TrainingDiverged
from dmea_dist.method.training import task_loss
from dmea_dist.modeling.io import modules_state, put_modules_state

MIXINGS = ("alternate", "all")


@dataclass
class Source:
    """The batches of one sub-batch stream and the path they run along."""

    key: str  # "new", "transfer:<task>", "replay:<task>", or a task id (multitask)
    batches: BatchStream
    path: list[int] | None
    scope: tuple[str, ...] | None = None  # the tasks whose token rows it sees (a replayed task's: those up to it)

    @property
    def scaled(self) -> bool:
        """Only replay streams are scaled; transfer streams count as new-task data."""
        return self.key.startswith("replay:")


class Engine(Protocol):
    """Forward (`engine(...)`, e.g. through DeepSpeed) and one combined optimizer step."""

    def __call__(self, *args: Any, **kwargs: Any) -> Any: ...

    def step(self, sub_batches: Sequence[tuple[str, Callable[[], Any]]], *, progress: float,
             scale: bool, unscaled: Collection[str] = ()) -> Any: ...


@dataclass
class AdaptResult:
    steps: int
    losses: dict[str, list[float]] = field(default_factory=dict)  # per source key, per step it was in
    etas: dict[str, list[float]] = field(default_factory=dict)  # per scaled source key, per step it was in
    clamp_hits: dict[str, int] = field(default_factory=dict)  # per scaled key: steps whose eta hit the clamp
    resumed_from: int = 0  # steps a checkpoint had already done when this job (re)started

    def clamp_rate(self) -> float | None:
        """Share of all scaled (step, replayed task) pairs whose eta sat at a clamp bound."""
        total = sum(len(v) for v in self.etas.values())
        return sum(self.clamp_hits.values()) / total if total else None


def _loss(engine, qa: dict, lm: dict, *, path, lm_lambda: float, autocast: str,
          token_weights: Mapping[int, float] | None, scope=None) -> torch.Tensor:
    device = qa["input_ids"].device
    with torch.autocast(device.type, dtype=torch.bfloat16, enabled=autocast == "bf16"):
        return task_loss(engine, qa, lm, path=path, lm_lambda=lm_lambda, token_weights=token_weights,
                         scope=scope).float()


def _piece_loss(engine, qa: dict, lm: dict, *, dropout_seed: int, **kwargs) -> torch.Tensor:
    torch.manual_seed(dropout_seed)  # dropout masks by what the piece is, not by which rank runs it
    return _loss(engine, qa, lm, **kwargs)


def step_plan(keys: Sequence[str], total: int, *, mixing: str, seed: int | str) -> list[list[str]]:
    """The streams of every step: the anchor (keys[0]) and the others by `mixing` (module docstring).

    `alternate` keeps two rotations, one over the replay streams and one over
    the transfer streams (and any other keys), and takes the next of each per
    step: a replayed task gets the share of steps ACM gives it whether or not
    transfer streams exist.
    """
    if mixing not in MIXINGS:
        raise ValueError(f"mixing {mixing!r} unknown; choose one of {list(MIXINGS)}")
    anchor, others = keys[0], list(keys[1:])
    if mixing == "all" or not others:
        return [[anchor, *others] for _ in range(total)]
    rotations = [[k for k in others if k.startswith("replay:")], [k for k in others if not k.startswith("replay:")]]
    rotations = [r for r in rotations if r]
    queues: list[list[str]] = [[] for _ in rotations]
    plan = []
    for step in range(total):
        row = [anchor]
        for r, (keys_r, queue) in enumerate(zip(rotations, queues, strict=True)):
            if not queue:  # a new round over this rotation, in a freshly shuffled order
                queue.extend(keys_r)
                random.Random(f"{seed}:round:{r}:{step}").shuffle(queue)
            row.append(queue.pop(0))
        plan.append(row)
    return plan


def adapt(engine: Engine, *, sources: Sequence[Source], epochs: float, lm_lambda: float,
          scale: bool, progress: str = "epochs", autocast: str = "none", mixing: str = "alternate",
          token_weights: Mapping[int, float] | None = None, seed: int | str = 0,
          on_step: Callable[..., None] | None = None, start: int = 0, result: AdaptResult | None = None,
          checkpoint_every: int | None = None, virtual_shards: int = 0,
          on_checkpoint: Callable[[int, AdaptResult], None] | None = None) -> AdaptResult:
    """Run `epochs` over `sources[0]` (the anchor: new task, or first task for multitask).

    virtual_shards: V > 0 gives the engine V fixed pieces per sub-batch (module
    docstring); the engine must have been built with the same V.

    start/result: continue a run checkpointed after `start` steps (its result so
    far); `on_checkpoint(steps_done, result)` is called every `checkpoint_every`
    steps (default: every epoch), after the optimizer step.
    """
    if not sources or not len(sources[0].batches):
        raise ValueError("adaptation needs the new task's batches; its training split is empty")
    if progress not in ("epochs", "fraction"):
        raise ValueError(f"progress {progress!r} unknown; choose epochs or fraction")
    if getattr(engine, "virtual_shards", 0) != virtual_shards:
        raise ValueError(f"the job has virtual_shards={virtual_shards}, the engine was built with "
                         f"{getattr(engine, 'virtual_shards', 0)}; build both from the same train.virtual_shards")
    live = {s.key: s for s in sources if len(s.batches)}
    per_epoch = len(sources[0].batches)
    total = max(1, round(epochs * per_epoch))
    every = checkpoint_every or per_epoch
    result = result or AdaptResult(steps=total)
    unscaled = [k for k, s in live.items() if not s.scaled and k != sources[0].key]
    plan = step_plan(list(live), total, mixing=mixing, seed=seed)
    used = dict.fromkeys(live, 0)  # batches taken so far from each stream (a resumed run skips `start` steps)
    for keys in plan[:start]:
        for key in keys:
            used[key] += 1
    engine.module.train()
    device = next(engine.module.parameters()).device  # batches are built on the CPU
    for step, keys in enumerate(plan[start:], start=start):
        t = step / per_epoch if progress == "epochs" else step / total
        sub_batches = []
        for key in keys:
            loss_args = dict(path=live[key].path, scope=live[key].scope, lm_lambda=lm_lambda, autocast=autocast,
                             token_weights=token_weights)
            if virtual_shards:
                pieces = live[key].batches.shard_batches(used[key], virtual_shards)
                closure = {s: functools.partial(_piece_loss, engine, _to(qa, device), _to(lm, device), **loss_args,
                                                dropout_seed=zlib.crc32(f"{seed}:{step}:{key}:{s}".encode()))
                           for s, (qa, lm) in pieces.items()}
            else:
                qa, lm = (_to(b, device) for b in live[key].batches.batch(used[key]))
                closure = functools.partial(_loss, engine, qa, lm, **loss_args)
            used[key] += 1
            sub_batches.append((key, closure))
        try:
            stats = engine.step(sub_batches, progress=t, scale=scale, unscaled=[k for k in keys if k in unscaled])
        except ValueError as err:
            if "diverged" in str(err):  # the engine refuses non-finite gradients
                raise TrainingDiverged(f"adaptation diverged at step {step + 1} of {total}: {err}") from None
            raise
        bad = {k: v for k, v in getattr(stats, "losses", {}).items() if not math.isfinite(v)}
        if bad:
            raise TrainingDiverged(f"adaptation diverged at step {step + 1} of {total}: loss {bad} is not finite; "
                                   "lower train.lr (or train.full_finetune_lr) or check the data")
        for key, loss in getattr(stats, "losses", {}).items():
            result.losses.setdefault(key, []).append(float(loss))
        # an unscaled step (acm, lamol, the no-scaling ablation) reports eta 1 for every replayed task: that is
        # no measurement, and recording it would print "eta at clamp 0%" for methods that never scale
        for key, eta in (getattr(stats, "etas", {}) if getattr(stats, "scaled", True) else {}).items():
            result.etas.setdefault(key, []).append(float(eta))
            result.clamp_hits[key] = result.clamp_hits.get(key, 0) + bool(getattr(stats, "clamped", {}).get(key))
        if on_step is not None:
            on_step(step + 1, total, loss=float(getattr(stats, "losses", {}).get(keys[0], float("nan"))))
        if on_checkpoint is not None and (step + 1) % every == 0 and step + 1 < total:
            on_checkpoint(step + 1, result)
    return result


def _to(batch: dict, device: torch.device) -> dict:
    return batch if device.type == "cpu" else {k: v.to(device, non_blocking=True) for k, v in batch.items()}


@dataclass
class AdaptJob:
    """Everything one adaptation needs, as plain picklable values (runs in-process or on Ray Train).

    `sources` hold examples, not batches: each data-parallel rank batches its
    own shard. `trainable` is the path whose modules train, or None for full
    fine-tuning of the backbone (the lamol / finetune baselines).
    """

    sources: list[tuple[str, tuple[list[Example], list[Example]], list[int] | None]]  # (key, (qa, lm), path)
    trainable: list[int] | None
    epochs: float
    lm_lambda: float
    scale: bool
    progress: str
    batch_size: int
    pad_id: int
    seed: int
    autocast: str = "none"  # "bf16": forward/backward under bf16 autocast (fp32 weights and gradients)
    mixing: str = "alternate"  # how streams share the steps (module docstring)
    token_weights: dict[int, float] | None = None  # loss weight per target token (the answer separator)
    virtual_shards: int = 0  # > 0: fixed pieces per batch, results independent of the rank count
    rows: str | None = None  # the task whose token rows train with the path (DMEAModel.claim_token_rows)
    scopes: dict[str, tuple[str, ...]] = field(default_factory=dict)  # source key -> its token-row scope (Source)


def set_trainable(model, trainable: list[int] | None, rows: str | None = None) -> list[torch.nn.Parameter]:
    """Unfreeze exactly what a job trains and return it (modules of a path and the token rows of the task
    `rows`, or the whole backbone)."""
    model.set_trainable(trainable)
    if trainable is None:
        model.backbone.requires_grad_(True)
        return [p for p in model.backbone.parameters()]
    extra = model.token_rows_parameters(rows)
    for param in extra:
        param.requires_grad_(True)
    return model.trainable_parameters(trainable) + extra


def trained_state(model, trainable: list[int] | None, rows: str | None = None) -> dict[str, Any]:
    """The weights a job changed (CPU tensors): {"modules": the path's modules (and the task's token rows) in
    modeling.io's key scheme}, or {"backbone": its state dict} for full fine-tuning."""
    if trainable is None:
        return {"backbone": {k: v.detach().cpu().clone() for k, v in model.backbone.state_dict().items()}}
    return {"modules": modules_state(model, {layer: [m] for layer, m in enumerate(trainable)},
                                     rows=[rows] if rows else [])}


def load_trained_state(model, trainable: list[int] | None, state: dict[str, Any]) -> None:
    """Install what `trained_state` returned (e.g. from a Ray Train worker) into `model`."""
    if trainable is None:
        model.backbone.load_state_dict(state["backbone"])
        return
    installed = put_modules_state(model, state["modules"])
    expected = [(layer, m) for layer, m in enumerate(trainable)]
    if installed != expected:
        raise ValueError(f"trained weights hold modules {installed}, the job trains {expected}")


def run_adapt_job(model, job: AdaptJob, *, engine_factory: Callable, shard: tuple[int, int] = (0, 1),
                  on_step: Callable[..., None] | None = None, checkpoint_dir: str | Path | None = None,
                  checkpoint_every: int | None = None, barrier: Callable[[], None] | None = None,
                  after_checkpoint: Callable[[], None] | None = None) -> AdaptResult:
    """Train `model` in place on this rank's shard of `job`; everything is frozen again after.

    An engine factory that partitions the model it is given (ZeRO-3:
    `engine_factory.partitions_model`) trains a copy instead, whose gathered
    trainable weights are then loaded back: ZeRO-3 leaves its hooks and
    partitioned tensors on every module it saw, which later stages (search,
    generation) must not inherit.

    checkpoint_dir: every epoch (or `checkpoint_every` steps) the engine
    (trainable weights, optimizer), the step, the result so far and this
    rank's RNG are saved there (`adapt_checkpoint`); a job started on a folder
    holding a checkpoint of the same job continues from it, step for step as
    if it had never stopped. `barrier` syncs the ranks before a checkpoint is
    declared complete (multi-rank); `after_checkpoint()` runs on every rank
    once a checkpoint is complete (Ray Train reports it there).
    """
    isolate = getattr(engine_factory, "partitions_model", False)
    target = copy.deepcopy(model) if isolate else model
    params = set_trainable(target, job.trainable, job.rows)
    # dropout draws from a generator seeded by the job and rank, not by whatever ran before; on a GPU rank
    # whose CUDA is not up yet the seed reaches the CUDA generator when DeepSpeed moves the model there
    # (torch queues it), so only the CPU's and those of a CUDA already in use need forking (`cuda_in_use`)
    with torch.random.fork_rng(devices=cuda_in_use(), device_type="cuda"):
        torch.manual_seed(job.seed + shard[0])
        return _run(model, target, params, job, engine_factory=engine_factory, shard=shard, on_step=on_step,
                    isolate=isolate, checkpoint_dir=Path(checkpoint_dir) if checkpoint_dir else None,
                    checkpoint_every=checkpoint_every, barrier=barrier, after_checkpoint=after_checkpoint)


def cuda_in_use() -> list[int]:
    """The CUDA devices whose generators this process's training draws from: the current one (DeepSpeed's,
    `set_device(LOCAL_RANK)`) once CUDA is up here (a GPU rank, after its first job), none before.

    Not `torch.cuda.is_available()`: Ray leaves a node's GPUs visible to actors that reserve none, so a CPU
    training rank on a GPU node sees them too. Reading or setting a CUDA generator there creates a CUDA
    context on every visible GPU (memory taken beside the GPU ranks', and a failure where the GPUs are in
    exclusive-process mode), for generators its CPU training never uses.
    """
    return [torch.cuda.current_device()] if torch.cuda.is_initialized() else []


def _run(model, target, params, job: AdaptJob, *, engine_factory, shard, on_step, isolate: bool,
         checkpoint_dir: Path | None, checkpoint_every: int | None, barrier, after_checkpoint) -> AdaptResult:
    from dmea_dist.method import adapt_checkpoint

    engine = None
    try:
        engine = engine_factory(target, params)
        sources = [Source(key, BatchStream(qa, lm, batch_size=job.batch_size, pad_id=job.pad_id,
                                           seed=f"{job.seed}:{key}", shard=shard, token_weights=job.token_weights),
                          path, job.scopes.get(key))
                   for key, (qa, lm), path in job.sources]
        start, partial, on_checkpoint = 0, None, None
        if checkpoint_dir is not None:
            digest = adapt_checkpoint.job_digest(job, world_size=shard[1])
            start, partial = adapt_checkpoint.restore(engine, checkpoint_dir, digest=digest, rank=shard[0],
                                                      world=shard[1])
            if partial is not None:
                partial.resumed_from = start

            def on_checkpoint(steps: int, result: AdaptResult) -> None:
                adapt_checkpoint.save(engine, checkpoint_dir, digest=digest, steps=steps, result=result,
                                      rank=shard[0], barrier=barrier)
                if after_checkpoint is not None:
                    after_checkpoint()

        result = adapt(engine, sources=sources, epochs=job.epochs, lm_lambda=job.lm_lambda, scale=job.scale,
                       progress=job.progress, autocast=job.autocast, mixing=job.mixing,
                       token_weights=job.token_weights, seed=job.seed, on_step=on_step, start=start,
                       virtual_shards=job.virtual_shards,
                       result=partial, checkpoint_every=checkpoint_every, on_checkpoint=on_checkpoint)
        if isolate:
            state = engine.trainable_state_dict()  # a collective at ZeRO-3: every rank gets here
            missing = set(state) - {n for n, _ in model.named_parameters()}
            if missing:
                raise RuntimeError(f"trained parameters {sorted(missing)[:3]} have no counterpart in the model")
            model.load_state_dict(state, strict=False)
        return result
    finally:
        if engine is not None and hasattr(engine, "close"):
            engine.close()  # DeepSpeed's hooks on the model would keep this engine alive (ScaledStepEngine.close)
        target.set_trainable(None)
        target.backbone.requires_grad_(False)
