"""User tasks from JSONL, CSV or Parquet files, and the task schema every loader shares.

Every task, whatever its source, becomes a `datasets.DatasetDict` with the splits
"train", "validation" and "test", each with exactly the columns
`context: str`, `question: str`, `answer: list[str]` (all references of one
input). This module owns that schema (`Sample`, `TASK_FEATURES`,
`to_dataset_dict`) because the user-file format *is* the schema; the corpus and
synthetic loaders build their samples with it too.

Key decisions:
- Files are read and validated row by row in plain Python *before* any Dataset
  is built, so a bad row fails with its file and 1-based line (JSONL, CSV) or
  0-based row index (Parquet) and what to fix, never deep inside Arrow.
- Text files are decoded as UTF-8 in one piece before parsing (`read_utf8`): a
  byte that is not UTF-8 fails with its line and byte offset, where decoding
  while iterating would raise from inside the csv/json readers. A leading BOM
  (Excel's "CSV UTF-8") is dropped, so the header still reads `context`.
- `answer` is a string or a list of strings. In CSV a list is written as a JSON
  array in the cell (`["ref one", "ref two"]`); a cell that does not parse as a
  JSON list of strings is taken as one plain answer.
- Rows sharing (context, question) are merged into one input with all their
  distinct answers, so an input never lands in two splits.
- A one-file spec is split by a seeded shuffle of the distinct inputs
  (`split_ratios`, default 0.8/0.1/0.1); each split keeps file order.
- Datasets are built in memory with `Dataset.from_dict` and explicit Features:
  offline, fast, and no cache files in the repository.
"""

from __future__ import annotations

import codecs
import csv
import dataclasses
import io
import json
import math
import random
from collections.abc import Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any, NamedTuple

from datasets import Dataset, DatasetDict, Features, List, Value

from dmea_dist.errors import DataError

SPLITS: tuple[str, str, str] = ("train", "validation", "test")

TASK_FEATURES = Features(
    {"context": Value("string"), "question": Value("string"), "answer": List(Value("string"))}
)

FORMATS = ("jsonl", "csv", "parquet")
_SUFFIX_FORMATS = {
    ".jsonl": "jsonl", ".ndjson": "jsonl", ".json": "jsonl",
    ".csv": "csv", ".parquet": "parquet", ".pq": "parquet",
}
_ROW_HELP = "each row needs 'context' (str), 'answer' (str or list of str), optional 'question' (str)"


class Sample(NamedTuple):
    """One distinct input and all its references."""

    context: str
    question: str
    answer: tuple[str, ...]


def to_dataset_dict(splits: Mapping[str, Sequence[Sample]], *, source: str) -> DatasetDict:
    """Build the task DatasetDict; `source` names the task/file in errors."""
    out = {}
    for split in SPLITS:
        samples = splits.get(split)
        if not samples:
            raise DataError(f"{source}: the {split!r} split is empty; every task needs "
                            f"non-empty {', '.join(SPLITS)} splits")
        columns = {
            "context": [s.context for s in samples],
            "question": [s.question for s in samples],
            "answer": [list(s.answer) for s in samples],
        }
        out[split] = Dataset.from_dict(columns, features=TASK_FEATURES)
    return DatasetDict(out)


@dataclasses.dataclass(frozen=True)
class UserTaskSpec:
    """Where a user task's data lives.

    path: one file, split into train/validation/test by `split_ratios` (seeded by `seed`).
    train, validation, test: explicit per-split files instead of `path` (all three).
    format: "jsonl", "csv" or "parquet"; None infers it from each file's suffix.
    split_ratios: train/validation/test fractions of the distinct inputs of `path`.
    seed: seed of the shuffle that splits `path`.
    """

    path: str | Path | None = None
    train: str | Path | None = None
    validation: str | Path | None = None
    test: str | Path | None = None
    format: str | None = None
    split_ratios: tuple[float, float, float] = (0.8, 0.1, 0.1)
    seed: int = 0

    def __post_init__(self) -> None:
        for field in ("path", *SPLITS):
            value = getattr(self, field)
            if value is not None:
                if not isinstance(value, str | Path):
                    raise DataError(f"user task: {field!r} must be a file path, got {value!r:.80}")
                object.__setattr__(self, field, Path(value).expanduser())  # `~` as the run saves it
        if isinstance(self.seed, bool) or not isinstance(self.seed, int):
            raise DataError(f"user task: seed {self.seed!r:.80} must be an int (the seed of the split's shuffle)")
        per_split = [getattr(self, s) for s in SPLITS]
        if self.path is not None and any(p is not None for p in per_split):
            raise DataError("user task: give either 'path' (one file, split by split_ratios) "
                            "or 'train'/'validation'/'test' files, not both")
        if self.path is None and any(p is None for p in per_split):
            missing = [s for s, p in zip(SPLITS, per_split, strict=True) if p is None]
            raise DataError(f"user task: missing {missing}; give 'path' (one file) or all of "
                            f"'train', 'validation', 'test'")
        if self.format is not None and self.format not in FORMATS:
            raise DataError(f"user task: format {self.format!r} is not one of {FORMATS}")
        given = self.split_ratios  # a list from YAML; one number (split_ratios: 0.8) is refused below
        ratios = tuple(given) if isinstance(given, list | tuple) else (given,)
        object.__setattr__(self, "split_ratios", ratios)
        if len(ratios) != 3 or any(not isinstance(r, (int, float)) or r <= 0 for r in ratios):
            raise DataError(f"user task: split_ratios {given!r} must be three positive numbers "
                            f"[train, validation, test], e.g. [0.8, 0.1, 0.1]")
        if not math.isclose(sum(ratios), 1.0, abs_tol=1e-6):
            raise DataError(f"user task: split_ratios {ratios!r} must sum to 1")

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> UserTaskSpec:
        """Build from a config mapping; unknown keys are rejected by name."""
        known = [f.name for f in dataclasses.fields(cls)]
        unknown = sorted(set(data) - set(known))
        if unknown:
            raise DataError(f"user task: unknown key(s) {unknown}; allowed keys: {known}")
        return cls(**data)

    def files(self) -> dict[str, Path]:
        """The files this spec reads: {"path": ...} or one per split."""
        if self.path is not None:
            return {"path": self.path}
        return {s: getattr(self, s) for s in SPLITS}


