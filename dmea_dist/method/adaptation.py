"""Adaptation: train the new task with knowledge transfer and pseudo-sample replay.

Every optimizer step takes one sub-batch from each *source*:

* `new`: the new task's real data, through the new task's path (g_j);
* `transfer:<task>`: pseudo samples of a selected similar task, through the
  new task's path (knowledge transfer);
* `replay:<task>`: pseudo samples of an earlier task, through that task's own
  path (against forgetting of the modules it shares with the new path).

and hands them to an engine step (`Engine`: the DeepSpeed wrapper in
dmea_dist.engine, or anything with the same contract), which combines the
per-source gradients as `g_j + sum_i eta_i g_i` (dynamic gradient scaling) or
plainly sums them. An epoch is one pass over the new task's batches; pseudo
sources cycle. Progress `t` is the fractional epoch (or the fraction of
training, by option).
"""

from __future__ import annotations

import copy
import functools
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch

from dmea_dist.data.formatting import Example, iterate_batches
from dmea_dist.method.training import task_loss


@dataclass
class Source:
    """The batches of one sub-batch stream and the path they run along."""

    key: str  # "new", "transfer:<task>", "replay:<task>", or a task id (multitask)
    batches: Sequence[tuple[dict, dict]]  # (qa_batch, lm_batch) pairs
    path: list[int] | None


class Engine(Protocol):
    """Forward (`engine(...)`, e.g. through DeepSpeed) and one combined optimizer step."""

    def __call__(self, *args: Any, **kwargs: Any) -> Any: ...

    def step(self, sub_batches: Sequence[tuple[str, Callable[[], Any]]], *, progress: float,
             scale: bool) -> Any: ...


@dataclass
class AdaptResult:
    steps: int
    losses: dict[str, list[float]] = field(default_factory=dict)  # per source key, per step
    etas: dict[str, list[float]] = field(default_factory=dict)  # per scaled source key, per step


def _loss(engine, qa: dict, lm: dict, *, path, lm_lambda: float, autocast: str) -> torch.Tensor:
    device = qa["input_ids"].device
    with torch.autocast(device.type, dtype=torch.bfloat16, enabled=autocast == "bf16"):
        return task_loss(engine, qa, lm, path=path, lm_lambda=lm_lambda).float()


def adapt(engine: Engine, *, sources: Sequence[Source], epochs: float, lm_lambda: float,
          scale: bool, progress: str = "epochs", autocast: str = "none",
          on_step: Callable[[int, int], None] | None = None) -> AdaptResult:
    """Run `epochs` over `sources[0]` (the anchor: new task, or first task for multitask)."""
    if not sources or not sources[0].batches:
        raise ValueError("adaptation needs the new task's batches; its training split is empty")
    if progress not in ("epochs", "fraction"):
        raise ValueError(f"progress {progress!r} unknown; choose epochs or fraction")
    live = [s for s in sources if s.batches]
    per_epoch = len(live[0].batches)
    total = max(1, round(epochs * per_epoch))
    result = AdaptResult(steps=total)
    engine.module.train()
    device = next(engine.module.parameters()).device  # batches are built on the CPU
    for step in range(total):
        t = step / per_epoch if progress == "epochs" else step / total
        sub_batches = []
        for src in live:
            qa, lm = (_to(b, device) for b in src.batches[step % len(src.batches)])
            sub_batches.append((src.key, functools.partial(_loss, engine, qa, lm, path=src.path,
                                                           lm_lambda=lm_lambda, autocast=autocast)))
        stats = engine.step(sub_batches, progress=t, scale=scale)
        for key, loss in getattr(stats, "losses", {}).items():
            result.losses.setdefault(key, []).append(float(loss))
        for key, eta in getattr(stats, "etas", {}).items():
            result.etas.setdefault(key, []).append(float(eta))
        if on_step is not None:
            on_step(step + 1, total)
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


def set_trainable(model, trainable: list[int] | None) -> list[torch.nn.Parameter]:
    """Unfreeze exactly what a job trains and return it (modules of a path, or the whole backbone)."""
    model.set_trainable(trainable)
    if trainable is None:
        model.backbone.requires_grad_(True)
        return [p for p in model.backbone.parameters()]
    return model.trainable_parameters(trainable)


def trained_state(model, trainable: list[int] | None) -> dict[str, Any]:
    """The weights a job changed: {"modules": {layer: state}} or {"backbone": state} (CPU tensors)."""
    if trainable is None:
        return {"backbone": {k: v.detach().cpu().clone() for k, v in model.backbone.state_dict().items()}}
    return {"modules": {layer: {k: v.detach().cpu().clone() for k, v in model.get_module(layer, m).state_dict().items()}
                        for layer, m in enumerate(trainable)}}


def load_trained_state(model, trainable: list[int] | None, state: dict[str, Any]) -> None:
    """Install what `trained_state` returned (e.g. from a Ray Train worker) into `model`."""
    if trainable is None:
        model.backbone.load_state_dict(state["backbone"])
        return
    for layer, module_state in state["modules"].items():
        model.put_module(int(layer), trainable[int(layer)], module_state)


def run_adapt_job(model, job: AdaptJob, *, engine_factory: Callable, shard: tuple[int, int] = (0, 1),
                  on_step: Callable[[int, int], None] | None = None) -> AdaptResult:
    """Train `model` in place on this rank's shard of `job`; everything is frozen again after.

    An engine factory that partitions the model it is given (ZeRO-3:
    `engine_factory.partitions_model`) trains a copy instead, whose gathered
    trainable weights are then loaded back: ZeRO-3 leaves its hooks and
    partitioned tensors on every module it saw, which later stages (search,
    generation) must not inherit.
    """
    isolate = getattr(engine_factory, "partitions_model", False)
    target = copy.deepcopy(model) if isolate else model
    params = set_trainable(target, job.trainable)
    # dropout draws from a generator seeded by the job and rank, not by whatever ran before
    with torch.random.fork_rng():
        torch.manual_seed(job.seed + shard[0])
        return _run(model, target, params, job, engine_factory=engine_factory, shard=shard, on_step=on_step,
                    isolate=isolate)


def _run(model, target, params, job: AdaptJob, *, engine_factory, shard, on_step, isolate: bool) -> AdaptResult:
    try:
        engine = engine_factory(target, params)
        sources = [Source(key, list(iterate_batches(qa, lm, batch_size=job.batch_size, pad_id=job.pad_id,
                                                    seed=job.seed, shard=shard)), path)
                   for key, (qa, lm), path in job.sources]
        result = adapt(engine, sources=sources, epochs=job.epochs, lm_lambda=job.lm_lambda, scale=job.scale,
                       progress=job.progress, autocast=job.autocast, on_step=on_step)
        if isolate:
            state = engine.trainable_state_dict()  # a collective at ZeRO-3: every rank gets here
            missing = set(state) - {n for n, _ in model.named_parameters()}
            if missing:
                raise RuntimeError(f"trained parameters {sorted(missing)[:3]} have no counterpart in the model")
            model.load_state_dict(state, strict=False)
        return result
    finally:
        target.set_trainable(None)
        target.backbone.requires_grad_(False)
