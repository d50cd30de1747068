"""The DeepSpeed engine wrapper with DMEA's gradient-scaled optimizer step.

The only module that imports DeepSpeed. `build_engine` wraps a model with a
frozen backbone in a `deepspeed.DeepSpeedEngine` (ZeRO 1, 2 or 3) optimizing
only the trainable parameters; `ScaledStepEngine.step` runs one optimizer step
over several task sub-batches with dynamic gradient scaling
(`dmea_dist.method.scaling`): update with `g_j + sum_i eta_i g_i + sum_t g_t`,
`g_j` the new task's gradient, `g_i` a replayed task's (scaled), `g_t` an
unscaled group's (knowledge transfer: weight 1, never compared). eta_i compares
`||g_i||^2` with `g_j` restricted to the parameter tensors where `g_i` is
non-zero (the matched rule, scaling.py's docstring says why).

One step (file:line in deepspeed 0.19.8, deepspeed/runtime/):
1. Every sub-batch's forward/backward runs inside
   `engine.coalesce_grad_reduction()` (engine.py:3239). While it is open the
   ZeRO gradient hooks return before reducing (zero/stage_1_and_2.py:2284,
   zero/stage3.py:2160) and the engine skips its all-reduce (engine.py:3163),
   so a backward only accumulates into `param.grad`, unreduced and full-size,
   at all three stages; at ZeRO-3 too, although the parameter itself is
   partitioned (`param.data` is empty between uses).
2. After each sub-batch the accumulated gradient is copied into row k of a
   (n_groups, n_trainable) buffer and `param.grad` is zeroed in place: group
   k's gradient is the difference of the accumulated gradients around its
   backward, and resetting the accumulator makes that difference exact (no
   cancellation against the earlier groups' sum). In place, because at ZeRO-3
   a full-size tensor cannot be assigned to the `.grad` of a partitioned
   parameter (torch checks its shape against `param.data`).
3. The buffer is averaged over the data-parallel group ZeRO reduces over
   (`engine.seq_data_parallel_group`, engine.py:2626); from it, a
   (n_groups, n_params) float64 table of each group's squared norm on each
   trainable tensor, one slice of the buffer per tensor (no index vector of
   the trainable size: ~30M entries for gpt2-xl's adapters). Matched norms,
   eta and the clamp flags come from that table of global gradients and are
   identical on every rank, at ZeRO-3 too (the buffer is full-size there).
4. The global `g_j + sum_i eta_i g_i + sum_t g_t` is written into
   `param.grad` in place. Leaving the block runs DeepSpeed's one reduction
   pass (engine.py:3300, 3327), which averages identical tensors; then
   `engine.step()` (clipping, AdamW) as usual.

Fixed virtual shards (`virtual_shards=V`, `train.virtual_shards`): results
that do not depend on the number of ranks. Above, each rank's gradient comes
from one backward over its share of the batch and the ranks' gradients are
summed by the all-reduce: both orders of summation change with the rank count,
and Adam turns a last-bit difference in a near-zero gradient into a full-size
step, so a run on 2 ranks drifts from the run on 1 (docs/BENCHMARKS.md,
scale-out). With V shards every global batch is cut into V fixed pieces (the
batch stream's `shard_batches`); a rank runs one forward/backward per piece it
owns (piece s belongs to rank s % world) into row (group, s) of a
(n_groups, V, n_trainable) buffer. The all-reduce of that buffer is exact:
every slot has one owner and every other rank adds exact zeros. Every rank
then sums the V pieces in index order and clips the update itself in float64
(DeepSpeed's own clipping is turned off: its norm is summed over partitions,
in an order that depends on the ranks). The update is written on rank 0 times
the world size, zeros elsewhere, so DeepSpeed's averaging pass (sum, times
1 / world) gives it back exactly when the world is a power of two. So 1, 2 or
4 ranks (dividing V) compute the same bits at equal torch thread counts; the
price is V smaller forwards per group instead of one per rank, and a buffer V
times the trainable size.

Other decisions:
- `gradient_accumulation_steps` must be 1: one block is one optimizer step;
  with more, `engine.step()` would not apply it (engine.py:3463). fp16/bf16
  are rejected: their optimizer wrappers are refused by the block
  (engine.py:3263) or keep gradients in `param.grad_accum`
  (zero/stage_1_and_2.py:402); the design runs fp32.
- Closures must run the forward through the engine (`eng(...)`), not the bare
  module: DeepSpeed resets its backward-hook state and arms the backward
  prologue there (engine.py:2983). Checked on every sub-batch.
- A failed step drops its gradients and ZeRO's accumulation state, else
  ZeRO-3 would add the next step onto it (zero/stage3.py:2024).
- A trainable parameter no sub-batch reaches has no gradient; ZeRO treats it
  as zero, so AdamW still decays it (torch would skip it).
- `scale=False` is the "no gradient scaling" ablation: the plain summed
  gradient, without the per-group buffer or extra communication.
- Unscaled groups keep their own buffer row although only their sum is used:
  it keeps the group-difference rule of step 2 uniform and reports each
  group's norm; one row costs one copy and its share of the all-reduce.
"""

