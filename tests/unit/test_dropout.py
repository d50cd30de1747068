"""The CPU dropout and attention of `dmea_dist.modeling.dropout`, against independent float64 references."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from dmea_dist.modeling.dropout import (
    IMPLEMENTATION,
    Dropout,
    attention,
    keep_scale,
    use_cpu_dropout,
)


@pytest.mark.parametrize("p", [0.1, 0.5, 0.03])
def test_keep_scale_keeps_each_element_with_probability_one_minus_p_scaled_by_its_inverse(p):
    torch.manual_seed(0)
    n = 1_000_003  # not a multiple of 4: the last draw is cut
    mult = keep_scale(torch.empty(n), p)
    kept = mult != 0
    values = mult.unique().tolist()
    assert len(values) == 2 and values[0] == 0.0 and values[1] == pytest.approx(1 / (1 - p))
    expected = 1 - round(p * 65536) / 65536
    assert abs(expected - (1 - p)) < 2**-17
    sd = math.sqrt(expected * (1 - expected) / n)
    assert abs(kept.double().mean().item() - expected) < 5 * sd
    # the four elements cut from one 64-bit draw are independent of each other: each lag within a draw keeps
    # both elements as often as two independent draws would
    pairs = kept[: (n // 4) * 4].view(-1, 4).double()
    for lag in (1, 2, 3):
        both = (pairs[:, 0] * pairs[:, lag]).mean().item()
        assert abs(both - expected**2) < 5 * math.sqrt(expected**2 * (1 - expected**2) / pairs.shape[0])


def test_keep_scale_follows_the_seed_and_the_shape():
    like = torch.empty(3, 5, 7)
    torch.manual_seed(1)
    a = keep_scale(like, 0.2)
    torch.manual_seed(1)
    b = keep_scale(like, 0.2)
    torch.manual_seed(2)
    c = keep_scale(like, 0.2)
    assert a.shape == like.shape and a.dtype == like.dtype
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert keep_scale(like.to(torch.bfloat16), 0.2).dtype == torch.bfloat16


def test_dropout_is_torch_dropout_outside_cpu_training_and_the_seeded_mask_in_it():
    x = torch.randn(8, 16)
    drop = Dropout(0.25)
    drop.eval()
    assert torch.equal(drop(x), x)
    drop.train()
    torch.manual_seed(3)
    out = drop(x)
    torch.manual_seed(3)
    assert torch.equal(out, x * keep_scale(x, 0.25))
    assert isinstance(drop, nn.Dropout)  # code that sets `module.p` on every nn.Dropout still reaches it
    assert torch.equal(Dropout(0.0).train()(x), x)
    assert torch.equal(Dropout(1.0).train()(x), torch.zeros_like(x))


def _qkv_and_mask(batch=3, heads=2, seq=7, dim=4):
    gen = torch.Generator().manual_seed(4)
    q, k, v = (torch.randn(batch, heads, seq, dim, generator=gen) for _ in range(3))
    lengths = torch.tensor([seq, 4, 1])[:batch]  # right padding; the last row keeps one token
    valid = torch.arange(seq)[None, :] < lengths[:, None]  # (batch, seq)
    causal = torch.ones(seq, seq, dtype=torch.bool).tril()
    mask = causal[None, None] & valid[:, None, None, :]  # (batch, 1, q, k), True: may attend
    return q, k, v, mask, valid


class _Module(nn.Module):
    is_causal = True


class _CrossModule(nn.Module):
    is_causal = False


def _reference(q, k, v, mask, keep, scale):
    """softmax(q k^T * scale, masked with -inf) * keep @ v in float64: the textbook formula."""
    scores = (q.double() @ k.double().transpose(-1, -2)) * scale
    scores = scores.masked_fill(~mask, float("-inf"))
    probs = torch.softmax(scores, dim=-1) * keep.double()
    return (probs @ v.double()).transpose(1, 2)  # (batch, seq, heads, dim)


@pytest.mark.parametrize("with_mask", [True, False])
def test_attention_with_dropout_matches_a_float64_reference_in_values_and_gradients(with_mask):
    q, k, v, mask, valid = _qkv_and_mask()
    if not with_mask:
        mask = torch.ones(q.shape[-2], q.shape[-2], dtype=torch.bool).tril()[None, None].expand(q.shape[0], 1, -1, -1)
        valid = torch.ones(q.shape[0], q.shape[-2], dtype=torch.bool)
    p, scale = 0.3, 0.5
    leaves = [t.clone().requires_grad_(True) for t in (q, k, v)]
    torch.manual_seed(5)
    out, weights = attention(_Module().train(), *leaves, mask if with_mask else None, dropout=p, scaling=scale)
    assert weights is None and out.shape == (q.shape[0], q.shape[2], q.shape[1], q.shape[3])
    torch.manual_seed(5)
    keep = keep_scale(torch.empty(q.shape[0], q.shape[1], q.shape[2], k.shape[2]), p)  # the one draw it makes
    ref_leaves = [t.clone().double().requires_grad_(True) for t in (q, k, v)]
    ref = _reference(*ref_leaves, mask, keep, scale)
    rows = valid[:, :, None, None].expand_as(out)  # padding queries are masked out of every loss
    torch.testing.assert_close(out[rows].double(), ref[rows], rtol=1e-5, atol=1e-6)
    weight = torch.randn(out.shape, generator=torch.Generator().manual_seed(6))
    (out * weight)[rows].sum().backward()
    (ref * weight.double())[rows].sum().backward()
    for got, want in zip(leaves, ref_leaves, strict=True):
        torch.testing.assert_close(got.grad.double(), want.grad, rtol=1e-4, atol=1e-5)


def test_attention_of_a_module_that_is_not_causal_masks_nothing_without_a_mask():
    q, k, v, _, _ = _qkv_and_mask()
    torch.manual_seed(8)
    out, _ = attention(_CrossModule().train(), q, k, v, None, dropout=0.3, scaling=0.5)
    torch.manual_seed(8)
    keep = keep_scale(torch.empty(q.shape[0], q.shape[1], q.shape[2], k.shape[2]), 0.3)
    everything = torch.ones(q.shape[0], 1, q.shape[2], k.shape[2], dtype=torch.bool)
    torch.testing.assert_close(out.double(), _reference(q, k, v, everything, keep, 0.5), rtol=1e-5, atol=1e-6)


def test_attention_is_unbiased_over_draws():
    """The mean over draws is attention without dropout: within 5 standard errors in every element (a
    multiplier of 1 instead of 1/(1-p) would put the mean 20% low, far outside that)."""
    q, k, v, mask, valid = _qkv_and_mask()
    with torch.no_grad():
        plain, _ = attention(_Module().eval(), q, k, v, mask, dropout=0.0, scaling=0.5)
        torch.manual_seed(7)
        draws = torch.stack([attention(_Module().train(), q, k, v, mask, dropout=0.2, scaling=0.5)[0]
                             for _ in range(2000)])
    rows = valid[:, :, None, None].expand_as(plain)
    standard_error = draws.std(0) / 2000**0.5
    z = ((draws.mean(0) - plain) / standard_error.clamp_min(1e-6))[rows]
    assert z.abs().max().item() < 5


def test_attention_without_dropout_is_transformers_sdpa_bit_for_bit():
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    q, k, v, mask, _ = _qkv_and_mask()
    for m in (mask, None):
        ours, _ = attention(_Module(), q, k, v, m, dropout=0.0, scaling=0.5)
        theirs, _ = sdpa_attention_forward(_Module(), q, k, v, m, dropout=0.0, scaling=0.5)
        assert torch.equal(ours, theirs)


def test_a_dmea_model_trains_without_torch_bernoulli_and_evaluates_the_plain_backbones_bits():
    """What DMEAModel installs acts: a training step on CPU draws no `bernoulli_` (torch's dropout mask,
    which costs 40% of a tiny model's step) and evaluation computes exactly what the plain backbone does."""
    from transformers import GPT2Config, GPT2LMHeadModel

    from dmea_dist.modeling.model import DMEAModel

    def config():
        return GPT2Config(vocab_size=50, n_positions=32, n_embd=16, n_layer=2, n_head=2, bos_token_id=0,
                          eos_token_id=0)  # GPT-2's dropout 0.1 everywhere

    torch.manual_seed(0)
    plain = GPT2LMHeadModel(config()).eval()
    backbone = GPT2LMHeadModel(config())
    backbone.load_state_dict(plain.state_dict())
    model = DMEAModel(backbone, bottleneck=4)
    assert model.backbone.config._attn_implementation == IMPLEMENTATION
    assert plain.config._attn_implementation == "sdpa"
    assert all(type(m) is Dropout for m in model.backbone.modules() if isinstance(m, nn.Dropout))
    ids = torch.randint(0, 50, (4, 12), generator=torch.Generator().manual_seed(1))
    mask = torch.ones_like(ids)
    mask[1, 7:] = 0
    path = model.add_modules()
    with torch.no_grad():
        assert torch.equal(model.eval()(ids, attention_mask=mask, path=path).logits,
                           plain(input_ids=ids, attention_mask=mask).logits)
    model.train()
    model.set_trainable(path)
    with torch.profiler.profile() as prof:
        model(ids, attention_mask=mask, labels=ids, path=path).loss.backward()
    ops = {event.key for event in prof.key_averages()}
    assert "aten::bernoulli_" not in ops and "aten::native_dropout" not in ops
    torch.manual_seed(2)
    first = model(ids, attention_mask=mask, labels=ids, path=path).loss
    torch.manual_seed(2)
    assert torch.equal(first, model(ids, attention_mask=mask, labels=ids, path=path).loss)  # seeded
    assert not torch.equal(first, model(ids, attention_mask=mask, labels=ids, path=path).loss)  # dropout acts


def test_use_cpu_dropout_keeps_another_attention_implementation():
    from transformers import GPT2Config, GPT2LMHeadModel

    config = GPT2Config(vocab_size=50, n_positions=32, n_embd=16, n_layer=1, n_head=2)
    backbone = GPT2LMHeadModel._from_config(config, attn_implementation="eager")
    use_cpu_dropout(backbone)
    assert backbone.config._attn_implementation == "eager"
    assert all(type(m) is Dropout for m in backbone.modules() if isinstance(m, nn.Dropout))


def test_a_snapshot_of_the_model_rebuilds_in_a_fresh_process_with_the_same_attention():
    """Model snapshots ship the backbone's config (naming `dmea_sdpa`) to Ray workers: another process, with
    only what its imports registered, builds the model from it."""
    import pickle
    import subprocess
    import sys

    from transformers import GPT2Config, GPT2LMHeadModel

    from dmea_dist.distributed.generation_pool import model_snapshot
    from dmea_dist.modeling.model import DMEAModel

    model = DMEAModel(GPT2LMHeadModel(GPT2Config(vocab_size=50, n_positions=32, n_embd=16, n_layer=1, n_head=2)),
                      bottleneck=4)
    code = ("import pickle, sys\n"
            "from dmea_dist.distributed.generation_pool import build_model\n"
            "print(build_model(pickle.loads(sys.stdin.buffer.read())).backbone.config._attn_implementation)\n")
    loaded = subprocess.run([sys.executable, "-c", code], input=pickle.dumps(model_snapshot(model)),
                            capture_output=True)
    assert loaded.returncode == 0, loaded.stderr.decode()[-2000:]
    assert loaded.stdout.decode().split()[-1] == IMPLEMENTATION
