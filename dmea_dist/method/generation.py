"""Batched generation: pseudo samples of earlier tasks, and answers for evaluation.

Pseudo samples: the model generates `context <|ans|> answer <eos>` from a
task's generation token alone, along that task's path, top-k sampling, many
samples per call with the KV cache (one task per batch). Generation tokens
are suppressed while sampling (no sample may contain one). Each output is
parsed at the separator (`Formatter.parse_generated`: samples cut at the
length limit are kept, as in LAMOL/ACM); malformed ones are dropped and
counted. Sampling repeats (bounded) until `n` well-formed samples exist; a
shortfall is reported in the counts, never hidden.

Answers: prompts `context <|ans|>` are left-padded and decoded greedily (the
default, reproducible) or by top-k sampling; the separator and generation
tokens cannot occur in an answer and are suppressed. One batch may hold
several tasks (`paths`: one path per row).

Pseudo samples are stored as Parquet with plain Arrow columns (no tensor
extension types, so `datasets`, pandas and Ray Data all read them).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import torch
from transformers import LogitsProcessor, LogitsProcessorList

from dmea_dist.data.formatting import MALFORMED, Formatter, left_pad
from dmea_dist.files import atomic_path

PSEUDO_SCHEMA = pa.schema([
    ("task_id", pa.string()), ("context", pa.string()), ("question", pa.string()),
    ("answer", pa.list_(pa.string())),
])


@dataclass
class PseudoSamples:
    """Well-formed pseudo samples of one task and what it took to get them."""

    task_id: str
    rows: list[dict]
    malformed: int  # generated but dropped
    generated: int  # sampled sequences, well formed or not
    requested: int = 0
    truncated: int = 0  # kept, but cut at the length limit (no end token)
    reasons: dict[str, int] = field(default_factory=dict)  # malformed ones by why (formatting.MALFORMED)

    @property
    def well_formed(self) -> int:
        return self.generated - self.malformed

    @property
    def yield_rate(self) -> float:
        """Share of generated samples that were well formed (1.0 when nothing was generated)."""
        return self.well_formed / self.generated if self.generated else 1.0


def pseudo_sample_counts(gamma: float, n_train: int, n_tasks: int, *, budget: str = "total") -> int:
    """Pseudo samples to generate per earlier task.

    budget "total" (LAMOL/ACM): ceil(gamma * n_train) in all, split evenly over
    the `n_tasks` earlier tasks (at least one each when gamma > 0);
    "per_task": ceil(gamma * n_train) for every earlier task.
    """
    if budget not in ("total", "per_task"):
        raise ValueError(f"pseudo_budget {budget!r} unknown; choose total or per_task")
    if n_tasks == 0 or gamma <= 0:
        return 0
    # rounded first: 0.07 * 100 is 7.000000000000001 in floats, whose ceiling would ask for 8
    total = math.ceil(round(gamma * n_train, 9))
    return total if budget == "per_task" else max(1, total // n_tasks)


def pseudo_sample_plan(gamma: float, n_train: int, *, replay: Sequence[str], transfer: Sequence[str],
                       budget: str = "total", split: str = "by_use") -> dict[str, int]:
    """Pseudo samples to draw of each earlier task replayed or selected for transfer (replay's order, then
    transfer's).

    split "by_use": replay's budget is split over the replayed tasks (ACM's split; a replay-only task's share
    does not depend on what is selected) and transfer's over the selected tasks; a task in both is drawn once,
    at the larger count, and both uses take all of it. "all": one budget over every task drawn, so a selected
    task takes its share from the replayed ones.
    """
    if split not in ("by_use", "all"):
        raise ValueError(f"pseudo_split {split!r} unknown; choose by_use or all")
    wanted = list(dict.fromkeys([*replay, *transfer]))
    if split == "all":
        n = pseudo_sample_counts(gamma, n_train, len(wanted), budget=budget)
        return dict.fromkeys(wanted, n)
    n_replay = pseudo_sample_counts(gamma, n_train, len(replay), budget=budget)
    n_transfer = pseudo_sample_counts(gamma, n_train, len(transfer), budget=budget)
    return {t: max(n_replay if t in replay else 0, n_transfer if t in transfer else 0) for t in wanted}


def stand_in_count(plan: dict[str, int], gamma: float, n_train: int, *, transfer: Sequence[str],
                   budget: str = "total", split: str = "by_use") -> int:
    """The count of a task drawn in place of a selected one the transfer gate dropped (`transfer=usable`): a
    selected task's share of transfer's budget ("by_use"), or the one share of `plan` ("all")."""
    if split == "all":
        return max(plan.values(), default=0)
    return pseudo_sample_counts(gamma, n_train, len(transfer), budget=budget)


def yield_warnings(out: PseudoSamples, *, min_yield: float, new_task: str) -> list[str]:
    """What a user must hear about a task's pseudo samples: low yield, a shortfall, none at all."""
    warnings = []
    if out.generated and out.yield_rate < min_yield:
        warnings.append(f"pseudo samples of {out.task_id} (learning {new_task}): only {out.well_formed} of "
                        f"{out.generated} generated were well formed ({out.yield_rate:.1%}, below "
                        f"method.adaptation.min_yield={min_yield:.0%}){why_malformed(out.reasons)}")
    if not out.rows and out.requested:
        warnings.append(f"pseudo samples of {out.task_id} (learning {new_task}): none usable of "
                        f"{out.requested} requested; {out.task_id} is neither replayed nor transferred")
    elif len(out.rows) < out.requested:
        warnings.append(f"pseudo samples of {out.task_id} (learning {new_task}): {len(out.rows)} of "
                        f"{out.requested} requested; it is replayed with fewer")
    return warnings


