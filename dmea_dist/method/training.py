"""Losses and small training helpers shared by the stages.

The training objective of a task (DMEA, arXiv 2310.09886, after LAMOL and ACM) is

    loss = QA loss on `answer <eos>`  +  lm_lambda * LM loss on the whole sample

where the LM sample starts with the task's generation token, so the model can
later generate pseudo samples of the task. Both are token cross-entropy over
`labels` (IGNORE positions skipped).

`token_weights` ({token id: weight}) weights chosen target tokens, as LAMOL and
ACM weight the answer separator x5 (`tokens_weight`): a pseudo sample is only
usable if the model emits the separator, one token among ~50 of a sample, and
on a frozen backbone its row cannot move to make that easier. The loss is then
the weighted mean (PyTorch's `cross_entropy(weight=...)`: the separator counts
`w` times in the sum and in the normaliser). In the QA loss the separator is
never a target, so only the LM loss changes.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence

import torch
import torch.nn.functional as F

from dmea_dist.data.formatting import IGNORE


def lm_cross_entropy(logits: torch.Tensor, labels: torch.Tensor,
                     token_weights: Mapping[int, float] | None = None,
                     denominator: torch.Tensor | None = None) -> torch.Tensor:
    """Next-token cross-entropy of `logits` (batch, seq, vocab) against `labels` (batch, seq).

    Position t predicts labels[t + 1]; IGNORE labels are skipped; weighted by
    `token_weights`. The mean over this batch's targets, or, with a
    `denominator` (a data-parallel rank's share of a global batch, see
    `data.formatting.collate_share`), their sum divided by it.
    """
    vocab = logits.shape[-1]
    shifted = logits[:, :-1].reshape(-1, vocab).float()  # (batch * (seq-1), vocab)
    targets = labels[:, 1:].reshape(-1).to(shifted.device)
    weight = None
    if token_weights:
        weight = torch.ones(vocab, dtype=shifted.dtype, device=shifted.device)
        for token, w in token_weights.items():
            weight[int(token)] = float(w)
    if denominator is None:
        return F.cross_entropy(shifted, targets, weight=weight, ignore_index=IGNORE)
    total = F.cross_entropy(shifted, targets, weight=weight, ignore_index=IGNORE, reduction="sum")
    return total / denominator.to(device=total.device, dtype=total.dtype)


def task_loss(model, qa_batch: dict, lm_batch: dict, *, path: Sequence[int] | None, lm_lambda: float,
              token_weights: Mapping[int, float] | None = None, scope: Sequence[str] | None = None) -> torch.Tensor:
    """QA + lm_lambda * LM loss of one batch of one task along `path` (None: active route), seeing the token
    rows of the tasks in `scope` (None: the active scope; `DMEAModel.only_rows_of`)."""
    routing = {"path": path} if scope is None else {"path": path, "scope": scope}
    qa = model(qa_batch["input_ids"], attention_mask=qa_batch["attention_mask"], **routing).logits
    loss = lm_cross_entropy(qa, qa_batch["labels"], token_weights, qa_batch.get("denominator"))
    if lm_lambda == 0:
        return loss
    lm = model(lm_batch["input_ids"], attention_mask=lm_batch["attention_mask"], **routing).logits
    return loss + lm_lambda * lm_cross_entropy(lm, lm_batch["labels"], token_weights, lm_batch.get("denominator"))


@torch.no_grad()
def evaluate_loss(model, batches: Iterable[tuple[dict, dict]], *, path: Sequence[int] | None,
                  lm_lambda: float, token_weights: Mapping[int, float] | None = None) -> float:
    """Mean task loss over batches (eval mode, no gradients)."""
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    for qa, lm in batches:
        total += float(task_loss(model, qa, lm, path=path, lm_lambda=lm_lambda, token_weights=token_weights))
        count += 1
    model.train(was_training)
    if count == 0:
        raise ValueError("no validation batches: the task's validation split is empty")
    return total / count


def make_optimizer(params: Sequence[torch.nn.Parameter], *, lr: float, weight_decay: float,
                   eps: float, extra_groups: Sequence[dict] = ()) -> torch.optim.Optimizer:
    """AdamW with the reference hyperparameters (weight decay on matrices only).

    `extra_groups`: further parameter groups with their own settings (e.g. the
    expansion coefficients, no decay), stepped by the same optimizer.
    """
    params = list(params)
    if not params:
        raise ValueError("nothing to train: the parameter list is empty")
    decay = [p for p in params if p.ndim >= 2]
    no_decay = [p for p in params if p.ndim < 2]
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW([g for g in groups if g["params"]] + list(extra_groups), lr=lr, eps=eps)
