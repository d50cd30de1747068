"""Method policies, expansion's initial logits, entropy and candidate choice."""

import math

import pytest
import torch

from dmea_dist.errors import TrainingDiverged
from dmea_dist.method.expansion import (
    CandidateResult,
    cosine_similarity,
    initial_logits,
    mixing_entropy,
    pick_best,
    token_distribution,
)
from dmea_dist.method.policy import method_policy, replay_tasks


def test_policies_switch_the_right_parts():
    dmea = method_policy("dmea")
    assert dmea.search and dmea.scaling and dmea.selection == "subspace" and dmea.transfer
    acm = method_policy("acm")
    assert acm.search and acm.init == "static" and acm.selection == "none" and not acm.scaling
    assert method_policy("lamol").full_finetune and method_policy("lamol").replay == "all"
    assert method_policy("finetune").full_finetune and method_policy("finetune").replay == "none"
    assert not method_policy("adapter").search and method_policy("multitask").joint
    ablated = method_policy("dmea", init="static", selection="none", scaling=False)
    assert ablated.init == "static" and not ablated.transfer and not ablated.scaling
    with pytest.raises(ValueError, match="unknown"):
        method_policy("ewc")


def test_replay_sets():
    paths = {"a": [0, 0], "b": [1, 1], "c": [0, 2]}
    dmea = method_policy("dmea")
    assert replay_tasks(policy=dmea, new_path=[0, 3], paths=paths, earlier=["a", "b", "c"]) == ["a", "c"]
    assert replay_tasks(policy=dmea, new_path=[4, 3], paths=paths, earlier=["a", "b", "c"]) == []
    assert replay_tasks(policy=method_policy("lamol"), new_path=None, paths={}, earlier=["a", "b"]) == ["a", "b"]
    assert replay_tasks(policy=method_policy("adapter"), new_path=[5, 5], paths=paths, earlier=["a"]) == []


def test_token_cosine_by_hand():
    a = token_distribution([[1, 1, 2], [3]])  # {1: 2, 2: 1, 3: 1}
    b = token_distribution([[1, 2, 2]])  # {1: 1, 2: 2}
    assert cosine_similarity(a, b) == pytest.approx((2 * 1 + 1 * 2) / (math.sqrt(6) * math.sqrt(5)))
    assert cosine_similarity(a, {}) == 0.0


def test_initial_logits_follow_the_design():
    # layer 0: modules 0 (used by a, b) and 1 (used by c); layer 1: module 0 used by all
    paths = {"a": [0, 0], "b": [0, 0], "c": [1, 0]}
    sims = {"a": 0.2, "b": 0.6, "c": 0.9}
    logits = initial_logits(old_modules=[[0, 1], [0]], paths=paths, similarities=sims, beta=2.0)
    # old module score = best similarity of the tasks using it; new = -best old score; all * beta
    assert logits[0].tolist() == pytest.approx([2 * 0.6, 2 * 0.9, -2 * 0.9])
    assert logits[1].tolist() == pytest.approx([2 * 0.9, -2 * 0.9])
    static = initial_logits(old_modules=[[0, 1], [0]], paths=paths, similarities=sims, beta=2.0,
                            init="static", mix_ini=0.15)
    # ACM: old modules +mix_ini, the new one -mix_ini, whatever the similarities
    assert static[0].tolist() == pytest.approx([0.15, 0.15, -0.15])
    assert static[1].tolist() == pytest.approx([0.15, -0.15])


def test_mixing_entropy_matches_reference():
    logits = [torch.tensor([0.0, 0.0]), torch.tensor([1.0, 2.0, 3.0])]
    p = torch.softmax(torch.tensor([1.0, 2.0, 3.0], dtype=torch.float64), 0)
    expected = math.log(2) - float((p * p.log()).sum())
    assert float(mixing_entropy(logits)) == pytest.approx(expected, rel=1e-6)


def test_pick_best_prefers_low_loss_then_fewer_new_modules():
    def result(i, loss, new):
        return CandidateResult(candidate=i, path=[0], new_layers=list(range(new)), val_loss=loss, logits=[], params={})
    assert pick_best([result(0, 1.0, 0), result(1, 0.5, 3)]).candidate == 1
    assert pick_best([result(0, 0.5, 3), result(1, 0.5, 1), result(2, 0.5, 2)]).candidate == 1
    # 2e-10 apart, on either side of a 9th-decimal rounding boundary: a tie, so the fewer new modules win
    assert pick_best([result(0, 1.0000000004, 3), result(1, 1.0000000006, 1)]).candidate == 1
    assert pick_best([result(0, 1.0, 3), result(1, 1.000001, 1)]).candidate == 0  # not a tie
    with pytest.raises(ValueError):
        pick_best([])


def test_pick_best_never_picks_a_diverged_candidate():
    def result(i, loss):
        return CandidateResult(candidate=i, path=[0], new_layers=[], val_loss=loss, logits=[], params={})
    # wherever the diverged one stands: first (min() over a NaN would start from it) or later
    assert pick_best([result(0, math.nan), result(1, 1.0)]).candidate == 1
    assert pick_best([result(0, 1.0), result(1, math.nan), result(2, math.inf)]).candidate == 0
    with pytest.raises(TrainingDiverged, match=r"every expansion candidate diverged.*0: nan, 1: inf.*train\.lr"):
        pick_best([result(0, math.nan), result(1, math.inf)])
