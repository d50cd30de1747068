"""Losses and small training helpers shared by the stages.

The training objective of a task (DESIGN section 1) is

    loss = QA loss on `answer <eos>`  +  lm_lambda * LM loss on the whole sample

where the LM sample starts with the task's generation token, so the model can
later generate pseudo samples of the task. Both are mean token cross-entropy
computed by the backbone from `labels` (IGNORE positions skipped).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import torch


def task_loss(model, qa_batch: dict, lm_batch: dict, *, path: Sequence[int] | None, lm_lambda: float) -> torch.Tensor:
    """QA + lm_lambda * LM loss of one batch of one task along `path` (None: active route)."""
    qa = model(qa_batch["input_ids"], attention_mask=qa_batch["attention_mask"],
               labels=qa_batch["labels"], path=path).loss
    if lm_lambda == 0:
        return qa
    lm = model(lm_batch["input_ids"], attention_mask=lm_batch["attention_mask"],
               labels=lm_batch["labels"], path=path).loss
    return qa + lm_lambda * lm


@torch.no_grad()
def evaluate_loss(model, batches: Iterable[tuple[dict, dict]], *, path: Sequence[int] | None,
                  lm_lambda: float) -> float:
    """Mean task loss over batches (eval mode, no gradients)."""
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    for qa, lm in batches:
        total += float(task_loss(model, qa, lm, path=path, lm_lambda=lm_lambda))
        count += 1
    model.train(was_training)
    if count == 0:
        raise ValueError("no validation batches: the task's validation split is empty")
    return total / count


def make_optimizer(params: Sequence[torch.nn.Parameter], *, lr: float, weight_decay: float,
                   eps: float) -> torch.optim.Optimizer:
    """AdamW with the reference hyperparameters (weight decay on matrices only)."""
    params = list(params)
    if not params:
        raise ValueError("nothing to train: the parameter list is empty")
    decay = [p for p in params if p.ndim >= 2]
    no_decay = [p for p in params if p.ndim < 2]
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW([g for g in groups if g["params"]], lr=lr, eps=eps)