from __future__ import annotations

import copy
import math
import os
from collections.abc import Callable, Collection, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
import torch.distributed as dist
from torch import Tensor, nn

from dmea_dist.config import check_scaled_step
from dmea_dist.errors import ConfigError
from dmea_dist.method.scaling import (
    DEFAULT_CLAMP,
    clamp_etas,
    combine_gradients,
    matched_sq_norms,
    raw_scale_factors,
)
from dmea_dist.rendezvous import open_store

if TYPE_CHECKING:
    from deepspeed import DeepSpeedEngine

Closure = Callable[[], Tensor]


@dataclass(frozen=True)
class StepStats:
    """What one gradient-scaled step did; plain floats, identical on every rank.

    losses: group key -> loss, mean over data-parallel ranks, in sub-batch order.
    etas: replayed group key -> eta, only the scaled groups (not the new task, not
      the unscaled ones); 1.0 for every replayed group when not scaled.
    clamped: replayed group key -> whether eta sits at a clamp bound because its
      raw value was outside (False for every replayed group when not scaled).
    sq_norms: group key -> ||g||^2 of its rank-averaged gradient, every group
      (empty when not scaled).
    matched_sq_norms: replayed group key -> ||g_j||^2 restricted to the parameter
      tensors where that group's gradient is non-zero, the numerator of its eta
      (empty when not scaled).
    scaled: whether the step scaled (`step(scale=...)`).
    """

    losses: dict[str, float]
    etas: dict[str, float]
    clamped: dict[str, bool]
    sq_norms: dict[str, float]
    matched_sq_norms: dict[str, float]
    scaled: bool


def build_engine(
    model: nn.Module,
    params: Sequence[nn.Parameter],
    *,
    ds_config: dict[str, Any],
    clamp: tuple[float, float] = DEFAULT_CLAMP,
    dist_backend: str | None = None,
    virtual_shards: int = 0,
) -> ScaledStepEngine:
    """Wrap `model` in a DeepSpeed engine that optimizes exactly `params`.

    ds_config: DeepSpeed's own config dict (ZeRO stage 1-3, an optimizer section,
    gradient_accumulation_steps 1); it is copied, not modified.
    dist_backend: default "gloo" on DeepSpeed's CPU accelerator, else "nccl".
    Joins an existing torch.distributed group (Ray Train, deepspeed launcher);
    without one and without RANK in the environment, starts a one-rank group.
    virtual_shards: V > 0 reduces over V fixed pieces of every batch, so results
    do not depend on the number of ranks (module docstring); the ranks must
    divide V, and `step` then takes {piece: closure} per group.
    """
    names = _check_params(model, params)
    deepspeed = import_deepspeed()
    on_cpu = deepspeed.get_accelerator().device_name() == "cpu"
    config = _check_ds_config(ds_config, on_cpu=on_cpu)
    clip = 0.0
    if virtual_shards:
        clip = float(config.get("gradient_clipping", 0.0) or 0.0)
        config["gradient_clipping"] = 0.0  # clipped in the engine, in a fixed order (module docstring)
    _init_distributed(deepspeed, dist_backend or ("gloo" if on_cpu else "nccl"))
    if virtual_shards:
        world = dist.get_world_size()
        if world & (world - 1):
            raise ConfigError(
                f"train.virtual_shards gives results independent of the rank count only on a power-of-two number "
                f"of training ranks (DeepSpeed's averaging is exact only there); got {world} ranks: use 1, 2, 4, "
                "... ranks, or train.virtual_shards: 0"
            )
        if virtual_shards % world:
            raise ConfigError(
                f"train.virtual_shards={virtual_shards} is not a multiple of the {world} training ranks; "
                f"set it to a multiple of every rank count you run on (e.g. {math.lcm(virtual_shards, world)})"
            )
    engine, *_ = deepspeed.initialize(model=model, model_parameters=list(params), config=config)
    if engine.gradient_accumulation_steps() != 1:
        raise ConfigError(
            f"ds_config implies gradient_accumulation_steps={engine.gradient_accumulation_steps()} "
            "(train_batch_size / micro batch / world size); give train_micro_batch_size_per_gpu only"
        )
    return ScaledStepEngine(engine, list(params), names, clamp=clamp, virtual_shards=virtual_shards, clip=clip)


