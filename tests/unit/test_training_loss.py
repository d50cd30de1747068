"""The task loss with the answer separator's weight, against an independent float64 computation."""

from __future__ import annotations

import math

import pytest
import torch

from dmea_dist.data.formatting import IGNORE
from dmea_dist.method.training import lm_cross_entropy


def _reference(logits, labels, weights):
    """Weighted mean next-token NLL, one position at a time, in float64."""
    total = norm = 0.0
    for b in range(labels.shape[0]):
        for t in range(labels.shape[1] - 1):
            target = int(labels[b, t + 1])
            if target == IGNORE:
                continue
            logp = torch.log_softmax(logits[b, t].double(), dim=-1)[target]
            w = weights.get(target, 1.0)
            total += -w * float(logp)
            norm += w
    return total / norm


@pytest.fixture
def batch():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(2, 6, 11, generator=g)  # (batch, seq, vocab)
    labels = torch.tensor([[IGNORE, 3, 7, 5, 7, 1], [IGNORE, IGNORE, 7, 2, IGNORE, 9]])
    return logits, labels


def test_unweighted_is_plain_next_token_cross_entropy(batch):
    logits, labels = batch
    assert float(lm_cross_entropy(logits, labels)) == pytest.approx(_reference(logits, labels, {}), rel=1e-6)


def test_separator_weight_counts_in_sum_and_normaliser(batch):
    logits, labels = batch
    weights = {7: 5.0}  # token 7 plays the separator: three of its targets above
    got = float(lm_cross_entropy(logits, labels, weights))
    assert got == pytest.approx(_reference(logits, labels, weights), rel=1e-6)
    assert not math.isclose(got, float(lm_cross_entropy(logits, labels)), rel_tol=1e-3)


def test_weight_moves_the_separator_gradient(batch):
    """A x5 weight makes the separator's target pull harder than the plain mean does."""
    logits, labels = batch
    grads = []
    for weights in ({}, {7: 5.0}):
        x = logits.clone().requires_grad_(True)
        lm_cross_entropy(x, labels, weights).backward()
        grads.append(x.grad[0, 1, 7].item())  # position 1 predicts label[0, 2] = 7
    assert grads[1] < grads[0] < 0  # more negative: the separator's logit is pushed up harder
