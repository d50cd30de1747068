"""Selection: find the earlier tasks whose input subspaces best contain the new task's.

When a task ends we keep, per layer, an orthonormal basis `U_i` (d_model, r) of
its *input subspace*: the left singular vectors of the matrix of its samples'
representations at the input of each block, the fewest that hold `epsilon`
of the energy (sum of squared singular values). No raw data is kept.

For a new task with representations `R_n` (d_model, N) per layer,

    sim(n, i) = mean over layers of ||U_i U_i^T R_n||_F / ||R_n||_F

which is 1 when task n's inputs lie inside task i's subspace and ~sqrt(r/d)
for unrelated directions. The top-K earlier tasks are selected. By default
(`method.selection.route=earlier`) `R_n` is read along task i's path with the
token rows of the tasks up to i, the network `U_i` was read from, so both live
in one space; `own` reads it along the new task's path (the stage chooses,
dmea_dist.stages.select).

A sample's representation at a layer is the mean of its non-padding token
states there (one column per sample), which keeps the matrix (d_model, N)
whatever the sequence lengths.
"""

from __future__ import annotations

import random
from collections.abc import Mapping, Sequence

import torch


def subspace_basis(reps: torch.Tensor, *, epsilon: float) -> torch.Tensor:
    """Orthonormal basis (d, r) of the columns of `reps` (d, N) keeping `epsilon` of the energy."""
    if reps.ndim != 2 or reps.shape[1] == 0:
        raise ValueError(f"representations must be (d_model, n_samples) with n_samples > 0, got {tuple(reps.shape)}")
    u, s, _ = torch.linalg.svd(reps.double(), full_matrices=False)
    energy = torch.cumsum(s**2, 0) / torch.sum(s**2).clamp_min(1e-300)
    # fewest vectors whose cumulative energy reaches epsilon (at least one)
    rank = int(torch.searchsorted(energy, torch.tensor(epsilon, dtype=energy.dtype) - 1e-12).item()) + 1
    return u[:, : min(rank, u.shape[1])].float()


def projection_ratio(basis: torch.Tensor, reps: torch.Tensor) -> float:
    """||U U^T R||_F / ||R||_F for a basis (d, r) and representations (d, N)."""
    reps = reps.double()
    proj = basis.double() @ (basis.double().T @ reps)
    denom = torch.linalg.norm(reps)
    return float(torch.linalg.norm(proj) / denom) if denom > 0 else 0.0


def task_similarity(bases: Sequence[torch.Tensor], reps: Sequence[torch.Tensor]) -> float:
    """Mean over layers of the projection ratio of the new task's reps onto an old task's bases."""
    if len(bases) != len(reps):
        raise ValueError(f"{len(bases)} layer bases but {len(reps)} layers of representations")
    return sum(projection_ratio(b, r) for b, r in zip(bases, reps, strict=True)) / len(bases)


def select_tasks(similarities: Mapping[str, float], *, top_k: int, mode: str = "subspace",
                 seed: int = 0) -> list[str]:
    """The top-K earlier tasks by similarity (ties by name), K random ones, or none."""
    if mode == "none" or top_k == 0:
        return []
    names = sorted(similarities)
    if mode == "random":
        return sorted(random.Random(seed).sample(names, min(top_k, len(names))))
    if mode != "subspace":
        raise ValueError(f"selection mode {mode!r} unknown; choose subspace, random or none")
    return sorted(names, key=lambda n: (-similarities[n], n))[:top_k]


def rank_tasks(similarities: Mapping[str, float], *, selected: Sequence[str], mode: str = "subspace",
               seed: int = 0) -> list[str]:
    """Every earlier task in the order selection would take them: `selected` first (as `select_tasks` chose
    them), then the others by similarity (ties by name), or, for random selection, in a seeded random order.

    Transfer that skips a selected task (its pseudo samples fail the yield gate) takes the next one from here.
    """
    rest = [n for n in sorted(similarities) if n not in selected]
    if mode == "random":
        random.Random(seed).shuffle(rest)
    else:
        rest.sort(key=lambda n: (-similarities[n], n))
    return [*selected, *rest]


@torch.no_grad()
def collect_representations(model, batches, *, path: Sequence[int] | None, n_samples: int,
                            scope: Sequence[str] | None = None) -> list[torch.Tensor]:
    """Per layer, the (d_model, N) matrix of mean block-input states of up to `n_samples` samples.

    `batches` yields dicts with input_ids and attention_mask (one task); the
    model runs along `path`, seeing the token rows of the tasks in `scope`
    (None: every task's rows).
    """
    columns: list[list[torch.Tensor]] | None = None
    seen = 0
    was_training = model.training
    model.eval()
    for batch in batches:
        mask = batch["attention_mask"].unsqueeze(-1).to(torch.float32)  # (batch, seq, 1)
        with model.capture_block_inputs() as rec, model.only_rows_of(scope):
            model(batch["input_ids"], attention_mask=batch["attention_mask"], path=path)
        if columns is None:
            columns = [[] for _ in rec.layers]
        for layer, states in enumerate(rec.layers):  # states: (batch, seq, d_model)
            pooled = (states.float() * mask).sum(1) / mask.sum(1).clamp_min(1.0)  # (batch, d_model)
            columns[layer].append(pooled)
        seen += batch["input_ids"].shape[0]
        if seen >= n_samples:
            break
    model.train(was_training)
    if columns is None:
        raise ValueError("no samples to compute representations from: the task's split is empty")
    return [torch.cat(cols)[:n_samples].T.contiguous() for cols in columns]