class ScaledStepEngine:
    """A DeepSpeed engine plus the gradient-scaled optimizer step.

    `eng(*args, **kwargs)` runs the forward through DeepSpeed; closures passed to
    `step` must use it. `eng.engine` is the plain DeepSpeedEngine.
    """

    def __init__(
        self,
        engine: DeepSpeedEngine,
        params: list[nn.Parameter],
        names: list[str],
        *,
        clamp: tuple[float, float] = DEFAULT_CLAMP,
        virtual_shards: int = 0,
        clip: float = 0.0,
    ):
        self.engine = engine
        self.clamp = clamp
        self.virtual_shards = virtual_shards
        self._clip = clip  # with virtual shards: the engine clips (DeepSpeed's clipping is off)
        self._params = params
        self._names = names
        # ZeRO-3 partitions parameters (numel() is 0 between uses); ds_numel is the full size.
        self._numels = [int(getattr(p, "ds_numel", p.numel())) for p in params]
        self._offsets = [sum(self._numels[:k]) for k in range(len(params))]
        self._n_trainable = sum(self._numels)
        self._forward_calls = 0
        self._counter = engine.register_forward_pre_hook(self._count_forward)
        self.closed = False

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return self.engine(*args, **kwargs)

    @property
    def module(self) -> nn.Module:
        return self.engine.module

    @property
    def zero_stage(self) -> int:
        return int(self.engine.zero_optimization_stage())

    @property
    def world_size(self) -> int:
        return dist.get_world_size(group=self.engine.seq_data_parallel_group)

    def step(
        self,
        sub_batches: Sequence[tuple[str, Closure]],
        *,
        progress: float,
        scale: bool = True,
        unscaled: Collection[str] = (),
    ) -> StepStats:
        """One optimizer step over `sub_batches`: (group key, closure returning the loss).

        The first group is the new task (g_j). Groups whose key is in `unscaled`
        (knowledge transfer, e.g. "transfer:<task>") are added with weight 1 and
        never compared; every other group is a replayed task (g_i), scaled by eta_i.
        progress: training progress in epochs (fractional), the t of exp(-t).
        scale=False: the plain sum of the group gradients (ablation).
        With virtual shards each group's closure is a {piece: closure} dict of
        the pieces this rank owns (module docstring).
        """
        if self.closed:
            raise RuntimeError("this engine was closed; build a new one (build_engine) to train again")
        keys, closures = _check_sub_batches(sub_batches, pieces=self._my_pieces() if self.virtual_shards else None)
        unscaled_rows = _check_unscaled(keys, unscaled)
        if not math.isfinite(progress) or progress < 0:
            raise ValueError(f"progress must be a finite number of epochs >= 0, got {progress!r}")
        self._check_no_pending_grads()
        if self.virtual_shards:
            return self._sharded_step(keys, closures, unscaled_rows, progress, scale)
        device = self._params[0].device
        losses = torch.zeros(len(keys), dtype=torch.float64, device=device)  # (n_groups,)
        grads, scaling = None, None
        if scale:
            # (n_groups, n_trainable): row k is group k's flattened gradient.
            grads = torch.zeros(len(keys), self._n_trainable, dtype=self._params[0].dtype, device=device)
        try:
            with self.engine.coalesce_grad_reduction():
                for k, (key, closure) in enumerate(zip(keys, closures, strict=True)):
                    loss = self._forward(key, closure)
                    self.engine.backward(loss)
                    losses[k] = loss.detach()
                    if grads is not None:
                        self._take_group_grad(grads[k], reset=k < len(keys) - 1)
                if grads is not None:
                    scaling = self._scale_and_write(grads, unscaled_rows, progress)
        except BaseException:
            self.engine.optimizer.zero_grad()  # drop the half-done step (module docstring)
            raise
        self.engine.step()
        losses = dict(zip(keys, self._mean_over_ranks(losses).tolist(), strict=True))
        replay_keys = [key for k, key in enumerate(keys) if k > 0 and k not in unscaled_rows]
        return _step_stats(keys, replay_keys, losses, scaling)

    def close(self) -> None:
        """Release the DeepSpeed engine: its optimizer's gradient hooks and its forward hooks on the model.

        DeepSpeed leaves both on the model it wrapped, and they hold the engine,
        its optimizer state and flat buffers: on a model that lives for a run
        (a training worker adapting task after task), every task's engine would
        stay alive, and every forward would run all of their hooks. Idempotent.
        """
        if self.closed:
            return
        self.closed = True
        engine = self.engine
        engine.destroy()  # the ZeRO optimizer's gradient-accumulation hooks (stage 1/2) or parameter hooks (3)
        for name in ("module_forward_pre_hook", "module_forward_post_hook"):
            handle = getattr(engine, name, None)
            if handle is not None:  # DeepSpeed's destroy() leaves these on the module
                handle.remove()
                setattr(engine, name, None)
        self._counter.remove()
        if self.zero_stage == 3:
            _forget_zero3_module(engine.module)

    def _my_pieces(self) -> list[int]:
        rank = dist.get_rank(group=self.engine.seq_data_parallel_group)
        return list(range(rank, self.virtual_shards, self.world_size))

    def _sharded_step(self, keys: list[str], closures: list[dict[int, Closure]], unscaled_rows: set[int],
                      progress: float, scale: bool) -> StepStats:
        """`step` over fixed pieces: the same bits for any rank count dividing V (module docstring)."""
        device = self._params[0].device
        n_groups, n_pieces = len(keys), self.virtual_shards
        losses = torch.zeros(n_groups, n_pieces, dtype=torch.float64, device=device)
        # (n_groups, V, n_trainable): slot (k, s) is group k's gradient on piece s, filled by s's owner only
        pieces = torch.zeros(n_groups, n_pieces, self._n_trainable, dtype=self._params[0].dtype, device=device)
        scaling = None
        try:
            with self.engine.coalesce_grad_reduction():
                for k, key in enumerate(keys):
                    for s, closure in sorted(closures[k].items()):
                        loss = self._forward(f"{key}[piece {s}]", closure)
                        self.engine.backward(loss)
                        losses[k, s] = loss.detach()
                        self._take_group_grad(pieces[k, s], reset=True)
                # exact: every other rank adds zeros to a slot
                self._sum_over_ranks(pieces)
                self._sum_over_ranks(losses)
                grads = _sum_in_order(pieces, dim=1)  # (n_groups, n_trainable)
                del pieces
                if scale:
                    update, scaling = self._scaled_update(grads, unscaled_rows, progress)
                else:
                    update = _sum_in_order(grads, dim=0)  # the groups, in order
                self._write_grads(self._clip_in_order(update), owner_only=True)
        except BaseException:
            self.engine.optimizer.zero_grad()  # drop the half-done step (module docstring)
            raise
        self.engine.step()
        losses = dict(zip(keys, _sum_in_order(losses, dim=1).tolist(), strict=True))
        replay_keys = [key for k, key in enumerate(keys) if k > 0 and k not in unscaled_rows]
        return _step_stats(keys, replay_keys, losses, scaling)

    def _clip_in_order(self, update: Tensor) -> Tensor:
        """DeepSpeed's rule (scale by clip / (norm + 1e-6) when below 1), with the norm summed per tensor in
        a fixed order in float64."""
        if not self._clip:
            return update
        coef = self._clip / (math.sqrt(float(self._param_sq_norms(update.unsqueeze(0)).sum())) + 1e-6)
        return update.mul_(coef) if coef < 1.0 else update

    def trainable_state_dict(self) -> dict[str, Tensor]:
        """Full CPU copies of the trainable parameters by name. At ZeRO-3 call it on every rank."""
        import deepspeed

        # Gathers the partitions at ZeRO-3 (a collective); a no-op for unpartitioned parameters.
        with deepspeed.zero.GatheredParameters(self._params, enabled=self.zero_stage == 3):
            return {n: p.detach().cpu().clone() for n, p in zip(self._names, self._params, strict=True)}

    def save_checkpoint(self, save_dir: str | os.PathLike, *, tag: str | None = None) -> None:
        """DeepSpeed checkpoint of the trainable parameters and optimizer state (no backbone)."""
        self.engine.save_checkpoint(str(save_dir), tag=tag, exclude_frozen_parameters=True)

    def load_checkpoint(self, load_dir: str | os.PathLike, *, tag: str | None = None) -> None:
        """Load a checkpoint written by `save_checkpoint`; the frozen backbone stays as built."""
        path, _ = self.engine.load_checkpoint(str(load_dir), tag=tag, load_module_strict=False)
        if path is None:
            raise FileNotFoundError(f"no DeepSpeed checkpoint (tag {tag!r}) under {load_dir}")

    def _count_forward(self, module: nn.Module, args: Any) -> None:
        self._forward_calls += 1

    def _forward(self, key: str, closure: Closure) -> Tensor:
        calls = self._forward_calls
        loss = closure()
        if self._forward_calls == calls:
            raise RuntimeError(
                f"sub-batch {key!r}: the closure did not run a forward through the DeepSpeed engine; "
                "call the ScaledStepEngine (eng(...)) instead of the bare module, DeepSpeed's "
                "per-forward bookkeeping runs there"
            )
        if not isinstance(loss, Tensor) or loss.numel() != 1:
            shape = f" of shape {tuple(loss.shape)}" if isinstance(loss, Tensor) else ""
            raise TypeError(
                f"sub-batch {key!r}: the closure must return a scalar loss tensor, "
                f"got {type(loss).__name__}{shape}"
            )
        if not loss.requires_grad:
            raise ValueError(
                f"sub-batch {key!r}: its loss does not depend on any trainable parameter (its path "
                "reaches none of the engine's parameters, or it ran under torch.no_grad); leave "
                "this task out of the step"
            )
        return loss.reshape(())

    def _check_no_pending_grads(self) -> None:
        for name, param in zip(self._names, self._params, strict=True):
            if param.grad is not None:
                raise RuntimeError(
                    f"parameter {name!r} already holds a gradient before the step; run every "
                    "backward inside ScaledStepEngine.step (DeepSpeed clears gradients after each step)"
                )

    def _take_group_grad(self, row: Tensor, *, reset: bool) -> None:
        """Move the gradient accumulated since the last reset into `row` (n_trainable,)."""
        for param, offset, numel in zip(self._params, self._offsets, self._numels, strict=True):
            grad = param.grad
            if grad is None:  # no sub-batch so far reached this parameter: row stays 0
                continue
            row[offset:offset + numel].copy_(grad.reshape(-1))
            if reset:
                grad.zero_()

    def _scale_and_write(self, grads: Tensor, unscaled_rows: set[int], progress: float) -> _Scaling:
        """Average `grads` (n_groups, n_trainable) over ranks, compute eta, write the update."""
        update, scaling = self._scaled_update(self._mean_over_ranks(grads), unscaled_rows, progress)
        self._write_grads(update)
        return scaling

    def _scaled_update(self, grads: Tensor, unscaled_rows: set[int], progress: float) -> tuple[Tensor, _Scaling]:
        """From the global group gradients (n_groups, n_trainable): eta and `g_j + sum_i eta_i g_i + sum_t g_t`."""
        param_sq = self._param_sq_norms(grads)  # (n_groups, n_params), float64 on the CPU
        replay = [k for k in range(1, len(grads)) if k not in unscaled_rows]
        matched = matched_sq_norms(param_sq[[0, *replay]])  # (n_replay,)
        raw = raw_scale_factors(matched, param_sq[replay].sum(dim=1), progress)
        etas, clamped = clamp_etas(raw, self.clamp)
        (update,) = combine_gradients(
            [grads[0]], [[grads[k]] for k in replay], etas, [[grads[k]] for k in sorted(unscaled_rows)]
        )
        return update, _Scaling(etas=etas.tolist(), clamped=clamped.tolist(),
                                sq_norms=param_sq.sum(dim=1).tolist(), matched_sq_norms=matched.tolist())

    def _param_sq_norms(self, grads: Tensor) -> Tensor:
        """(n_groups, n_params) float64: each group's squared norm on each trainable tensor.

        One slice of `grads` (n_groups, n_trainable) per tensor, all on the device
        and one transfer at the end (a single sync, not one per tensor).
        """
        columns = [
            torch.linalg.vector_norm(grads[:, offset:offset + numel], dim=1, dtype=torch.float64)
            for offset, numel in zip(self._offsets, self._numels, strict=True)
        ]  # n_params x (n_groups,); float64 accumulation, see dmea_dist.method.scaling on precision
        return torch.stack(columns, dim=1).cpu().pow(2)

    def _write_grads(self, update: Tensor, *, owner_only: bool = False) -> None:
        """Put `update` (identical on every rank) into `param.grad` for DeepSpeed's averaging pass.
        owner_only: rank 0 writes update x world and the others zeros (exact for a power-of-two world)."""
        if owner_only:
            update = owner_share(update, rank=dist.get_rank(group=self.engine.seq_data_parallel_group),
                                 world=self.world_size)
        for name, param, offset, numel in zip(
            self._names, self._params, self._offsets, self._numels, strict=True
        ):
            piece = update[offset:offset + numel]
            if param.grad is not None:
                param.grad.copy_(piece.view_as(param.grad))
            elif bool(piece.any()):
                # Another rank's sub-batch reached this parameter, this rank's did not.
                if self.zero_stage == 3:
                    raise RuntimeError(
                        f"parameter {name!r} has a gradient on another rank but not on this one; at "
                        "ZeRO-3 every rank must route each group through the same modules"
                    )
                param.grad = piece.view_as(param).clone()

    def _sum_over_ranks(self, tensor: Tensor) -> Tensor:
        group = self.engine.seq_data_parallel_group
        if dist.get_world_size(group=group) > 1:
            dist.all_reduce(tensor, op=dist.ReduceOp.SUM, group=group)
        return tensor

    def _mean_over_ranks(self, tensor: Tensor) -> Tensor:
        world_size = self.world_size
        return self._sum_over_ranks(tensor).div_(world_size) if world_size > 1 else tensor