def why_malformed(reasons: dict[str, int]) -> str:
    """'; dropped: 21 ended before the answer separator, 3 ...' (most frequent first), or ''."""
    if not reasons:
        return ""
    top = sorted(reasons.items(), key=lambda kv: (-kv[1], kv[0]))
    return "; dropped: " + ", ".join(f"{n} {MALFORMED.get(r, r)}" for r, n in top)


def merge_reasons(parts) -> dict[str, int]:
    """Sum of the parts' `reasons` counts."""
    total: dict[str, int] = {}
    for part in parts:
        for reason, n in part.items():
            total[reason] = total.get(reason, 0) + n
    return total


class GreedyAfter(LogitsProcessor):
    """Decode greedily in every row once `token` has been generated (top-k before it).

    For pseudo samples: the input is sampled (diversity), the answer after the
    separator is the model's best answer to that input, as when it is
    evaluated, instead of a sample that may drift away from its own input.
    """

    def __init__(self, token: int):
        self.token = token

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        # input_ids (batch, seq), scores (batch, vocab)
        after = (input_ids == self.token).any(dim=1, keepdim=True)  # (batch, 1)
        if not bool(after.any()):
            return scores
        best = scores.argmax(dim=-1, keepdim=True)
        greedy = torch.full_like(scores, float("-inf")).scatter(1, best, scores.gather(1, best))
        return torch.where(after, greedy, scores)


class OneSeparator(LogitsProcessor):
    """Keep a pseudo sample to its format: a non-empty input, one separator, a non-empty answer, the end.

    Before a row's separator, the end token's probability moves onto the
    separator (the model means to end the input, and in this format an input
    ends with the separator); after it, the separator's moves onto the end token
    (a second separator would start a second answer). Where either would leave
    a part empty (no input token yet; the separator just written) both are
    barred there instead. So a sample that ends has one separator and tokens on
    both sides of it; it can still be dropped when a side decodes to whitespace
    only, or when it is cut at the length limit. The moves add probabilities
    (logaddexp of the two logits), so every other token's probability stays as
    it was, up to the renormalisation where the two are barred.
    `prompt_length`: the tokens before the generated ones (the generation token).
    """

    PSEUDO_SEPARATOR = ("free", "one")

    def __init__(self, separator: int, end: int, *, prompt_length: int = 1):
        self.separator, self.end, self.prompt_length = separator, end, prompt_length

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        # input_ids (batch, seq), scores (batch, vocab) logits
        after = (input_ids[:, self.prompt_length:] == self.separator).any(dim=1)  # (batch,)
        sep, end = scores[:, self.separator], scores[:, self.end]
        merged = torch.logaddexp(sep, end)
        barred = input_ids[:, -1] == self.separator  # the answer would be empty
        if input_ids.shape[1] <= self.prompt_length:  # the input would be empty
            barred = torch.ones_like(barred)
        out = scores.clone()
        out[:, self.separator] = torch.where(after | barred, float("-inf"), merged)
        out[:, self.end] = torch.where(after & ~barred, merged, float("-inf"))
        return out


