"""Inputs longer than the model's context: found before any training, refused or truncated knowingly.

`Formatter` fits every example into `model.max_length` tokens by cutting the
input from its end (the answer is kept). Done silently, that merges inputs
that differ only at their end (two E2E MRs that differ in their last
attribute become one prompt with two answers), so a run must say so:
`check_lengths` measures every task once, before training, and with
`data.overlength: error` (the default) refuses the run naming the task,
split, row (a user task's row by its file and line, as `user_tasks` names
rows) and token count; with `truncate` it warns once per task with the
number of cut examples and of distinct inputs that became one prompt.

What is measured is what the run encodes:
* train and validation rows: the LM example `<|task|> input <|ans|> answer
  <eos>` (the longest encoding), for each reference that becomes an example;
* test rows: the evaluation prompt `input <|ans|>` (answers are generated).
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

from dmea_dist.data.formatting import Formatter, _join
from dmea_dist.errors import DataError, DataWarning

LM_EXTRA = 3  # task token, answer separator, end token around input and answer


@dataclass(frozen=True)
class SplitLengths:
    """Examples of one split of one task that do not fit, and what truncation would merge."""

    split: str
    examples: int  # examples measured
    over: list[tuple[int, int]]  # (row index, tokens) of each example longer than max_length, in row order
    collapsed: int  # distinct inputs whose cut prompt equals another distinct input's cut prompt
    # the first such example's input: loaders group (E2E) or shuffle (a user task's one file) rows, so the
    # index alone does not find the row in the file
    first_input: str = ""


def measure_split(formatter: Formatter, rows: Sequence[Mapping], *, split: str, references: str) -> SplitLengths:
    """Token lengths of one split as `Formatter` would encode it (module docstring)."""
    limit = formatter.max_length
    inputs = [_join(r["context"], r["question"]) for r in rows]
    prompts = _token_ids(formatter, inputs)
    # cut prompt -> the distinct inputs encoded with it; an input can have several cut prompts (each answer
    # leaves its own room: a repeated input, or references="all"), and each of them can merge with another input
    examples, over, cut_prompts = 0, [], {}
    if split == "test":
        for index, (text, prompt) in enumerate(zip(inputs, prompts, strict=True)):
            examples += 1
            if len(prompt) + 1 > limit:
                over.append((index, len(prompt) + 1))
            cut_prompts.setdefault(tuple(prompt[: limit - 1]), set()).add(text)
    else:
        pairs = [(i, a) for i, r in enumerate(rows) for a in (r["answer"] if references == "all" else r["answer"][:1])]
        answers = _token_ids(formatter, [" " + a for _, a in pairs])
        for (index, _), answer in zip(pairs, answers, strict=True):
            examples += 1
            tokens = LM_EXTRA + len(prompts[index]) + len(answer)
            if tokens > limit:
                over.append((index, tokens))
            cut_prompts.setdefault(tuple(_cut_prompt(prompts[index], answer, limit)), set()).add(inputs[index])
    merged = set().union(*(texts for texts in cut_prompts.values() if len(texts) > 1))
    return SplitLengths(split=split, examples=examples, over=over, collapsed=len(merged),
                        first_input=inputs[over[0][0]] if over else "")


def check_lengths(formatter: Formatter, tasks: Sequence[tuple[str, Mapping[str, Sequence[Mapping]]]], *,
                  train_references: str, overlength: str, positions: int,
                  locate: Callable[[str, str, Mapping], str | None] | None = None) -> None:
    """Refuse (`overlength="error"`) or warn once per task about (`"truncate"`) examples that do not fit.

    `tasks`: (task_id, split -> rows) in sequence order; `positions`: the
    model's, named in the fix (max_length may be raised up to it). `locate`:
    (task_id, split, row) -> where the row is in its file ('file:line'), or
    None; the error names that place, else the row's index as loaded.
    """
    found = []
    for task_id, rows in tasks:
        splits = [measure_split(formatter, rows[split], split=split,
                                references=train_references if split == "train" else "first")
                  for split in ("train", "validation", "test")]
        if any(s.over for s in splits):
            found.append((task_id, splits))
    if not found:
        return
    if overlength == "truncate":
        for task_id, splits in found:
            warnings.warn(_truncate_message(task_id, splits, formatter.max_length), DataWarning, stacklevel=2)
        return
    task_id, splits = found[0]
    first = next(s for s in splits if s.over)
    place = locate(task_id, first.split, dict(tasks)[task_id][first.split][first.over[0][0]]) if locate else None
    raise DataError(_error_message(found, formatter.max_length, positions, place=place))


def _error_message(found, max_length: int, positions: int, *, place: str | None) -> str:
    task_id, splits = found[0]
    first = next(s for s in splits if s.over)
    row, tokens = first.over[0]
    counts = ", ".join(f"{t} {sum(len(s.over) for s in ss)}" for t, ss in found)
    if max_length < positions:
        fix = f"raise model.max_length (up to the model's {positions} positions)"
    else:
        fix = f"shorten these inputs (model.max_length={max_length} is already all the model's {positions} positions)"
    start = first.first_input if len(first.first_input) <= 60 else first.first_input[:60] + "..."
    where = f"{place}: task {task_id!r}, split {first.split!r}" if place else \
        f"task {task_id!r}, split {first.split!r}, row {row} (0-based, as loaded)"
    return (f"{where}, input {start!r}: {tokens} tokens, longer than "
            f"model.max_length={max_length} (examples too long per task: {counts}); {fix}, or set "
            f"data.overlength: truncate to cut inputs from their end (inputs that then look the same merge)")


def _truncate_message(task_id: str, splits: list[SplitLengths], max_length: int) -> str:
    over = sum(len(s.over) for s in splits)
    total = sum(s.examples for s in splits)
    collapsed = sum(s.collapsed for s in splits)
    merged = (f"; after truncation {collapsed} distinct inputs share their prompt with another input, "
              f"so the model cannot tell them apart") if collapsed else "; no two distinct inputs became one prompt"
    return (f"task {task_id!r}: {over} of {total} examples are longer than model.max_length={max_length} and "
            f"are truncated (data.overlength: truncate){merged}")


def prompt_length(formatter: Formatter, context: str, question: str) -> int:
    """Tokens of the prompt `input <|ans|>` before any cut (`Formatter.prompt_ids` cuts it to max_length)."""
    return len(_token_ids(formatter, [_join(context, question)])[0]) + 1


def _cut_prompt(prompt: list[int], answer: list[int], limit: int) -> list[int]:
    """The prompt `Formatter._fit` keeps for an LM example (reserved = the task token)."""
    room = limit - LM_EXTRA
    if len(prompt) + len(answer) <= room:
        return prompt
    kept_answer = answer[: max(room - 1, 1)]
    return prompt[: max(room - len(kept_answer), 0)]


def _token_ids(formatter: Formatter, texts: list[str]) -> list[list[int]]:
    if not texts:
        return []
    return formatter.tokenizer(texts, add_special_tokens=False)["input_ids"]