@dataclass(frozen=True)
class _Scaling:
    """What `_scale_and_write` computed, as lists: per replayed group (etas, clamped,
    matched_sq_norms) and per group (sq_norms), in sub-batch order."""

    etas: list[float]
    clamped: list[bool]
    sq_norms: list[float]
    matched_sq_norms: list[float]


def _step_stats(
    keys: list[str], replay_keys: list[str], losses: dict[str, float], scaling: _Scaling | None
) -> StepStats:
    if scaling is None:  # the plain sum: nothing compared, nothing scaled
        return StepStats(losses=losses, etas=dict.fromkeys(replay_keys, 1.0),
                         clamped=dict.fromkeys(replay_keys, False), sq_norms={}, matched_sq_norms={},
                         scaled=False)
    return StepStats(
        losses=losses,
        etas=dict(zip(replay_keys, scaling.etas, strict=True)),
        clamped=dict(zip(replay_keys, scaling.clamped, strict=True)),
        sq_norms=dict(zip(keys, scaling.sq_norms, strict=True)),
        matched_sq_norms=dict(zip(replay_keys, scaling.matched_sq_norms, strict=True)),
        scaled=True,
    )


def _check_unscaled(keys: list[str], unscaled: Collection[str]) -> set[int]:
    """Rows (sub-batch indices) of the unscaled groups; each key must name a non-first group."""
    if isinstance(unscaled, str):  # a bare key would be read as a set of characters
        raise TypeError(f"unscaled must be a collection of group keys, got the string {unscaled!r}; "
                        f"write unscaled=[{unscaled!r}]")
    rows = set()
    for key in unscaled:
        if key not in keys:
            raise ValueError(f"unscaled group {key!r} is not among this step's groups {keys}; "
                             "pass only the keys of sub-batches in the step")
        if key == keys[0]:
            raise ValueError(f"unscaled group {key!r} is the first group, the new task (g_j), "
                             "which every other group is compared with; it cannot be unscaled")
        rows.add(keys.index(key))
    return rows