def load_user_task(spec: UserTaskSpec | Mapping[str, Any], *, name: str = "user task") -> DatasetDict:
    """Read, validate and split a user task into the standard DatasetDict."""
    if not isinstance(spec, UserTaskSpec):
        spec = UserTaskSpec.from_dict(spec)
    if spec.path is not None:
        samples = read_task_file(spec.path, format=spec.format)
        splits = split_samples(samples, ratios=spec.split_ratios, seed=spec.seed,
                               source=f"{name} ({spec.path})")
    else:
        splits = {s: read_task_file(getattr(spec, s), format=spec.format) for s in SPLITS}
    return to_dataset_dict(splits, source=f"task {name!r}")


def split_samples(samples: Sequence[Sample], *, ratios: Sequence[float], seed: int,
                  source: str) -> dict[str, list[Sample]]:
    """Split distinct inputs by a seeded shuffle; each split keeps the input order."""
    n = len(samples)
    n_val, n_test = round(n * ratios[1]), round(n * ratios[2])
    sizes = {"train": n - n_val - n_test, "validation": n_val, "test": n_test}
    for split, size in sizes.items():
        if size <= 0:
            raise DataError(f"{source}: {n} distinct inputs give an empty {split!r} split with "
                            f"split_ratios {tuple(ratios)}; add rows or raise that ratio")
    order = list(range(n))
    random.Random(seed).shuffle(order)
    bounds = {"train": (0, sizes["train"]),
              "validation": (sizes["train"], sizes["train"] + n_val),
              "test": (n - n_test, n)}
    return {s: [samples[i] for i in sorted(order[a:b])] for s, (a, b) in bounds.items()}


def read_task_file(path: str | Path, *, format: str | None = None) -> list[Sample]:
    """Read one JSONL/CSV/Parquet file into validated, de-duplicated samples."""
    path = Path(path)
    fmt = format or _SUFFIX_FORMATS.get(path.suffix.lower())
    if fmt is None:
        raise DataError(f"{path}: cannot tell the format from the suffix {path.suffix!r}; "
                        f"set the user task's 'format' to one of {FORMATS}")
    if not path.is_file():
        where = "" if path.is_absolute() else f" (a relative path is read from the current directory, {Path.cwd()})"
        raise DataError(f"{path}: file not found{where}; check the user task's path")
    samples = _merge_inputs(_validate(rec, where) for where, rec in _READERS[fmt](path))
    if not samples:
        raise DataError(f"{path}: no data rows; {_ROW_HELP}")
    return samples


def locate_input(spec: UserTaskSpec, split: str, *, context: str, question: str) -> str | None:
    """Where the input (`context`, `question`) of a loaded `split` row first appears in the user task's file, as
    this module's errors name rows: 'file:line' (JSONL, CSV: 1-based, as an editor shows it) or 'file row N
    (0-based)' (Parquet); None where no row has it. Loading merges repeated inputs and a one-file spec is shuffled
    into splits, so a loaded row's index does not find it in the file: this reads the file again (for errors)."""
    path = Path(spec.path if spec.path is not None else getattr(spec, split))
    fmt = spec.format or _SUFFIX_FORMATS.get(path.suffix.lower())
    for where, record in _READERS[fmt](path):
        if isinstance(record, Mapping) and record.get("context") == context and \
                (record.get("question") or "") == question:
            return where
    return None


