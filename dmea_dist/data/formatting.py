"""Turn task rows into token sequences (the LAMOL/ACM convention) and batches.

Every sample is `context + question -> answer`:

* QA example: `context question <|ans|> answer <eos>`; loss on `answer <eos>`.
* LM example: `<|task_i|> context question <|ans|> answer <eos>`; loss on every
  token after the task token, so the model learns to *generate* samples of
  task i from its generation token alone (pseudo samples).
* Prompt (evaluation): `context question <|ans|>`, left-padded for batched
  generation.
* Pseudo samples are parsed back at `<|ans|>` and `<eos>`.

Truncation keeps the answer: the context is cut first (from its end), the
answer only if it alone cannot fit. A batch always holds one task.
"""

from __future__ import annotations

import random
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

from dmea_dist.data.tokenizer import SpecialTokenIds

if TYPE_CHECKING:  # torch is imported by the batching functions only: the driver's input check (lengths
    # through a Formatter) runs without it, before Ray starts (`preflight.check_input`)
    import torch

IGNORE = -100  # label value cross-entropy skips


@dataclass(frozen=True)
class Example:
    """One tokenised training example. `labels` is IGNORE where no loss is taken."""

    input_ids: list[int]
    labels: list[int]


def _join(context: str, question: str) -> str:
    return f"{context} {question}".strip() if question else context


# why a generated pseudo sample was dropped (Formatter.split_generated)
MALFORMED = {
    "no_separator_ended": "ended before the answer separator",
    "no_separator_cut": "cut at the length limit before the answer separator",
    "several_separators": "more than one answer separator",
    "task_token": "a generation token inside",
    "empty_input": "nothing before the separator",
    "empty_answer": "nothing after the separator",
}


class Formatter:
    """Encodes rows of one tokenizer; holds no per-task state."""

    def __init__(self, tokenizer, *, max_length: int):
        self.tokenizer = tokenizer
        self.special = SpecialTokenIds.from_tokenizer(tokenizer)
        self.max_length = max_length
        self.truncated = 0  # examples whose context or answer was cut

    def _ids(self, text: str) -> list[int]:
        return self.tokenizer(text, add_special_tokens=False)["input_ids"]

    def _fit(self, prompt: list[int], answer: list[int], reserved: int) -> tuple[list[int], list[int]]:
        """Cut prompt (then answer) so that reserved + prompt + answer + <ans> + <eos> fits."""
        room = self.max_length - reserved - 2
        if len(prompt) + len(answer) <= room:
            return prompt, answer
        self.truncated += 1
        answer = answer[: max(room - 1, 1)]  # keep at least one prompt token when possible
        return prompt[: max(room - len(answer), 0)], answer

    def qa_example(self, context: str, question: str, answer: str) -> Example:
        prompt, ans = self._fit(self._ids(_join(context, question)), self._ids(" " + answer), reserved=0)
        head = prompt + [self.special.ans]
        tail = ans + [self.special.eos]
        return Example(head + tail, [IGNORE] * len(head) + tail)

    def lm_example(self, context: str, question: str, answer: str, *, task_index: int) -> Example:
        prompt, ans = self._fit(self._ids(_join(context, question)), self._ids(" " + answer), reserved=1)
        ids = [self.special.tasks[task_index]] + prompt + [self.special.ans] + ans + [self.special.eos]
        return Example(ids, [IGNORE] + ids[1:])

    def prompt_ids(self, context: str, question: str) -> list[int]:
        prompt = self._ids(_join(context, question))[: self.max_length - 1]
        return prompt + [self.special.ans]

    def parse_generated(self, ids: Sequence[int]) -> tuple[str, str] | None:
        """Split generated `context <|ans|> answer [<eos>]` into (context, answer); None if malformed.

        `ids` excludes the leading task token. As in LAMOL/ACM, a sample cut at
        the length limit (no end token) is kept up to where it stops; only a
        sample without exactly one separator, with a generation token inside,
        or with an empty side is malformed (`split_generated` says which).
        """
        out = self.split_generated(ids)
        return None if isinstance(out, str) else out

    def split_generated(self, ids: Sequence[int]) -> tuple[str, str] | str:
        """(context, answer) of a generated sample, or why it is malformed: one of MALFORMED."""
        ids = list(ids)
        ended = self.special.eos in ids
        if ended:
            ids = ids[: ids.index(self.special.eos)]
        if set(self.special.tasks) & set(ids):
            return "task_token"
        if ids.count(self.special.ans) != 1:
            return "several_separators" if ids.count(self.special.ans) else \
                "no_separator_ended" if ended else "no_separator_cut"
        sep = ids.index(self.special.ans)
        context = self.tokenizer.decode(ids[:sep]).strip()
        answer = self.tokenizer.decode(ids[sep + 1:]).strip()
        if not context or not answer:
            return "empty_input" if not context else "empty_answer"
        return context, answer

    def decode_answer(self, ids: Sequence[int]) -> str:
        """Decode generated answer tokens up to the first end token."""
        ids = list(ids)
        if self.special.eos in ids:
            ids = ids[: ids.index(self.special.eos)]
        return self.tokenizer.decode(ids, skip_special_tokens=True).strip()


def encode_task(formatter: Formatter, rows, *, task_index: int, references: str = "first"
                ) -> tuple[list[Example], list[Example]]:
    """QA and LM examples of a split (`rows`: dicts with context/question/answer list)."""
    qa, lm = [], []
    for row in rows:
        answers = row["answer"] if references == "all" else row["answer"][:1]
        for answer in answers:
            qa.append(formatter.qa_example(row["context"], row["question"], answer))
            lm.append(formatter.lm_example(row["context"], row["question"], answer, task_index=task_index))
    return qa, lm