def _forget_zero3_module(module: nn.Module) -> None:
    """Drop what ZeRO-3 keeps of `module` in process-wide state after its engine is destroyed.

    DeepSpeed 0.19 keeps, for the life of the process, every ZeRO-3 root module
    in `parameter_offload.FWD_MODULE_STACK` (pushed at set-up, never popped)
    and every parameter coordinator in the class-wide
    `functools.lru_cache(maxsize=None)` of
    `PartitionedParameterCoordinator.__params_to_release`; either holds the
    engine, its optimizer and the model copy it partitioned. The cache only
    memoises a pure lookup: emptying it costs a live engine a recomputation.
    """
    from deepspeed.runtime.zero import parameter_offload
    from deepspeed.runtime.zero.partitioned_param_coordinator import PartitionedParameterCoordinator

    stack = getattr(parameter_offload, "FWD_MODULE_STACK", None)
    if isinstance(stack, list):
        stack[:] = [m for m in stack if m is not module]
    fn = getattr(PartitionedParameterCoordinator, "_PartitionedParameterCoordinator__params_to_release", None)
    for _ in range(3):  # the cache sits under DeepSpeed's nvtx decorator, which keeps it in its closure
        if fn is None or hasattr(fn, "cache_clear"):
            break
        inner = [c.cell_contents for c in (getattr(fn, "__closure__", None) or ()) if callable(c.cell_contents)]
        fn = getattr(fn, "__wrapped__", None) or (inner[0] if inner else None)
    if fn is not None and hasattr(fn, "cache_clear"):
        fn.cache_clear()


