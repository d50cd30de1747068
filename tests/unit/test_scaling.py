"""Dynamic gradient scaling against the formula on hand-computed values."""

from __future__ import annotations

import math

import pytest
import torch

from dmea_dist.method.scaling import combine_gradients, scale_factors, squared_norm


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
