"""Subspace bases and similarity, against an independent numpy computation."""

import numpy as np
import pytest
import torch

from dmea_dist.method.selection import (
    projection_ratio,
    rank_tasks,
    select_tasks,
    subspace_basis,
    task_similarity,
)


def reference_rank(reps: np.ndarray, epsilon: float) -> int:
    s = np.linalg.svd(reps, compute_uv=False)
    total, acc = float((s**2).sum()), 0.0
    for k, value in enumerate(s, start=1):
        acc += float(value**2)
        if acc / total >= epsilon - 1e-12:
            return k
    return len(s)


def reference_ratio(basis: np.ndarray, reps: np.ndarray) -> float:
    # projection onto span(basis) by least squares: independent of U U^T
    coef, *_ = np.linalg.lstsq(basis, reps, rcond=None)
    return float(np.linalg.norm(basis @ coef) / np.linalg.norm(reps))


@pytest.mark.parametrize("epsilon", [0.5, 0.9, 0.97, 1.0])
def test_basis_rank_and_orthonormality(epsilon):
    rng = np.random.default_rng(0)
    reps = rng.normal(size=(16, 30)) * np.linspace(5, 0.1, 16)[:, None]
    basis = subspace_basis(torch.tensor(reps), epsilon=epsilon)
    assert basis.shape[1] == reference_rank(reps, epsilon)
    gram = basis.double().T @ basis.double()
    assert torch.allclose(gram, torch.eye(basis.shape[1], dtype=torch.float64), atol=1e-5)


def test_projection_ratio_matches_least_squares():
    rng = np.random.default_rng(1)
    basis = subspace_basis(torch.tensor(rng.normal(size=(12, 4))), epsilon=1.0)
    reps = rng.normal(size=(12, 20))
    assert projection_ratio(basis, torch.tensor(reps)) == pytest.approx(
        reference_ratio(basis.double().numpy(), reps), abs=1e-6)


def test_similarity_ranks_the_task_sharing_the_subspace_first():
    rng = np.random.default_rng(2)
    d = 24
    shared = np.linalg.qr(rng.normal(size=(d, 3)))[0]
    other = np.linalg.qr(rng.normal(size=(d, 3)))[0]
    def reps_in(space, n=40, noise=0.05):
        return torch.tensor(space @ rng.normal(size=(space.shape[1], n)) + noise * rng.normal(size=(d, n)))
    old_related = [subspace_basis(reps_in(shared), epsilon=0.97) for _ in range(2)]
    old_unrelated = [subspace_basis(reps_in(other), epsilon=0.97) for _ in range(2)]
    new = [reps_in(shared), reps_in(shared)]
    sims = {"related": task_similarity(old_related, new), "unrelated": task_similarity(old_unrelated, new)}
    assert sims["related"] > 0.95 > sims["unrelated"]
    ref = np.mean([reference_ratio(b.double().numpy(), r.numpy()) for b, r in zip(old_related, new, strict=True)])
    assert sims["related"] == pytest.approx(ref, abs=1e-6)
    assert select_tasks(sims, top_k=1) == ["related"]


def test_select_modes():
    sims = {"a": 0.2, "b": 0.9, "c": 0.9, "d": 0.5}
    assert select_tasks(sims, top_k=2) == ["b", "c"]  # ties broken by name
    assert select_tasks(sims, top_k=2, mode="none") == []
    rand = select_tasks(sims, top_k=2, mode="random", seed=3)
    assert len(rand) == 2 and set(rand) <= set(sims)
    assert rand == select_tasks(sims, top_k=2, mode="random", seed=3)
    # random ignores the similarities: over seeds every task is picked, the least similar one as often as any
    picks = [select_tasks(sims, top_k=1, mode="random", seed=s)[0] for s in range(200)]
    assert {name: picks.count(name) for name in sims} == pytest.approx(dict.fromkeys(sims, 50), abs=20)
    with pytest.raises(ValueError, match="unknown"):
        select_tasks(sims, top_k=1, mode="best")


def test_rank_tasks_puts_the_selected_first_then_the_rest_in_selection_order():
    sims = {"a": 0.2, "b": 0.9, "c": 0.5, "d": 0.5, "e": 0.1}
    chosen = select_tasks(sims, top_k=2)
    assert rank_tasks(sims, selected=chosen) == ["b", "c", "d", "a", "e"]  # ties by name, as select_tasks
    # random selection: the chosen ones keep their places, the rest follow in a seeded order
    chosen = select_tasks(sims, top_k=2, mode="random", seed=3)
    order = rank_tasks(sims, selected=chosen, mode="random", seed=3)
    assert order[:2] == chosen and sorted(order) == sorted(sims)
    assert order == rank_tasks(sims, selected=chosen, mode="random", seed=3)
    assert {tuple(rank_tasks(sims, selected=[], mode="random", seed=s)) for s in range(8)} != {tuple(sorted(sims))}