@dataclass(frozen=True)
class SampleWant:
    """`n` pseudo samples of one task: its generation token starts them, its path runs them, seeing the token
    rows of the tasks in `scope` (the tasks up to it; None: every task's, `DMEAModel.only_rows_of`)."""

    task_id: str
    task_index: int
    path: list[int] | None
    n: int
    scope: tuple[str, ...] | None = field(default=None, kw_only=True)


@torch.no_grad()
def generate_pseudo_samples(model, formatter: Formatter, *, task_id: str, task_index: int,
                            path: Sequence[int] | None, n: int, top_k: int = 20, batch_size: int = 32,
                            max_new_tokens: int | None = None, seed: int = 0, answer: str = "greedy",
                            separator: str = "free", max_rounds: int | None = None,
                            scope: Sequence[str] | None = None) -> PseudoSamples:
    """Generate `n` well-formed pseudo samples of one task (fewer if sampling keeps failing).

    answer: "greedy" samples the input (top-k) and decodes the answer greedily;
    "sampled" samples both (LAMOL/ACM). separator: "free" (the model's own
    draws) or "one" (`OneSeparator`).
    """
    want = SampleWant(task_id, task_index, None if path is None else list(path), n,
                      scope=None if scope is None else tuple(scope))
    (out,) = generate_pseudo_samples_of(model, formatter, [want], top_k=top_k, batch_size=batch_size,
                                        max_new_tokens=max_new_tokens, seed=seed, answer=answer,
                                        separator=separator, max_rounds=max_rounds)
    return out


