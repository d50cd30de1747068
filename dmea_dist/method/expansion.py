"""Expansion: architecture search over {existing modules, one new module} per layer.

For a new task, one fresh module is added to every layer and each layer gets
learnable logits over its candidates; the sublayer outputs mix the candidates
by softmax of the logits. The logits start from *task similarity*
(`initial_logits`): the cosine similarity of token-frequency distributions
between the new task and each earlier task (special tokens left out: every
task has them); an old module scores the best similarity among the tasks
whose path uses it, and the new module starts at minus the best old score,
all scaled by `beta`. ACM's static initialisation gives old modules +mix_ini
and the new one -mix_ini.

Only the new modules and the logits train, on the new task's data, in one
AdamW at the adapters' learning rate, logits frozen for a warm-up part (ACM's
schedule), with an entropy penalty that sharpens each layer's choice. Then
each layer keeps its argmax; unchosen new modules are dropped. The learning
rate is what lets the initialisation matter: Adam moves a logit by about `lr`
per step, so the search can close a gap of about 2 * lr * (trainable steps);
a rate that moves the logits much further forgets where they started, and
similarity and static initialisation end in the same place.

`search_candidate` is a pure function of its inputs and mutates only the model
it is given (callers pass a copy, or put it back after: distributed/search.py), so
candidates with different scales, entropy weights and seeds run independently, in
one process or on Ray search actors.
`pick_best` keeps the lowest validation loss, ties to fewer new modules.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Collection, Iterable, Mapping, Sequence
from dataclasses import dataclass, field

import torch

from dmea_dist.data.formatting import BatchStream
from dmea_dist.errors import TrainingDiverged
from dmea_dist.method.training import evaluate_loss, make_optimizer, task_loss
from dmea_dist.modeling.io import modules_state, put_modules_state


def token_distribution(token_lists: Iterable[Sequence[int]], *, exclude: Collection[int] = ()) -> Counter:
    """Token counts of a task's training samples (a sparse frequency distribution), `exclude` left out."""
    counts: Counter = Counter()
    for ids in token_lists:
        counts.update(ids)
    for token in exclude:
        counts.pop(token, None)
    return counts


def cosine_similarity(a: Mapping[int, float], b: Mapping[int, float]) -> float:
    """Cosine of two sparse non-negative count vectors (0 if either is empty)."""
    dot = sum(v * b.get(k, 0.0) for k, v in a.items())
    na = math.sqrt(sum(v * v for v in a.values()))
    nb = math.sqrt(sum(v * v for v in b.values()))
    return dot / (na * nb) if na > 0 and nb > 0 else 0.0


def initial_logits(*, old_modules: Sequence[Sequence[int]], paths: Mapping[str, Sequence[int]],
                   similarities: Mapping[str, float], beta: float, init: str = "similarity",
                   mix_ini: float = 0.15) -> list[torch.Tensor]:
    """Per layer, logits over `old_modules[l] + [new]` (new last)."""
    logits = []
    for layer, ids in enumerate(old_modules):
        if init == "static":
            values = [mix_ini] * len(ids) + [-mix_ini]
        elif init == "similarity":
            scores = [
                max((similarities.get(t, 0.0) for t, p in paths.items() if p[layer] == m), default=0.0)
                for m in ids
            ]
            best = max(scores, default=0.0)
            values = [beta * s for s in scores] + [-beta * best]
        else:
            raise ValueError(f"expansion init {init!r} unknown; choose similarity or static")
        logits.append(torch.tensor(values, dtype=torch.float32))
    return logits


def mixing_entropy(logits: Sequence[torch.Tensor]) -> torch.Tensor:
    """Sum over layers of the entropy of softmax(logits_l) (differentiable)."""
    total = logits[0].new_zeros(())
    for layer_logits in logits:
        logp = torch.log_softmax(layer_logits, dim=-1)
        total = total - (logp.exp() * logp).sum()
    return total


@dataclass
class CandidateResult:
    """One searched architecture: the path it chose and how well it does."""

    candidate: int
    path: list[int]
    new_layers: list[int]  # layers whose chosen module is the new one
    val_loss: float
    logits: list[list[float]]
    params: dict[str, float]  # beta, entropy_weight, seed
    new_modules: dict[str, torch.Tensor] = field(default_factory=dict, repr=False)  # modeling.io's key scheme

    @property
    def n_new(self) -> int:
        return len(self.new_layers)


