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
        """Split generated `context <|ans|> answer <eos>` into (context, answer); None if malformed.

        `ids` excludes the leading task token. Malformed: no separator, no end
        token, or an empty side.
        """
        ids = list(ids)
        if self.special.ans not in ids or self.special.eos not in ids:
            return None
        sep = ids.index(self.special.ans)
        end = ids.index(self.special.eos)
        if not 0 < sep < end - 1:
            return None
        specials = set(self.special.tasks) | {self.special.ans}
        if specials & set(ids[:sep] + ids[sep + 1:end]):
            return None
        context = self.tokenizer.decode(ids[:sep]).strip()
        answer = self.tokenizer.decode(ids[sep + 1:end]).strip()
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


def iterate_batches(qa: Sequence[Example], lm: Sequence[Example], *, batch_size: int, pad_id: int,
                    seed: int, shard: tuple[int, int] = (0, 1)) -> Iterator[tuple[dict, dict]]:
    """One epoch of (qa_batch, lm_batch) pairs of one task, shuffled by `seed`.

    `shard=(rank, world)` keeps every world-th example, so data-parallel ranks
    see disjoint parts; the number of batches is equal on every rank (the tail
    that does not fill a batch on every rank is dropped only when world > 1).
    """
    order = list(range(len(qa)))
    random.Random(seed).shuffle(order)
    rank, world = shard
    if world > 1:
        per_rank = len(order) // world
        order = order[rank::world][:per_rank]
    for start in range(0, len(order), batch_size):
        idx = order[start:start + batch_size]
        yield (collate([qa[i] for i in idx], pad_id=pad_id), collate([lm[i] for i in idx], pad_id=pad_id))
