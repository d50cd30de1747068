"""Dropout for a GPT-2 that trains on CPU cores, at 40% of torch's cost.

The tiny backbones train on CPUs (the quick start, the tests, every science run
here), and there GPT-2's dropout was the largest single cost of a training step
after the matrix products: 40% of a tiny model's step (4 layers, d=64, batch
16 x 96, one thread; benchmarks/bench_dropout.py):
- torch's CPU dropout draws its mask with `bernoulli_`, ~2x slower than a
  uniform draw, then multiplies and divides: 7.6 ms in all for the (16, 4, 96, 96)
  attention probabilities of one layer, whose mask here takes 1.0 ms (one thread);
- attention dropout keeps `scaled_dot_product_attention` off its fused CPU
  kernel: with `dropout_p > 0` it takes the math path, which adds a masked
  "safe" softmax (a full `all` reduction over the probabilities per layer) and
  a mask conversion per head.

What this module changes, on CPU tensors in training only:
- `Dropout` (a drop-in `nn.Dropout`): keeps an element with probability 1 - p
  and scales it by 1/(1-p), as torch's does, from four times fewer random
  draws (`keep_scale`); only the random stream differs;
- `attention` (registered with transformers as the `dmea_sdpa` implementation):
  with dropout it computes softmax(q k^T * scale + mask) and drops the
  probabilities with the same rule, then multiplies by v; without dropout
  (evaluation, generation, pretraining, any GPU tensor) it is transformers' own
  `sdpa_attention_forward`, so everything but a training step computes the
  same bits as before.
On a GPU every call is torch's (its dropout and fused attention are fast there).

The masks come from torch's default generator, as torch's dropout's do, so
seeding (`torch.manual_seed`, the engine's per-piece seeds) and activation
checkpointing's replay of the RNG state work unchanged.
"""

from __future__ import annotations

import torch
from torch import nn
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

IMPLEMENTATION = "dmea_sdpa"  # the attention implementation name registered with transformers


def keep_scale(like: torch.Tensor, p: float) -> torch.Tensor:
    """A tensor shaped like `like`: 1/(1-p) where the element is kept, else 0 (the multiplier dropout applies).

    Each element is kept with probability 1 - round(p * 2^16) / 2^16 (p to within 2^-17): one 64-bit draw
    of torch's default generator gives four elements 16 random bits each, where `rand_like` spends a draw per
    element (the draw is most of the cost: for one layer's attention probabilities this mask takes 1.0 ms,
    one made from `rand_like` 2.7 ms). An element is kept when its bits, read as an int16 u, reach
    t = round(p * 2^16) - 2^15: sign(u - t + 1/2) is +1 then, else -1 (never 0), so (sign + 1) / 2 is the
    keep indicator.
    """
    n = like.numel()
    draws = torch.randint(-(2**63), 2**63 - 1, ((n + 3) // 4,), dtype=torch.int64, device=like.device)
    bits = draws.view(torch.int16)[:n].view(like.shape).to(torch.float32)  # exact in float32, not in bf16
    threshold = round(p * 65536) - 32768
    return bits.sub_(threshold - 0.5).sign_().add_(1.0).mul_(0.5 / (1.0 - p)).to(like.dtype)


class Dropout(nn.Dropout):
    """`nn.Dropout` with the cheaper mask on CPU tensors in training; torch's own everywhere else."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.p in (0.0, 1.0) or x.device.type != "cpu" or self.inplace:
            return super().forward(x)
        return x * keep_scale(x, self.p)


def attention(module: nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
              attention_mask: torch.Tensor | None, dropout: float = 0.0, scaling: float | None = None,
              is_causal: bool | None = None, **kwargs) -> tuple[torch.Tensor, None]:
    """transformers' attention interface: q, k, v (batch, heads, seq, head_dim) -> (batch, seq, heads, head_dim).

    `attention_mask` is what transformers builds for SDPA: a boolean (batch, 1, q, k) mask, True where a query
    may attend, or None for a plain causal batch (or, where the module is not causal, for no mask).
    """
    if dropout in (0.0, 1.0) or query.device.type != "cpu" or kwargs.get("position_bias") is not None:
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout,
                                      scaling=scaling, is_causal=is_causal, **kwargs)
    scale = scaling if scaling is not None else query.shape[-1] ** -0.5
    scores = torch.matmul(query, key.transpose(-1, -2)).mul_(scale)  # (batch, heads, q, k)
    causal = is_causal if is_causal is not None else getattr(module, "is_causal", True)
    if attention_mask is None and causal:  # with a cache, the queries are the last q of k positions
        n_q, n_k = scores.shape[-2:]
        attention_mask = torch.ones(n_q, n_k, dtype=torch.bool, device=scores.device).tril(n_k - n_q)
    if attention_mask is None:  # not causal (cross-attention), nothing masked
        attention_mask = torch.zeros((), dtype=scores.dtype, device=scores.device)
    elif attention_mask.dtype == torch.bool:
        # additive, as eager attention does (a finite minimum: a fully masked padding row stays finite);
        # built once per (batch, 1, q, k), not once per head
        blocked = torch.finfo(scores.dtype).min
        attention_mask = torch.zeros(attention_mask.shape, dtype=scores.dtype,
                                     device=scores.device).masked_fill_(~attention_mask, blocked)
    probs = torch.softmax(scores.add_(attention_mask), dim=-1)
    out = torch.matmul(probs * keep_scale(probs, dropout), value)
    return out.transpose(1, 2).contiguous(), None


def use_cpu_dropout(backbone: nn.Module) -> None:
    """Give a transformers GPT-2 this module's dropout and attention (in place; its weights are untouched).

    Every `nn.Dropout` of the backbone becomes a `Dropout` of the same rate; attention runs as `dmea_sdpa`
    where it ran as `sdpa` (another implementation a user chose, e.g. eager or flash, is kept). The name is
    set on the backbone's config, which model snapshots ship to other processes: importing this module
    registers it there. Not saved with a checkpoint (transformers keeps it out of config.json): a
    checkpoint loads as plain GPT-2.
    """
    for parent in backbone.modules():
        for name, child in list(parent.named_children()):
            if type(child) is nn.Dropout:
                setattr(parent, name, Dropout(child.p, inplace=child.inplace))
    if getattr(backbone.config, "_attn_implementation", None) == "sdpa":
        backbone.set_attn_implementation(IMPLEMENTATION)


# at import: a config that names the implementation can build a model in any process
AttentionInterface.register(IMPLEMENTATION, attention)
AttentionMaskInterface.register(IMPLEMENTATION, sdpa_mask)  # the masks SDPA gets, built the same way