def owner_share(update: Tensor, *, rank: int, world: int) -> Tensor:
    """What rank `rank` writes so that a sum over the ranks times 1 / world gives `update` back bit for bit.

    Every rank writing `update` itself is not exact in general: 8 identical float32 values summed one after
    another and scaled by 1/8 differ from the value in about 4 of 10 elements (rounding of the partial sums;
    2 and 4 copies came back exact on 100,000 random values, which the rounding argument does not promise).
    `update x world` on rank 0 and zeros elsewhere sums exactly in any order, and scaling by a power of two
    is exact. In place.
    """
    if world == 1:
        return update
    return update.mul_(world) if rank == 0 else update.zero_()


def _sum_in_order(tensor: Tensor, *, dim: int) -> Tensor:
    """`tensor` summed over `dim`, its slices added one after another in index order (whatever rank or thread
    count computed them; torch's own sum may split a reduction differently)."""
    total = tensor.select(dim, 0).clone()
    for s in range(1, tensor.shape[dim]):
        total += tensor.select(dim, s)
    return total


def _check_sub_batches(sub_batches: Sequence[tuple[str, Any]], *, pieces: list[int] | None = None
                       ) -> tuple[list[str], list[Any]]:
    """Keys and closures; with `pieces` (virtual shards) each closure is {piece: closure} over exactly them."""
    if len(sub_batches) == 0:
        raise ValueError("step needs at least one sub-batch: the new task's ('new', closure)")
    keys, closures = [], []
    for item in sub_batches:
        if pieces is not None and isinstance(item, tuple) and len(item) == 2 and isinstance(item[0], str) \
                and isinstance(item[1], dict):
            if sorted(item[1]) != pieces or not all(callable(c) for c in item[1].values()):
                raise ValueError(f"sub-batch {item[0]!r}: with virtual shards each group gives one closure per "
                                 f"piece this rank owns, {{piece: closure}} for pieces {pieces}; got pieces "
                                 f"{sorted(item[1])}")
        elif pieces is not None:
            raise TypeError(f"with virtual shards each sub-batch is (group_key, {{piece: closure}}), got {item!r}")
        elif not (isinstance(item, tuple) and len(item) == 2 and isinstance(item[0], str) and callable(item[1])):
            raise TypeError(f"each sub-batch must be a (group_key: str, closure) pair, got {item!r}")
        if item[0] in keys:
            raise ValueError(
                f"group key {item[0]!r} appears twice; give each task one sub-batch per step "
                "(its gradient is scaled as one)"
            )
        keys.append(item[0])
        closures.append(item[1])
    return keys, closures


