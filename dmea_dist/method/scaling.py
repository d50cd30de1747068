"""Dynamic gradient scaling of DMEA's adaptation stage (pure torch).

Every optimizer step of adaptation combines the gradient of the new-task batch
`g_j` with the gradients of replayed-task batches `g_i` and of knowledge-transfer
batches `g_t` (pseudo samples of a selected task run through the new path):

    eta_i = (||g_j|S_i||^2 / ||g_i||^2 - 1) * exp(-t) + 1
    update direction = g_j + sum_i eta_i * g_i + sum_t g_t

with `t` the training progress in epochs (fractional). At t = 0, eta_i is the
squared-norm ratio (a replayed task with a small gradient is amplified, one
with a large gradient damped); as `t` grows, eta_i decays to 1 and the plain
sum is left. Only replay streams are scaled (DMEA's rule, arXiv 2310.09886): transfer
streams train the new path on the new task's behalf and are added with weight
exactly 1, never compared.

The matched rule (`matched_sq_norms`): `S_i` is the set of trainable parameter
tensors on which `g_i` is non-zero, and `g_j|S_i` is `g_j` restricted to them.
During adaptation only the new task's path trains, so a replayed task's
gradient reaches only the modules its own path shares with the new path: every
other trainable tensor gets exactly zero gradient from it, while `g_j` covers
every layer. Comparing `||g_i||^2` with the whole `||g_j||^2` measures how many
layers the paths share, not how large the two gradients are where they meet:
with 1 of 4 layers shared the ratio is about 4x too large and eta sits at the
clamp. Restricting `g_j` to `S_i` compares the two norms over the same
parameters. "Non-zero" rather than "reached by the path" because it needs
nothing but the gradients; a reached tensor whose gradient is exactly zero
adds nothing to `||g_i||^2` either, so leaving it out keeps the two sides
matched. Membership is per tensor (a module's weight or bias), the unit a path
selects.

Key decisions:
- eta is computed from squared norms that the caller has already reduced over
  all data-parallel ranks, so it is identical on every rank; it is a plain
  value (no autograd graph) and is clamped to `clamp` (default [0.1, 10]).
  `clamp_etas` also says which etas the clamp changed, for monitoring: a
  replayed task clamped step after step is a sign the norms are mismatched.
- The norms are combined in float64: a ratio of two sums of squares of
  millions of float32 values loses digits that would make eta rank- or
  order-dependent in float32.
- A replayed task whose gradient is exactly zero (`||g_i||^2 == 0`, e.g. its
  path shares no trainable module with this step's parameters) gets eta = 1:
  its contribution `eta_i * g_i` is zero whatever eta is, and 1 keeps the
  reported value finite and means "not scaled". A zero matched new-task norm
  with a non-zero `g_i` needs no guard: the formula gives 1 - exp(-t), then
  clamped.
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


def matched_sq_norms(param_sq_norms: Tensor) -> Tensor:
    """Per replayed task i, ||g_j restricted to S_i||^2 (module docstring: the matched rule).

    param_sq_norms: (n_groups, n_params), entry [k, p] = squared norm of group k's
    gradient on trainable parameter tensor p; row 0 is the new task (g_j), rows
    1.. the replayed tasks (g_i). Returns (n_groups - 1,) float64, detached.
    """
    sq = torch.as_tensor(param_sq_norms, dtype=torch.float64).detach().cpu()
    if sq.dim() != 2 or sq.shape[0] < 1:
        raise ValueError(
            f"param_sq_norms must be (n_groups, n_params) with the new task in row 0, got shape {tuple(sq.shape)}"
        )
    if not bool(sq.isfinite().all()):
        raise ValueError("param_sq_norms holds NaN or inf: a gradient diverged (check the loss and "
                         "the learning rate)")
    if bool((sq < 0).any()):
        raise ValueError("param_sq_norms must be >= 0; pass squared norms, not signed values")
    support = (sq[1:] > 0).to(torch.float64)  # (n_replay, n_params): 1 where g_i is non-zero
    return support @ sq[0]  # (n_replay,)


def raw_scale_factors(
    new_sq_norm: Tensor | float | Sequence[float],
    replay_sq_norms: Tensor | Sequence[float],
    progress: float,
) -> Tensor:
    """eta_i before clamping.

    new_sq_norm: the new task's squared norm, either one scalar ||g_j||^2 shared by
    every replayed task or (n_replay,) the matched ||g_j|S_i||^2 (`matched_sq_norms`).
    replay_sq_norms: (n_replay,) the ||g_i||^2. progress: t in epochs (>= 0).
    Returns (n_replay,) float64, detached; 1 where ||g_i||^2 == 0.
    """
    if not math.isfinite(progress) or progress < 0:
        raise ValueError(f"progress must be a finite number of epochs >= 0, got {progress!r}")
    new_sq = torch.as_tensor(new_sq_norm, dtype=torch.float64).detach().cpu()
    replay_sq = torch.as_tensor(replay_sq_norms, dtype=torch.float64).detach().cpu()
    if replay_sq.dim() != 1:
        raise ValueError(f"replay_sq_norms must be 1-D (n_replay,), got shape {tuple(replay_sq.shape)}")
    if new_sq.dim() != 0 and new_sq.shape != replay_sq.shape:
        raise ValueError(
            f"new_sq_norm must be a scalar or (n_replay,) = {tuple(replay_sq.shape)} like "
            f"replay_sq_norms, got shape {tuple(new_sq.shape)}"
        )
    if bool((new_sq < 0).any()) or bool((replay_sq < 0).any()):
        raise ValueError("squared norms must be >= 0; pass ||g||^2, not a signed value")

    zero = replay_sq == 0
    # (n_replay,); the zero entries are replaced below, the division is only kept finite.
    ratio = new_sq / torch.where(zero, torch.ones_like(replay_sq), replay_sq)
    etas = (ratio - 1.0) * math.exp(-progress) + 1.0
    return torch.where(zero, torch.ones_like(etas), etas)


def clamp_etas(raw_etas: Tensor, clamp: tuple[float, float] = DEFAULT_CLAMP) -> tuple[Tensor, Tensor]:
    """(etas clamped to `clamp`, bool mask of those the clamp changed), both shaped like `raw_etas`.

    A raw eta exactly on a bound is not counted as clamped: the clamp left it as it was.
    """
    low, high = clamp
    if not 0 <= low <= high:
        raise ValueError(f"clamp must be (low, high) with 0 <= low <= high, got {clamp!r}")
    raw = torch.as_tensor(raw_etas, dtype=torch.float64)
    return raw.clamp(low, high), (raw < low) | (raw > high)


def scale_factors(
    new_sq_norm: Tensor | float | Sequence[float],
    replay_sq_norms: Tensor | Sequence[float],
    progress: float,
    *,
    clamp: tuple[float, float] = DEFAULT_CLAMP,
) -> Tensor:
    """Scale factor eta_i of every replayed task's gradient: `raw_scale_factors`, clamped.

    new_sq_norm: a scalar ||g_j||^2 or (n_replay,) matched norms. replay_sq_norms:
    (n_replay,) the ||g_i||^2. progress: t, training progress in epochs (>= 0, fractional).
    Returns (n_replay,) float64, detached, clamped to `clamp`.
    """
    etas, _ = clamp_etas(raw_scale_factors(new_sq_norm, replay_sq_norms, progress), clamp)
    return etas


def combine_gradients(
    new_grads: Sequence[Tensor | None],
    replay_grads: Sequence[Sequence[Tensor | None]],
    etas: Tensor | Sequence[float],
    unscaled_grads: Sequence[Sequence[Tensor | None]] = (),
) -> list[Tensor | None]:
    """Per parameter, `g_j + sum_i eta_i * g_i + sum_t g_t`.

    new_grads: one gradient per parameter (None = no gradient, i.e. zero).
    replay_grads: (n_replay,) lists aligned with new_grads. etas: (n_replay,).
    unscaled_grads: (n_unscaled,) lists aligned with new_grads (transfer streams),
    added with weight exactly 1 (no multiplication).
    Returns one tensor per parameter (None where every input is None); inputs are not modified.
    """
    eta_values = [float(eta) for eta in torch.as_tensor(etas, dtype=torch.float64).reshape(-1)]
    if len(eta_values) != len(replay_grads):
        raise ValueError(f"got {len(eta_values)} etas for {len(replay_grads)} replayed gradients")
    for kind, groups in (("replayed", replay_grads), ("unscaled", unscaled_grads)):
        for i, grads in enumerate(groups):
            if len(grads) != len(new_grads):
                raise ValueError(
                    f"{kind} gradient {i} has {len(grads)} tensors, the new-task gradient {len(new_grads)}"
                )
    weighted = list(zip(eta_values, replay_grads, strict=True)) + [(None, g) for g in unscaled_grads]
    combined: list[Tensor | None] = []
    for k, new in enumerate(new_grads):
        out = None if new is None else new.detach().clone()
        for eta, grads in weighted:
            out = _add_scaled(out, grads[k], eta)
        combined.append(out)
    return combined


def _add_scaled(out: Tensor | None, grad: Tensor | None, eta: float | None) -> Tensor | None:
    """`out + eta * grad` in place on `out` (eta None: weight 1, added as is)."""
    if grad is None:
        return out
    grad = grad.detach()
    if out is None:
        return grad.clone() if eta is None else grad * eta
    return out.add_(grad) if eta is None else out.add_(grad, alpha=eta)
