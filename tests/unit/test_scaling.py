"""Dynamic gradient scaling against the formula on hand-computed values: eta, the clamp, the
matched rule (the new task's norm over the tensors a replayed gradient reaches), and the
combination with unscaled (knowledge-transfer) groups at weight exactly 1."""

from __future__ import annotations

import math

import pytest
import torch

from dmea_dist.method.scaling import (
    clamp_etas,
    combine_gradients,
    matched_sq_norms,
    raw_scale_factors,
    scale_factors,
    squared_norm,
)


def _close(actual, expected):
    torch.testing.assert_close(
        torch.as_tensor(actual, dtype=torch.float64),
        torch.as_tensor(expected, dtype=torch.float64),
        rtol=0, atol=1e-12,
    )


def test_at_progress_zero_eta_is_the_squared_norm_ratio():
    # ||g_j||^2 = 4; ratios 4/1, 4/16, 4/4.
    _close(scale_factors(4.0, [1.0, 16.0, 4.0], 0.0), [4.0, 0.25, 1.0])


def test_exp_decay_by_hand():
    # t = ln 2 -> exp(-t) = 1/2: (4 - 1)/2 + 1 = 2.5, (0.25 - 1)/2 + 1 = 0.625.
    _close(scale_factors(4.0, [1.0, 16.0, 4.0], math.log(2.0)), [2.5, 0.625, 1.0])
    # t = 1.5 epochs, ratio 3: 2 * e^-1.5 + 1.
    _close(scale_factors(3.0, [1.0], 1.5), [2.0 * math.exp(-1.5) + 1.0])


def test_eta_decays_to_one_over_training():
    etas = [float(scale_factors(9.0, [1.0, 81.0], t)[0]) for t in (0.0, 1.0, 2.0, 5.0, 40.0)]
    assert etas[0] == pytest.approx(9.0)
    assert all(a > b for a, b in zip(etas[:-1], etas[1:], strict=True))
    _close(scale_factors(9.0, [1.0, 81.0], 40.0), [1.0, 1.0])


def test_clamped_to_default_and_custom_bounds():
    # ratios 100 and 1e-4 fall outside [0.1, 10].
    _close(scale_factors(100.0, [1.0, 1e6], 0.0), [10.0, 0.1])
    _close(scale_factors(100.0, [1.0, 1e6], 0.0, clamp=(0.5, 2.0)), [2.0, 0.5])
    # At t = ln 2, ratio 100 gives 50.5: still clamped.
    _close(scale_factors(100.0, [1.0], math.log(2.0), clamp=(0.0, 60.0)), [50.5])


def test_zero_norms():
    # A zero replayed gradient is not scaled (eta = 1), whatever the new-task norm.
    _close(scale_factors(4.0, [0.0, 4.0], 0.0), [1.0, 1.0])
    _close(scale_factors(0.0, [0.0], 0.0), [1.0])
    # A zero new-task gradient: (0 - 1) * exp(-t) + 1 = 1 - exp(-t), then clamped.
    _close(scale_factors(0.0, [2.0], 0.0), [0.1])
    _close(scale_factors(0.0, [2.0], math.log(2.0)), [0.5])


def test_detached_float64_and_accepts_tensors():
    new = torch.tensor(2.0, requires_grad=True)
    replay = torch.tensor([1.0, 8.0], requires_grad=True)
    etas = scale_factors(new * 2, replay * 1, 0.0)
    assert not etas.requires_grad and etas.dtype == torch.float64
    _close(etas, [4.0, 0.5])


def test_no_replayed_tasks_gives_empty():
    assert scale_factors(1.0, torch.zeros(0), 0.3).shape == (0,)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(progress=-0.1), "progress"),
        (dict(progress=float("nan")), "progress"),
        (dict(progress=0.0, clamp=(2.0, 1.0)), "clamp"),
        (dict(progress=0.0, replay=[-1.0]), ">= 0"),
        (dict(progress=0.0, new=[1.0, 2.0]), "scalar"),
        (dict(progress=0.0, new=[1.0, -2.0], replay=[1.0, 1.0]), ">= 0"),
    ],
)
def test_bad_input_is_named(kwargs, match):
    new = kwargs.pop("new", 1.0)
    replay = kwargs.pop("replay", [1.0])
    with pytest.raises(ValueError, match=match):
        scale_factors(new, replay, **kwargs)


def test_combine_gradients_by_hand():
    # Two parameters, two replayed tasks; the second task has no gradient for parameter 0.
    g_new = [torch.tensor([1.0, 2.0]), torch.tensor([[1.0]])]
    g_a = [torch.tensor([10.0, 20.0]), torch.tensor([[2.0]])]
    g_b = [None, torch.tensor([[4.0]])]
    before = [t.clone() for t in g_new + g_a]
    combined = combine_gradients(g_new, [g_a, g_b], torch.tensor([0.5, 0.25]))
    _close(combined[0], [1.0 + 5.0, 2.0 + 10.0])
    _close(combined[1], [[1.0 + 1.0 + 1.0]])
    for tensor, original in zip(g_new + g_a, before, strict=True):
        assert torch.equal(tensor, original), "inputs must not be modified"