def _check_params(model: nn.Module, params: Sequence[nn.Parameter]) -> list[str]:
    """Names of `params` in `model`; they must be exactly the model's trainable parameters."""
    names = {id(p): n for n, p in model.named_parameters()}
    seen: set[int] = set()
    for k, param in enumerate(params):
        if id(param) not in names:
            raise ValueError(f"params[{k}] (shape {tuple(param.shape)}) is not a parameter of the model")
        if not param.requires_grad:
            raise ValueError(f"params[{k}] ({names[id(param)]}) is frozen; pass only trainable parameters")
        if id(param) in seen:
            raise ValueError(f"params[{k}] ({names[id(param)]}) is listed twice")
        seen.add(id(param))
    if not params:
        raise ValueError("params is empty: nothing to train")
    for name, param in model.named_parameters():
        if param.requires_grad and id(param) not in seen:
            raise ValueError(
                f"model parameter {name!r} requires grad but is not in params; freeze it "
                "(requires_grad_(False)) or pass it to build_engine"
            )
    return [names[id(p)] for p in params]


def _check_ds_config(ds_config: dict[str, Any], *, on_cpu: bool) -> dict[str, Any]:
    config = copy.deepcopy(ds_config)
    check_scaled_step(config, name=lambda *keys: "ds_config" + "".join(f"[{key!r}]" for key in keys), default_stage=0)
    optimizer = config.get("optimizer")
    if not isinstance(optimizer, dict) or "type" not in optimizer:
        raise ConfigError(
            "ds_config has no 'optimizer' section with a 'type'; add e.g. "
            "{'type': 'AdamW', 'params': {'lr': 1.75e-4, 'torch_adam': true}}"
        )
    adam = str(optimizer["type"]).lower() in ("adam", "adamw")
    if on_cpu and adam and not optimizer.get("params", {}).get("torch_adam", False):
        raise ConfigError(
            "ds_config['optimizer']['params']['torch_adam'] must be true on CPU "
            "(DeepSpeed's fused Adam needs CUDA)"
        )
    return config


