"""Review findings in dmea_dist/method, dmea_dist/engine and the evaluation metrics: each test shows one bug, fixed."""

from __future__ import annotations

from fractions import Fraction

import torch

from dmea_dist.method import adapt_checkpoint
from dmea_dist.method.adaptation import AdaptResult
from dmea_dist.method.generation import pseudo_sample_counts


def test_pseudo_sample_budget_is_the_ceiling_of_gamma_n_not_of_its_float_rounding():
    """ceil(0.07 * 100) gave 8: the float product is 7.000000000000001. The budget is ceil(gamma * N) of the
    numbers the user wrote; the reference below computes it in exact rationals."""
    for gamma, n_train, n_tasks in [(0.07, 100, 1), (0.07, 300, 2), (0.14, 50, 1), (0.29, 100, 1), (0.2, 400, 3)]:
        exact = -(-Fraction(str(gamma)) * n_train // 1)  # ceil, exactly
        assert pseudo_sample_counts(gamma, n_train, n_tasks, budget="per_task") == exact
        assert pseudo_sample_counts(gamma, n_train, n_tasks) == max(1, exact // n_tasks)


class _CheckpointEngine:
    """Engine fake: a DeepSpeed checkpoint is a folder."""

    def save_checkpoint(self, directory, *, tag):
        (directory / tag).mkdir(parents=True, exist_ok=True)

    def load_checkpoint(self, directory, *, tag):
        assert (directory / tag).is_dir()


def test_an_adaptation_checkpoint_carries_the_cuda_rng_that_draws_dropout_on_a_gpu(tmp_path, monkeypatch):
    """On a GPU, dropout draws from the CUDA generator; the checkpoint kept only the CPU one, so a resumed
    adaptation replayed the dropout masks of its first steps instead of going on step for step."""
    cuda = {"state": torch.tensor([1, 2, 3], dtype=torch.uint8)}
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_initialized", lambda: True)  # a GPU rank: DeepSpeed put the model there
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(torch.cuda, "get_rng_state", lambda *a, **k: cuda["state"].clone())

    def set_rng_state(state, *a, **k):
        cuda["state"] = state.clone()

    monkeypatch.setattr(torch.cuda, "set_rng_state", set_rng_state)
    adapt_checkpoint.save(_CheckpointEngine(), tmp_path, digest="job", steps=4, result=AdaptResult(steps=8), rank=0)
    cuda["state"] = torch.tensor([9, 9, 9], dtype=torch.uint8)  # the generator moved on (or the process restarted)
    steps, _ = adapt_checkpoint.restore(_CheckpointEngine(), tmp_path, digest="job", rank=0)
    assert steps == 4
    assert cuda["state"].tolist() == [1, 2, 3]