@torch.no_grad()
def generate_pseudo_samples_of(model, formatter: Formatter, wants: Sequence[SampleWant], *, top_k: int = 20,
                               batch_size: int = 32, max_new_tokens: int | None = None, seed: int = 0,
                               answer: str = "greedy", separator: str = "free",
                               max_rounds: int | None = None) -> list[PseudoSamples]:
    """Pseudo samples of several tasks in shared batches: one PseudoSamples per want, in order.

    Every round asks each task still short of its `n` for what it lacks (a
    little more, as some come out malformed); each row starts from its own
    task's generation token and runs along its task's path
    (`DMEAModel.route_batch`), so a row is a sample of its task whatever shares
    its batch; only the random draws depend on the batch. Many small requests
    (ACM replays every task sharing a module, one or two samples each late in
    a long sequence) thus cost a few `generate` calls, not one each. With one
    want this is `generate_pseudo_samples`, draw for draw.
    """
    if answer not in ("greedy", "sampled"):
        raise ValueError(f"pseudo-sample answer decoding {answer!r} unknown; choose greedy or sampled")
    if separator not in OneSeparator.PSEUDO_SEPARATOR:
        raise ValueError(f"pseudo-sample separator {separator!r} unknown; choose one of {OneSeparator.PSEUDO_SEPARATOR}")
    special = formatter.special
    max_new_tokens = max_new_tokens or formatter.max_length - 1
    total = sum(w.n for w in wants)
    max_rounds = max_rounds or 3 * max(1, -(-total // batch_size)) + 2
    torch.manual_seed(seed)
    was_training = model.training
    model.eval()
    # the format first, so the greedy answer and top-k sampling see the moved probabilities
    fmt = [OneSeparator(special.ans, special.eos, prompt_length=1)] if separator == "one" else []  # prompt: gen token
    processors = LogitsProcessorList(fmt + ([GreedyAfter(special.ans)] if answer == "greedy" else []))
    outs = [PseudoSamples(task_id=w.task_id, rows=[], malformed=0, generated=0, requested=w.n) for w in wants]
    for _ in range(max_rounds):
        needs = [w.n - len(o.rows) for w, o in zip(wants, outs, strict=True)]
        if all(k <= 0 for k in needs):
            break
        asks = [min(batch_size, k + max(1, k // 8)) if k > 0 else 0 for k in needs]  # over-ask a little
        owners = [i for i, ask in enumerate(asks) for _ in range(ask)]
        prompt = torch.tensor([[special.tasks[wants[i].task_index]] for i in owners], dtype=torch.long)
        paths = [wants[i].path for i in owners]
        routing = {"path": paths[0]} if all(p == paths[0] for p in paths) else {"paths": paths}
        routing["scopes"] = [wants[i].scope for i in owners]  # each row sees the token rows of its task's scope
        out = model.generate(prompt, **routing, attention_mask=torch.ones_like(prompt), do_sample=True,
                             top_k=top_k, max_new_tokens=max_new_tokens, eos_token_id=special.eos,
                             pad_token_id=special.pad, use_cache=True, suppress_tokens=list(special.tasks),
                             logits_processor=processors)
        for i, seq in zip(owners, out[:, 1:].tolist(), strict=True):
            mine = outs[i]
            if len(mine.rows) >= wants[i].n:
                continue  # count only what is used: over-asked extras are neither kept nor judged
            mine.generated += 1
            parsed = formatter.split_generated(seq)
            if isinstance(parsed, str):
                mine.malformed += 1
                mine.reasons[parsed] = mine.reasons.get(parsed, 0) + 1
                continue
            mine.truncated += special.eos not in seq
            mine.rows.append({"task_id": wants[i].task_id, "context": parsed[0], "question": "",
                              "answer": [parsed[1]]})
    model.train(was_training)
    return outs


@torch.no_grad()
def generate_answers(model, formatter: Formatter, rows: Sequence[dict], *, path: Sequence[int] | None = None,
                     paths: Sequence[Sequence[int] | None] | None = None, batch_size: int = 32,
                     max_new_tokens: int = 64, decoding: str = "greedy", top_k: int = 20,
                     seed: int = 0, scopes: Sequence[Sequence[str] | None] | None = None) -> list[str]:
    """Answer every row (`context`, `question`) along `path`; returns decoded answers.

    `paths`: one path per row instead (several tasks in one batch: each row runs
    along its own task's path, `DMEAModel.route_batch`); greedy answers are the
    ones each row gets in a batch of its own task. `scopes`: the token rows each
    row sees (its task's scope, `DMEAModel.rows_per_row`; None: every task's).
    (Any batch cuts answers at
    n_positions minus its widest prompt, so an answer that runs that long
    without an end token depends on its batch's widest prompt.)
    """
    if decoding not in ("greedy", "top_k"):
        raise ValueError(f"decoding {decoding!r} unknown; choose greedy or top_k")
    if paths is not None and (path is not None or len(paths) != len(rows)):
        raise ValueError(f"paths needs one path per row ({len(rows)} rows, {len(paths)} paths) and no `path`")
    if scopes is not None and len(scopes) != len(rows):
        raise ValueError(f"scopes needs one scope per row ({len(rows)} rows, {len(scopes)} scopes)")
    special = formatter.special
    torch.manual_seed(seed)
    was_training = model.training
    model.eval()
    answers: list[str] = []
    for start in range(0, len(rows), batch_size):
        chunk = rows[start:start + batch_size]
        routing = {"path": path} if paths is None else {"paths": [None if p is None else list(p)
                                                                   for p in paths[start:start + batch_size]]}
        if scopes is not None:
            routing["scopes"] = list(scopes[start:start + batch_size])
        batch = left_pad([formatter.prompt_ids(r["context"], r["question"]) for r in chunk], pad_id=special.pad)
        budget = max(1, min(max_new_tokens, _positions(model) - batch["input_ids"].shape[1]))
        sampling = {"do_sample": True, "top_k": top_k} if decoding == "top_k" else {"do_sample": False}
        out = model.generate(batch["input_ids"], attention_mask=batch["attention_mask"],
                             max_new_tokens=budget, eos_token_id=special.eos, pad_token_id=special.pad,
                             use_cache=True, suppress_tokens=[special.ans, *special.tasks], **routing, **sampling)
        width = batch["input_ids"].shape[1]
        answers.extend(formatter.decode_answer(seq) for seq in out[:, width:].tolist())
    model.train(was_training)
    return answers


def _positions(model) -> int:
    return int(model.backbone.config.n_positions)


def write_pseudo_samples(rows: Sequence[dict], path: str | Path) -> Path:
    """Write pseudo samples as Parquet with plain Arrow columns."""
    path = Path(path)
    table = pa.Table.from_pylist([{k: r[k] for k in PSEUDO_SCHEMA.names} for r in rows], schema=PSEUDO_SCHEMA)
    with atomic_path(path) as partial:  # the run's state names the file: whole and on disk first
        pq.write_table(table, partial)
    return path


def read_pseudo_samples(path: str | Path) -> list[dict]:
    return pq.read_table(path).to_pylist()
