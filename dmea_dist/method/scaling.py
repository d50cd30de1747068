"""Dynamic gradient scaling of DMEA's adaptation stage (pure torch).

Every optimizer step of adaptation combines the gradient of the new-task batch
`g_j` with the gradients of replayed-task batches `g_i`:

    eta_i = (||g_j||^2 / ||g_i||^2 - 1) * exp(-t) + 1
    update direction = g_j + sum_i eta_i * g_i

with `t` the training progress in epochs (fractional). At t = 0, eta_i is the
squared-norm ratio ||g_j||^2 / ||g_i||^2 (a replayed task with a small gradient
is amplified, one with a large gradient damped); as `t` grows, eta_i decays to
1 and the plain sum is left.

Key decisions:
- eta is computed from squared norms that the caller has already reduced over
  all data-parallel ranks, so it is identical on every rank; it is a plain
  value (no autograd graph) and is clamped to `clamp` (default [0.1, 10]).
- The norms are combined in float64: a ratio of two sums of squares of
  millions of float32 values loses digits that would make eta rank- or
  order-dependent in float32.
- A replayed task whose gradient is exactly zero (`||g_i||^2 == 0`, e.g. its
  path shares no trainable module with this step's parameters) gets eta = 1:
  its contribution `eta_i * g_i` is zero whatever eta is, and 1 keeps the
  reported value finite and means "not scaled". A zero new-task gradient with
  a non-zero `g_i` needs no guard: the formula gives 1 - exp(-t), then clamped.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor

DEFAULT_CLAMP = (0.1, 10.0)


def squared_norm(grads: Sequence[Tensor | None]) -> Tensor:
    """Sum of squares of all entries of `grads` (None counts as zero), as a float64 scalar."""
    total = torch.zeros((), dtype=torch.float64)
    for grad in grads:
        if grad is not None:
            total = total + grad.detach().to(torch.float64).pow(2).sum().cpu()
    return total


def scale_factors(
    new_sq_norm: Tensor | float,
    replay_sq_norms: Tensor | Sequence[float],
    progress: float,
    *,
    clamp: tuple[float, float] = DEFAULT_CLAMP,
) -> Tensor:
    """Scale factor eta_i of every replayed task's gradient.

    new_sq_norm: ||g_j||^2, a scalar. replay_sq_norms: (n_replay,) the ||g_i||^2.
    progress: t, training progress in epochs (>= 0, fractional).
    Returns (n_replay,) float64, detached, clamped to `clamp`.
    """
    if not math.isfinite(progress) or progress < 0:
        raise ValueError(f"progress must be a finite number of epochs >= 0, got {progress!r}")
    low, high = clamp
    if not 0 <= low <= high:
        raise ValueError(f"clamp must be (low, high) with 0 <= low <= high, got {clamp!r}")
    new_sq = torch.as_tensor(new_sq_norm, dtype=torch.float64).detach().cpu()
    replay_sq = torch.as_tensor(replay_sq_norms, dtype=torch.float64).detach().cpu()
    if new_sq.dim() != 0:
        raise ValueError(f"new_sq_norm must be a scalar, got shape {tuple(new_sq.shape)}")
    if replay_sq.dim() != 1:
        raise ValueError(f"replay_sq_norms must be 1-D (n_replay,), got shape {tuple(replay_sq.shape)}")
    if bool(new_sq < 0) or bool((replay_sq < 0).any()):
        raise ValueError("squared norms must be >= 0; pass ||g||^2, not a signed value")

    zero = replay_sq == 0
    # (n_replay,); the zero entries are replaced below, the division is only kept finite.
    ratio = new_sq / torch.where(zero, torch.ones_like(replay_sq), replay_sq)
    etas = (ratio - 1.0) * math.exp(-progress) + 1.0
    etas = torch.where(zero, torch.ones_like(etas), etas)
    return etas.clamp(low, high)


def combine_gradients(
    new_grads: Sequence[Tensor | None],
    replay_grads: Sequence[Sequence[Tensor | None]],
    etas: Tensor | Sequence[float],
) -> list[Tensor | None]:
    """Per parameter, `g_j + sum_i eta_i * g_i`.

    new_grads: one gradient per parameter (None = no gradient, i.e. zero).
    replay_grads: (n_replay,) lists aligned with new_grads. etas: (n_replay,).
    Returns one tensor per parameter (None where every input is None); inputs are not modified.
    """
    eta_values = [float(eta) for eta in torch.as_tensor(etas, dtype=torch.float64).reshape(-1)]
    if len(eta_values) != len(replay_grads):
        raise ValueError(f"got {len(eta_values)} etas for {len(replay_grads)} replayed gradients")
    for i, grads in enumerate(replay_grads):
        if len(grads) != len(new_grads):
            raise ValueError(
                f"replayed gradient {i} has {len(grads)} tensors, the new-task gradient {len(new_grads)}"
            )
    combined: list[Tensor | None] = []
    for k, new in enumerate(new_grads):
        out = None if new is None else new.detach().clone()
        for eta, grads in zip(eta_values, replay_grads, strict=True):
            grad = grads[k]
            if grad is None:
                continue
            out = grad.detach() * eta if out is None else out.add_(grad.detach(), alpha=eta)
        combined.append(out)
    return combined
