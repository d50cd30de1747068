"""Batched generation: pseudo samples of earlier tasks, and answers for evaluation.

Pseudo samples: the model generates `context <|ans|> answer <eos>` from a
task's generation token alone, along that task's path, top-k sampling, many
samples per call with the KV cache (one task per batch). Each output is parsed
at the separator; malformed ones are dropped and counted. Sampling repeats
(bounded) until `n` valid samples exist.

Answers: prompts `context <|ans|>` are left-padded and decoded greedily (the
default, reproducible) or by top-k sampling.

Pseudo samples are stored as Parquet with plain Arrow columns (no tensor
extension types, so `datasets`, pandas and Ray Data all read them).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import torch

from dmea_dist.data.formatting import Formatter, left_pad

PSEUDO_SCHEMA = pa.schema([
    ("task_id", pa.string()), ("context", pa.string()), ("question", pa.string()),
    ("answer", pa.list_(pa.string())),
])


@dataclass
class PseudoSamples:
    task_id: str
    rows: list[dict]
    malformed: int
    generated: int


@torch.no_grad()
def generate_pseudo_samples(model, formatter: Formatter, *, task_id: str, task_index: int,
                            path: Sequence[int] | None, n: int, top_k: int = 20, batch_size: int = 32,
                            max_new_tokens: int | None = None, seed: int = 0,
                            max_rounds: int | None = None) -> PseudoSamples:
    """Generate `n` well-formed pseudo samples of one task (fewer if sampling keeps failing)."""
    special = formatter.special
    max_new_tokens = max_new_tokens or formatter.max_length - 1
    max_rounds = max_rounds or 3 * max(1, -(-n // batch_size)) + 2
    torch.manual_seed(seed)
    was_training = model.training
    model.eval()
    rows: list[dict] = []
    malformed = generated = 0
    for _ in range(max_rounds):
        if len(rows) >= n:
            break
        size = min(batch_size, 2 * (n - len(rows)))  # over-ask a little: some come out malformed
        prompt = torch.full((size, 1), special.tasks[task_index], dtype=torch.long)
        out = model.generate(prompt, path=path, attention_mask=torch.ones_like(prompt), do_sample=True,
                             top_k=top_k, max_new_tokens=max_new_tokens, eos_token_id=special.eos,
                             pad_token_id=special.pad, use_cache=True)
        for seq in out[:, 1:].tolist():
            generated += 1
            parsed = formatter.parse_generated(seq)
            if parsed is None:
                malformed += 1
            elif len(rows) < n:
                rows.append({"task_id": task_id, "context": parsed[0], "question": "", "answer": [parsed[1]]})
    model.train(was_training)
    return PseudoSamples(task_id=task_id, rows=rows, malformed=malformed, generated=generated)


@torch.no_grad()
def generate_answers(model, formatter: Formatter, rows: Sequence[dict], *, path: Sequence[int] | None,
                     batch_size: int = 32, max_new_tokens: int = 64, decoding: str = "greedy",
                     top_k: int = 20, seed: int = 0) -> list[str]:
    """Answer every row (`context`, `question`) along `path`; returns decoded answers."""
    if decoding not in ("greedy", "top_k"):
        raise ValueError(f"decoding {decoding!r} unknown; choose greedy or top_k")
    special = formatter.special
    torch.manual_seed(seed)
    was_training = model.training
    model.eval()
    answers: list[str] = []
    for start in range(0, len(rows), batch_size):
        chunk = rows[start:start + batch_size]
        batch = left_pad([formatter.prompt_ids(r["context"], r["question"]) for r in chunk], pad_id=special.pad)
        budget = max(1, min(max_new_tokens, _positions(model) - batch["input_ids"].shape[1]))
        sampling = {"do_sample": True, "top_k": top_k} if decoding == "top_k" else {"do_sample": False}
        out = model.generate(batch["input_ids"], path=path, attention_mask=batch["attention_mask"],
                             max_new_tokens=budget, eos_token_id=special.eos, pad_token_id=special.pad,
                             use_cache=True, **sampling)
        width = batch["input_ids"].shape[1]
        answers.extend(formatter.decode_answer(seq) for seq in out[:, width:].tolist())
    model.train(was_training)
    return answers


def _positions(model) -> int:
    return int(model.backbone.config.n_positions)


def write_pseudo_samples(rows: Sequence[dict], path: str | Path) -> Path:
    """Write pseudo samples as Parquet with plain Arrow columns."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    table = pa.Table.from_pylist([{k: r[k] for k in PSEUDO_SCHEMA.names} for r in rows], schema=PSEUDO_SCHEMA)
    pq.write_table(table, path)
    return path


def read_pseudo_samples(path: str | Path) -> list[dict]:
    return pq.read_table(path).to_pylist()