def collate(examples: Sequence[Example], *, pad_id: int) -> dict[str, torch.Tensor]:
    """Right-pad to the longest example: input_ids, attention_mask, labels (batch, seq)."""
    import torch

    width = max(len(e.input_ids) for e in examples)
    ids = torch.full((len(examples), width), pad_id, dtype=torch.long)
    labels = torch.full((len(examples), width), IGNORE, dtype=torch.long)
    mask = torch.zeros((len(examples), width), dtype=torch.long)
    for row, ex in enumerate(examples):
        n = len(ex.input_ids)
        ids[row, :n] = torch.tensor(ex.input_ids)
        labels[row, :n] = torch.tensor(ex.labels)
        mask[row, :n] = 1
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def left_pad(prompts: Sequence[Sequence[int]], *, pad_id: int) -> dict[str, torch.Tensor]:
    """Left-pad prompts for batched generation: input_ids, attention_mask (batch, seq)."""
    import torch

    width = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(prompts), width), dtype=torch.long)
    for row, p in enumerate(prompts):
        ids[row, width - len(p):] = torch.tensor(list(p))
        mask[row, width - len(p):] = 1
    return {"input_ids": ids, "attention_mask": mask}


def collate_share(examples: Sequence[Example], share: Sequence[int], *, pad_id: int, world: int,
                  token_weights: Mapping[int, float] | None) -> dict[str, torch.Tensor]:
    """Collate this rank's `share` of a global batch, with the loss denominator of the whole batch.

    `denominator` = (weighted number of targets in the global batch) / world:
    a rank whose loss is (sum of its weighted target losses) / denominator,
    averaged over the ranks as data parallelism does, gives exactly the loss
    of the whole batch on one rank. An empty share (a last batch smaller than
    the world) runs one example with denominator infinity: a forward that
    adds nothing.
    """
    import torch

    total = sum(_weighted_targets(ex.labels, token_weights) for ex in examples)
    rows = [examples[i] for i in share] or list(examples[:1])
    batch = collate(rows, pad_id=pad_id)
    batch["denominator"] = torch.tensor(total / world if share else float("inf"), dtype=torch.float64)
    return batch


def _weighted_targets(labels: Sequence[int], token_weights: Mapping[int, float] | None) -> float:
    """The weight a loss normalises by: targets after the first position, each weighted (LM shift)."""
    weights = token_weights or {}
    return float(sum(weights.get(t, 1.0) for t in labels[1:] if t != IGNORE))


@dataclass
class BatchStream:
    """An endless stream of (qa_batch, lm_batch) pairs of one task, reshuffled every epoch.

    Batch k is a pure function of (seed, k): it lies in epoch k // len(self),
    whose order is a shuffle seeded by (seed, epoch). `batch_size` is the
    global batch: with `shard=(rank, world)` every rank walks the same global
    batches and takes every world-th example of each (its share), with the
    global batch's loss denominator (`collate_share`). So 1, 2 or 4 ranks
    train the same steps on the same examples with the same gradients, a
    stream gives the same batches in a Ray task, a Ray Train worker or in
    process, and a run never trains every epoch in the same order.
    """

    qa: Sequence[Example]
    lm: Sequence[Example]
    batch_size: int
    pad_id: int
    seed: int | str
    shard: tuple[int, int] = (0, 1)
    token_weights: Mapping[int, float] | None = None  # loss weight per target token (the answer separator)

    def __post_init__(self):
        if len(self.qa) != len(self.lm):
            raise ValueError(f"qa and lm examples differ in number: {len(self.qa)} and {len(self.lm)}")
        self._epoch, self._order = -1, []

    def __len__(self) -> int:
        """Global batches per epoch (the same on every rank)."""
        return -(-len(self.qa) // self.batch_size)

    def batch(self, k: int) -> tuple[dict, dict]:
        """This rank's share of global batch k: (qa_batch, lm_batch), each with its `denominator`."""
        idx = self._global_indices(k)
        rank, world = self.shard
        share = list(range(len(idx)))[rank::world]
        return tuple(collate_share([examples[i] for i in idx], share, pad_id=self.pad_id, world=world,
                                   token_weights=self.token_weights) for examples in (self.qa, self.lm))

    def shard_batches(self, k: int, pieces: int) -> dict[int, tuple[dict, dict]]:
        """Global batch k cut into `pieces` fixed pieces (piece s: examples s, s + pieces, ...), the ones this
        rank owns (s % world == rank): {s: (qa_batch, lm_batch)}, each with the whole batch's denominator.

        A piece's content does not depend on the rank count, so neither does its gradient (the engine's
        virtual shards). An empty piece (a last batch smaller than `pieces`) runs one example with
        denominator infinity, as `collate_share` does.
        """
        rank, world = self.shard
        if pieces % world:
            raise ValueError(f"{pieces} pieces cannot be split evenly over {world} ranks")
        idx = self._global_indices(k)
        return {s: tuple(collate_share([examples[i] for i in idx], list(range(len(idx)))[s::pieces],
                                       pad_id=self.pad_id, world=1, token_weights=self.token_weights)
                         for examples in (self.qa, self.lm))
                for s in range(rank, pieces, world)}

    def _global_indices(self, k: int) -> list[int]:
        epoch, position = divmod(k, len(self))
        if epoch != self._epoch:
            self._order = list(range(len(self.qa)))
            random.Random(f"{self.seed}:{epoch}").shuffle(self._order)
            self._epoch = epoch
        return self._order[position * self.batch_size:(position + 1) * self.batch_size]

    def epoch(self, epoch: int = 0) -> list[tuple[dict, dict]]:
        """Every batch of one epoch, in order."""
        return [self.batch(epoch * len(self) + i) for i in range(len(self))]