def _merge_inputs(samples: Iterable[Sample]) -> list[Sample]:
    """Merge rows with the same (context, question), keeping first-seen order."""
    merged: dict[tuple[str, str], list[str]] = {}
    for s in samples:
        answers = merged.setdefault((s.context, s.question), [])
        for a in s.answer:
            if a not in answers:
                answers.append(a)
    return [Sample(c, q, tuple(a)) for (c, q), a in merged.items()]


def _validate(record: Any, where: str) -> Sample:
    """Check one raw row; `where` is 'file:line N' or 'file row N'."""
    if not isinstance(record, Mapping):
        raise DataError(f"{where}: expected an object with keys context/question/answer, "
                        f"got {type(record).__name__}; {_ROW_HELP}")
    for key in ("context", "answer"):
        if key not in record:  # the keys it has: a column named otherwise (`Context`, `answers`, `input`)
            raise DataError(f"{where}: missing key {key!r} (the row's keys: {sorted(map(str, record))}); {_ROW_HELP}")
    context, question = record["context"], record.get("question")
    question = "" if question is None else question
    if not isinstance(context, str):
        raise DataError(f"{where}: 'context' must be a string, got {type(context).__name__}")
    if not isinstance(question, str):
        raise DataError(f"{where}: 'question' must be a string, got {type(question).__name__}")
    if not context and not question:
        raise DataError(f"{where}: 'context' and 'question' are both empty; give at least one")
    answer = record["answer"]
    answers = [answer] if isinstance(answer, str) else answer
    if not isinstance(answers, list) or not all(isinstance(a, str) for a in answers):
        raise DataError(f"{where}: 'answer' must be a string or a list of strings, "
                        f"got {answer!r:.80}")
    if not answers or not all(a.strip() for a in answers):
        raise DataError(f"{where}: 'answer' is empty; give at least one non-empty reference")
    return Sample(context, question, tuple(answers))


def read_utf8(path: Path) -> str:
    """The text of `path`; a byte that is not UTF-8 fails with the line and byte offset (module docstring)."""
    data = path.read_bytes()
    skip = len(codecs.BOM_UTF8) if data.startswith(codecs.BOM_UTF8) else 0
    try:
        return data[skip:].decode("utf-8")
    except UnicodeDecodeError as e:
        offset = skip + e.start
        line = data.count(b"\n", 0, offset) + 1
        raise DataError(f"{path}:{line}: not UTF-8 (byte 0x{data[offset]:02x} at byte offset {offset}); "
                        f"re-encode the file as UTF-8, e.g. iconv -f <its encoding> -t utf-8") from None


def _jsonl_records(path: Path) -> Iterator[tuple[str, Any]]:
    # split on "\n" only: str.splitlines would also split at U+2028 and other separators JSON strings may hold
    for lineno, line in enumerate(read_utf8(path).split("\n"), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as e:
            raise DataError(f"{path}:{lineno}: invalid JSON ({e.msg}); JSON Lines needs one "
                            f"object per line, e.g. "
                            f'{{"context": "...", "question": "", "answer": ["..."]}}') from e
        yield f"{path}:{lineno}", record


def _csv_records(path: Path) -> Iterator[tuple[str, Any]]:
    reader = csv.reader(io.StringIO(read_utf8(path), newline=""))
    header = next(reader, None)
    if header is None or not {"context", "answer"} <= set(header):
        raise DataError(f"{path}:1: the CSV header {header} must name the columns "
                        f"'context' and 'answer' (and optionally 'question')")
    start = reader.line_num + 1  # a quoted field may span lines: report the row's first
    for row in reader:
        where = f"{path}:{start}"
        if not any(cell.strip() for cell in row):  # a blank line, or a spreadsheet's emptied row `,,`
            start = reader.line_num + 1
            continue
        if len(row) != len(header):
            raise DataError(f"{where}: {len(row)} fields but the header has {len(header)}; "
                            f"quote fields that contain commas")
        record = dict(zip(header, row, strict=True))
        record["answer"] = _csv_answer(record["answer"])
        start = reader.line_num + 1
        yield where, record


def _csv_answer(cell: str) -> str | list[str]:
    """A JSON array of strings in a cell is a list of references; anything else is one."""
    if cell.lstrip().startswith("["):
        try:
            value = json.loads(cell)
        except json.JSONDecodeError:
            return cell
        if isinstance(value, list) and all(isinstance(a, str) for a in value):
            return value
    return cell


def _parquet_records(path: Path) -> Iterator[tuple[str, Any]]:
    import pyarrow.parquet as pq  # the Arrow backend of `datasets`

    try:
        table = pq.read_table(path)
    except Exception as e:  # pyarrow raises several types for unreadable files
        raise DataError(f"{path}: not a readable Parquet file ({e})") from e
    missing = {"context", "answer"} - set(table.column_names)
    if missing:
        raise DataError(f"{path}: missing column(s) {sorted(missing)}; {_ROW_HELP}")
    for index, record in enumerate(table.to_pylist()):
        yield f"{path} row {index} (0-based)", record


_READERS = {"jsonl": _jsonl_records, "csv": _csv_records, "parquet": _parquet_records}