def test_combine_gradients_none_everywhere_and_only_replayed():
    combined = combine_gradients([None, None], [[None, torch.tensor([3.0])]], [2.0])
    assert combined[0] is None
    _close(combined[1], [6.0])


def test_combine_gradients_rejects_misaligned_lists():
    with pytest.raises(ValueError, match="etas"):
        combine_gradients([torch.ones(1)], [[torch.ones(1)]], [1.0, 2.0])
    with pytest.raises(ValueError, match="tensors"):
        combine_gradients([torch.ones(1)], [[torch.ones(1), torch.ones(1)]], [1.0])


def test_squared_norm_by_hand():
    _close(squared_norm([torch.tensor([3.0, 4.0]), None, torch.tensor([[1.0]])]), 26.0)
    _close(squared_norm([]), 0.0)


def test_per_replay_new_norms_pair_with_each_replayed_task():
    # ratios 4/1 and 1/4; at t = ln 2: (4 - 1)/2 + 1 = 2.5, (0.25 - 1)/2 + 1 = 0.625.
    _close(scale_factors([4.0, 1.0], [1.0, 4.0], 0.0), [4.0, 0.25])
    _close(scale_factors(torch.tensor([4.0, 1.0]), [1.0, 4.0], math.log(2.0)), [2.5, 0.625])
    # A zero replayed gradient is still not scaled; a zero matched norm gives 1 - exp(-t), clamped.
    _close(scale_factors([3.0, 0.0], [0.0, 2.0], math.log(2.0)), [1.0, 0.5])


def test_raw_factors_and_clamp_flags():
    raw = raw_scale_factors(100.0, [1.0, 1e6, 4.0], 0.0)
    _close(raw, [100.0, 1e-4, 25.0])
    etas, clamped = clamp_etas(raw, (0.1, 25.0))
    _close(etas, [25.0, 0.1, 25.0])
    # 25 is on the bound but was not changed by the clamp: not flagged.
    assert clamped.tolist() == [True, True, False]
    with pytest.raises(ValueError, match="clamp"):
        clamp_etas(raw, (1.0, 0.5))


def test_matched_sq_norms_by_hand():
    # Row 0: the new task's squared norm on 4 parameter tensors; rows 1..: replayed tasks.
    param_sq = torch.tensor([
        [1.0, 4.0, 9.0, 16.0],
        [0.0, 2.0, 0.0, 1.0],    # reaches tensors 1 and 3: 4 + 16
        [3.0, 0.0, 0.0, 0.0],    # tensor 0: 1
        [0.0, 0.0, 0.0, 0.0],    # reaches none: 0 (its eta is then 1, see test_zero_norms)
        [1e-30, 5.0, 5.0, 5.0],  # a tiny but non-zero gradient counts: every tensor, 30
    ], dtype=torch.float64)
    _close(matched_sq_norms(param_sq), [20.0, 1.0, 0.0, 30.0])
    assert matched_sq_norms(param_sq[:1]).shape == (0,)  # no replayed tasks


@pytest.mark.parametrize("param_sq, match", [
    (torch.ones(3), "n_groups, n_params"),
    (torch.tensor([[1.0, -1.0], [1.0, 1.0]]), ">= 0"),
    (torch.tensor([[1.0, float("nan")], [1.0, 1.0]]), "NaN or inf"),
])
def test_matched_sq_norms_rejects_bad_input(param_sq, match):
    with pytest.raises(ValueError, match=match):
        matched_sq_norms(param_sq)


def _layered_grads(layer_values):
    """Gradients of 4 "layers" of a (2, 2) weight and a (2,) bias each, every entry of layer l equal
    to layer_values[l]; 0 is a layer the path does not reach (exactly zero gradient)."""
    grads = []
    for value in layer_values:
        grads += [torch.full((2, 2), value, dtype=torch.float64), torch.full((2,), value, dtype=torch.float64)]
    return grads


def test_one_shared_layer_of_four_keeps_eta_inside_the_clamp():
    # The new path trains all 4 layers (each 6 entries of 0.5: squared norm 1.5, 6 in all); the
    # replayed task's path shares only layer 0 (6 entries of 0.25: 0.375).
    g_new = _layered_grads([0.5, 0.5, 0.5, 0.5])
    g_replay = _layered_grads([0.25, 0.0, 0.0, 0.0])
    param_sq = torch.stack([torch.stack([(g ** 2).sum() for g in gs]) for gs in (g_new, g_replay)])
    (matched,) = matched_sq_norms(param_sq)
    _close(matched, 1.5)  # g_j on layer 0's weight and bias only

    # At t = 0 eta is the ratio: matched 1.5 / 0.375 = 4, inside [0.1, 10]; whole 6 / 0.375 = 16.
    clamp = (0.1, 10.0)
    etas, clamped = clamp_etas(raw_scale_factors(matched.reshape(1), [0.375], 0.0), clamp)
    _close(etas, [4.0])
    assert clamped.tolist() == [False]
    # The whole-vector rule (the restriction switched off) sits at the clamp on the same gradients.
    whole = squared_norm(g_new)
    _close(whole, 6.0)
    etas, clamped = clamp_etas(raw_scale_factors(whole, [squared_norm(g_replay)], 0.0), clamp)
    _close(etas, [10.0])
    assert clamped.tolist() == [True]
    # Later in training (t = ln 2): (4 - 1)/2 + 1 = 2.5 against (16 - 1)/2 + 1 = 8.5.
    _close(scale_factors(matched.reshape(1), [0.375], math.log(2.0)), [2.5])
    _close(scale_factors(whole, [0.375], math.log(2.0)), [8.5])


