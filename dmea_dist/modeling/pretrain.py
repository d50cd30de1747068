"""Pretraining of the tiny offline backbone (a stand-in for a pretrained GPT-2).

DMEA freezes the backbone and trains only small modules, which presumes a
backbone that already models language. A GPT-2 fresh from `GPT2Config` does
not: its frozen, tied embeddings (std 0.02) cap every logit near zero, and no
adapter can lift the loss above chance. So the offline tiny default first
pretrains the backbone as a plain causal LM on plain text (no task formatting,
no special tokens), then freezes it, exactly as a downloaded GPT-2 would be.

The text comes from the config (`model.tiny.pretrain.corpus`):
* `heldout_synth`: synthetic tasks of the run's families at indices no run
  uses by default (1000+), so the backbone knows the families' language but
  has never seen the sequence's tasks;
* `task_text`: the plain text of the run's own training splits: for corpora
  with no held-out sibling (RNNLG, E2E tiny variants); the backbone then has
  seen the tasks' text (not their input -> output format); documented as such.

The result is cached on disk by a hash of everything it depends on.
"""

from __future__ import annotations

import random
from collections.abc import Sequence

import torch


def pretrain_lm(backbone, token_lists: Sequence[Sequence[int]], *, steps: int, lr: float, batch_size: int,
                seq_len: int, eos_id: int, seed: int = 0) -> list[float]:
    """Train every parameter of a GPT2LMHeadModel as a causal LM on packed token streams.

    Texts are joined with `eos_id` into one stream and cut into windows of
    `seq_len` tokens (no padding). Returns the loss of every step.
    """
    stream: list[int] = []
    for ids in token_lists:
        stream.extend(ids)
        stream.append(eos_id)
    n_windows = len(stream) // seq_len
    if n_windows < 1:
        raise ValueError(f"pretraining text has {len(stream)} tokens, fewer than one window of {seq_len}")
    windows = torch.tensor(stream[: n_windows * seq_len]).view(n_windows, seq_len)  # (windows, seq)
    rng = random.Random(seed)
    torch.manual_seed(seed)
    params = [p for p in backbone.parameters()]
    for p in params:
        p.requires_grad_(True)
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=0.01)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=lr, total_steps=steps, pct_start=0.1)
    backbone.train()
    losses = []
    for _ in range(steps):
        idx = torch.tensor([rng.randrange(n_windows) for _ in range(batch_size)])
        batch = windows[idx]
        loss = backbone(input_ids=batch, labels=batch).loss
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        schedule.step()
        losses.append(loss.item())
    backbone.eval()
    for p in params:
        p.requires_grad_(False)
    return losses


@torch.no_grad()
def reserve_rows(backbone, token_ids: Sequence[int], *, seed: int = 0) -> None:
    """Re-draw the embedding rows of reserved tokens as `mean + std * z` of the other rows.

    Pretraining never sees the answer separator or the task tokens, so their
    rows keep the tiny initial scale while trained rows grow; with a frozen,
    tied LM head such a token could then never be predicted (the separator
    must be generated to parse pseudo samples). Drawing them from the trained
    rows' statistics treats them exactly like tokens added to a downloaded
    checkpoint (`grow_vocabulary`).
    """
    weight = backbone.get_input_embeddings().weight
    ids = torch.tensor(sorted(set(token_ids)))
    keep = torch.ones(weight.shape[0], dtype=torch.bool)
    keep[ids] = False
    existing = weight[keep].float()
    noise = torch.randn(len(ids), weight.shape[1], generator=torch.Generator().manual_seed(seed))
    weight[ids] = (existing.mean(0) + existing.std(0) * noise).to(weight.dtype)