def import_deepspeed():
    """DeepSpeed, imported (the only place it is): on its CPU accelerator where no GPU is visible."""
    # DeepSpeed picks its accelerator once, at first use: CPU unless CUDA is present
    # or DS_ACCELERATOR says otherwise (set it to "cpu" for CPU runs on GPU nodes).
    if "DS_ACCELERATOR" not in os.environ and not torch.cuda.is_available():
        os.environ["DS_ACCELERATOR"] = "cpu"
    import deepspeed

    return deepspeed


def _init_distributed(deepspeed, dist_backend: str) -> None:
    if not dist.is_initialized() and os.environ.get("WORLD_SIZE", "1") == "1":
        # A single process (tests, debugging, a Ray actor): a one-rank group on its own store, on a port the
        # OS picks and the store holds (dmea_dist/rendezvous.py: a port found free and bound later by DeepSpeed
        # could be taken in between on a busy node). Its own, not inherited: a process started from one that
        # already ran an engine (a Ray worker of the driver) inherits MASTER_PORT, which that first process
        # still listens on. The variables are for DeepSpeed, which looks for them before it sees the group.
        store = open_store()
        os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1",
                          MASTER_PORT=str(store.port))
        dist.init_process_group(dist_backend, store=store, rank=0, world_size=1)
    if deepspeed.get_accelerator().device_name() == "cpu":
        _no_shared_memory_op(deepspeed)
    deepspeed.init_distributed(dist_backend=dist_backend)


def _no_shared_memory_op(deepspeed) -> None:
    """Keep DeepSpeed's CPU comm backend from loading its shared-memory all-reduce op.

    To decide whether to load it, DeepSpeed probes every op it ships (compiler subprocesses, in every process
    that builds an engine: ~0.6 s measured here) and then JIT-compiles the op with g++ and ninja (33 s, the
    first time on a machine, which then needs a compiler). The op serves only `inference_all_reduce`
    (tensor-parallel inference); training reduces through torch.distributed. So the probe's one answer that matters is given here, once per process: no
    shared-memory op. A probe that already ran (someone asked DeepSpeed first) is left as it is.
    """
    ops = deepspeed.ops
    if "__compatible_ops__" not in vars(ops):  # DeepSpeed fills it on first access and keeps it there
        ops.__compatible_ops__ = {"deepspeed_shm_comm": False}