def search_candidate(model, *, candidate: int, train: BatchStream, val_batches: Sequence,
                     init: Sequence[torch.Tensor], epochs: float, warmup_epochs: float,
                     entropy_weight: float, lr: float, coefficient_lr: float | None, lm_lambda: float,
                     token_weights: Mapping[int, float] | None = None, weight_decay: float = 0.01,
                     adam_eps: float = 1e-6, grad_clip: float = 1.0, seed: int = 0,
                     params: Mapping[str, float] | None = None) -> CandidateResult:
    """Search one candidate architecture on `model` (mutated: pass a copy).

    coefficient_lr: None trains the logits at `lr`, in the adapters' optimizer (ACM).
    """
    torch.manual_seed(seed)
    old = [model.module_ids(layer) for layer in range(model.n_layers)]
    new_ids = model.add_modules(generator=torch.Generator().manual_seed(seed))
    candidates = [ids + [n] for ids, n in zip(old, new_ids, strict=True)]
    logits = [torch.nn.Parameter(x.clone(), requires_grad=False) for x in init]  # frozen for the warm-up
    new_path = list(new_ids)
    model.set_trainable(new_path)
    coefficients = {"params": logits, "weight_decay": 0.0, "lr": lr if coefficient_lr is None else coefficient_lr}
    optimizer = make_optimizer(model.trainable_parameters(new_path), lr=lr, weight_decay=weight_decay, eps=adam_eps,
                               extra_groups=[coefficients])

    total_steps = max(1, round(epochs * len(train)))
    warmup_steps = round(warmup_epochs * len(train))
    model.train()
    with model.mixing(candidates, logits):
        for step in range(total_steps):
            if step == warmup_steps:
                for x in logits:
                    x.requires_grad_(True)
            qa, lm = train.batch(step)
            loss = task_loss(model, qa, lm, path=None, lm_lambda=lm_lambda, token_weights=token_weights)
            if step >= warmup_steps:
                loss = loss + entropy_weight * mixing_entropy(logits)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            if grad_clip > 0:  # 0: no clipping, as in adaptation (clip_grad_norm_ at 0 would zero every gradient)
                torch.nn.utils.clip_grad_norm_(model.trainable_parameters(new_path), grad_clip)
            optimizer.step()  # a logit without a gradient (warm-up) is skipped by AdamW

    path = [ids[int(torch.argmax(x))] for ids, x in zip(candidates, logits, strict=True)]
    new_layers = [layer for layer, m in enumerate(path) if m == new_ids[layer]]
    for layer, new in enumerate(new_ids):
        if layer not in new_layers:
            model.drop_modules(layer, [new])
    model.set_trainable(None)
    val_loss = evaluate_loss(model, val_batches, path=path, lm_lambda=lm_lambda, token_weights=token_weights)
    return CandidateResult(
        candidate=candidate, path=path, new_layers=new_layers, val_loss=val_loss,
        logits=[x.detach().tolist() for x in logits], params=dict(params or {}),
        new_modules=modules_state(model, {layer: [path[layer]] for layer in new_layers}),
    )


def pick_best(results: Sequence[CandidateResult]) -> CandidateResult:
    """Lowest validation loss; ties (within 1e-9, relative) go to fewer new modules, then lower index.

    A tolerance, not rounding: two losses 2e-10 apart can round to different 9th decimals, and losses
    of one path computed in different processes differ in their last bits. A candidate whose loss is not
    finite (it diverged) never wins; if every one diverged, the search fails with what to change.
    """
    if not results:
        raise ValueError("no expansion candidates to choose from")
    finite = [r for r in results if math.isfinite(r.val_loss)]
    if not finite:
        losses = ", ".join(f"{r.candidate}: {r.val_loss}" for r in results)
        raise TrainingDiverged(f"every expansion candidate diverged (validation loss by candidate: {losses}); "
                               "lower train.lr (and method.expansion.coefficient_lr if set) or check the data")
    best = min(r.val_loss for r in finite)
    tied = [r for r in finite if r.val_loss <= best + 1e-9 * max(1.0, abs(best))]
    return min(tied, key=lambda r: (r.n_new, r.candidate))


def install_candidate(model, result: CandidateResult) -> list[int]:
    """Put the winner's new modules into `model` (same ids as in the search) and return its path."""
    put_modules_state(model, result.new_modules)
    return list(result.path)