def test_unscaled_groups_are_added_with_weight_exactly_one():
    # Dyadic values: every sum below is exact in float32, so equality is exact.
    g_new = [torch.tensor([1.0, 2.0]), torch.tensor([[1.0]])]
    g_replay = [torch.tensor([10.0, 20.0]), None]
    g_transfer = [torch.tensor([0.25, -3.0]), torch.tensor([[0.5]])]
    g_transfer2 = [None, torch.tensor([[8.0]])]
    before = [t.clone() for t in g_transfer if t is not None]
    combined = combine_gradients(g_new, [g_replay], [0.5], [g_transfer, g_transfer2])
    # 1 + 0.5 * 10 + 0.25, 2 + 0.5 * 20 - 3; 1 + 0.5 + 8: the transfer terms unscaled, whatever eta is.
    assert torch.equal(combined[0], torch.tensor([6.25, 9.0]))
    assert torch.equal(combined[1], torch.tensor([[9.5]]))
    assert all(torch.equal(t, b) for t, b in zip([g_transfer[0], g_transfer[1]], before, strict=True))
    # With no new or replayed gradient for a parameter, an unscaled one is taken as is (a copy).
    only = combine_gradients([None], [[None]], [4.0], [[torch.tensor([3.0])]])
    assert torch.equal(only[0], torch.tensor([3.0]))
    with pytest.raises(ValueError, match="unscaled gradient 0 has 2 tensors"):
        combine_gradients([torch.ones(1)], [], [], [[torch.ones(1), torch.ones(1)]])


def test_owner_share_survives_any_summation_order_where_identical_copies_do_not():
    """Virtual shards write the (identical) update as rank 0: update x world, others: zeros
    (dmea_dist.engine.owner_share). DeepSpeed then sums over the ranks and scales by 1 / world; with 8
    ranks identical copies summed one after another already come back wrong, owner shares never do."""
    from dmea_dist.engine import owner_share

    update = torch.randn(10_000, generator=torch.Generator().manual_seed(0))
    for world in (1, 2, 4, 8, 16):
        for order in (range(world), reversed(range(world))):
            shares = {r: owner_share(update.clone(), rank=r, world=world) for r in range(world)}
            total = torch.zeros_like(update)
            for r in order:
                total += shares[r]
            assert torch.equal(total * (1 / world), update), world
    copies = torch.zeros_like(update)
    for _ in range(8):
        copies += update
    assert not torch.equal(copies * (1 / 8), update)  # what the shares avoid


def test_the_engines_update_scales_replay_by_the_matched_ratio_clamped_and_adds_transfer_as_is():
    """ScaledStepEngine's update from the global group gradients (its DeepSpeed-free part), against float64
    by hand: replayed task a reaches tensor 2 only, so its eta compares ||g_a||^2 with g_j's norm on tensor 2
    alone; replayed task b (tensor 0, tiny gradient) is clamped at the top; the transfer group is added as is."""
    from dmea_dist.engine import ScaledStepEngine

    engine = ScaledStepEngine.__new__(ScaledStepEngine)  # no DeepSpeed: the parameter layout and the clamp
    engine._numels, engine._offsets, engine.clamp = [3, 2, 4], [0, 3, 5], (0.1, 10.0)
    g = torch.Generator().manual_seed(0)
    new, transfer = torch.randn(9, generator=g), torch.randn(9, generator=g)
    a, b = torch.zeros(9), torch.zeros(9)
    a[5:] = 0.7 * torch.randn(4, generator=g)
    b[:3] = 0.01 * torch.randn(3, generator=g)
    grads = torch.stack([new, transfer, a, b])  # rows: new task, transfer (unscaled), replay a, replay b
    t = 0.3
    update, scaling = engine._scaled_update(grads.clone(), {1}, t)

    def sq(x):
        return float((x.double() ** 2).sum())

    raw_a = (sq(new[5:]) / sq(a) - 1) * math.exp(-t) + 1
    raw_b = (sq(new[:3]) / sq(b) - 1) * math.exp(-t) + 1
    assert 0.1 < raw_a < 10 and raw_b > 10  # the case: a inside the clamp, b above it
    assert scaling.etas == pytest.approx([raw_a, 10.0], rel=1e-9)
    assert scaling.clamped == [False, True]
    assert scaling.matched_sq_norms == pytest.approx([sq(new[5:]), sq(new[:3])], rel=1e-9)
    reference = new.double() + raw_a * a.double() + 10.0 * b.double() + transfer.double()
    assert torch.allclose(update.double(), reference, rtol=1e-6, atol=1e-7)
