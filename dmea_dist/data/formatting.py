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
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import torch

from dmea_dist.data.tokenizer import SpecialTokenIds

IGNORE = -100  # label value cross-entropy skips


@dataclass(frozen=True)
class Example:
    """One tokenised training example. `labels` is IGNORE where no loss is taken."""

    input_ids: list[int]
    labels: list[int]


def _join(context: str, question: str) -> str:
    return f"{context} {question}".strip() if question else context


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
        or with an empty side is malformed.
        """
        ids = list(ids)
        if self.special.eos in ids:
            ids = ids[: ids.index(self.special.eos)]
        if ids.count(self.special.ans) != 1 or set(self.special.tasks) & set(ids):
            return None
        sep = ids.index(self.special.ans)
        context = self.tokenizer.decode(ids[:sep]).strip()
        answer = self.tokenizer.decode(ids[sep + 1:]).strip()
        if not context or not answer:
            return None
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
    width = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(prompts), width), dtype=torch.long)
    for row, p in enumerate(prompts):
        ids[row, width - len(p):] = torch.tensor(list(p))
        mask[row, width - len(p):] = 1
    return {"input_ids": ids, "attention_mask": mask}


def shard_order(n: int, *, seed: int | str, shard: tuple[int, int] = (0, 1)) -> list[int]:
    """A seeded shuffle of range(n), then this rank's part of it.

    `shard=(rank, world)` keeps every world-th example, so data-parallel ranks
    see disjoint parts; every rank gets the same count (the tail that does not
    fill every rank is dropped only when world > 1).
    """
    order = list(range(n))
    random.Random(seed).shuffle(order)
    rank, world = shard
    if world > 1:
        order = order[rank::world][: n // world]
    return order


def iterate_batches(qa: Sequence[Example], lm: Sequence[Example], *, batch_size: int, pad_id: int,
                    seed: int, shard: tuple[int, int] = (0, 1)) -> Iterator[tuple[dict, dict]]:
    """One epoch of (qa_batch, lm_batch) pairs of one task, shuffled by `seed` (see `shard_order`)."""
    order = shard_order(len(qa), seed=seed, shard=shard)
    for start in range(0, len(order), batch_size):
        idx = order[start:start + batch_size]
        yield (collate([qa[i] for i in idx], pad_id=pad_id), collate([lm[i] for i in idx], pad_id=pad_id))


@dataclass
class BatchStream:
    """An endless stream of (qa_batch, lm_batch) pairs of one task, reshuffled every epoch.

    Batch k is a pure function of (seed, k): it lies in epoch k // len(self),
    whose order is a shuffle seeded by (seed, epoch). So a stream gives the
    same batches in a Ray task, a Ray Train worker or in process, and a run
    never trains every epoch in the same order.
    """

    qa: Sequence[Example]
    lm: Sequence[Example]
    batch_size: int
    pad_id: int
    seed: int | str
    shard: tuple[int, int] = (0, 1)

    def __post_init__(self):
        if len(self.qa) != len(self.lm):
            raise ValueError(f"qa and lm examples differ in number: {len(self.qa)} and {len(self.lm)}")
        self._epoch, self._order = -1, []

    def __len__(self) -> int:
        """Batches per epoch on this shard."""
        per_rank = len(self.qa) if self.shard[1] == 1 else len(self.qa) // self.shard[1]
        return -(-per_rank // self.batch_size)

    def batch(self, k: int) -> tuple[dict, dict]:
        epoch, position = divmod(k, len(self))
        if epoch != self._epoch:
            self._epoch, self._order = epoch, shard_order(len(self.qa), seed=f"{self.seed}:{epoch}",
                                                          shard=self.shard)
        idx = self._order[position * self.batch_size:(position + 1) * self.batch_size]
        return (collate([self.qa[i] for i in idx], pad_id=self.pad_id),
                collate([self.lm[i] for i in idx], pad_id=self.pad_id))

    def epoch(self, epoch: int = 0) -> list[tuple[dict, dict]]:
        """Every batch of one epoch, in order."""
        return [self.batch(epoch * len(self) + i) for i in range(len(self))]
