"""Loaders for the real data-to-text corpora: RNNLG (four domains) and E2E.

Both are read in their original release formats from a data root (config key
`data.root`, `--data-root` for `dmea data`; see ../shared/data/README.md) and become the
standard task DatasetDict (`user_tasks.TASK_FEATURES`): the context is the
meaning representation exactly as in the file, the question is "", and the
answer holds the references of that input.

Key decisions:
- RNNLG files are JSON lists of `[dialogue_act, ref_1, ref_2]` after `#` comment
  lines; comment lines are blanked (not removed) so JSON error line numbers
  match the file. One row per file row: the published sizes (restaurant
  3114/1039/1039, ...) count file rows, and the same dialogue act can appear in
  several rows with different references, so rows are not merged.
- E2E has one CSV row per (mr, ref); rows are grouped by MR, keeping every
  reference in file order. The full E2E training set is not in the release we
  read, so train/validation come from `devset.csv`, split by distinct MR with a
  stable hash (SHA-256, not Python's salted `hash()`): no MR is in both, and
  the split is the same on every machine. Test is `testset_w_refs.csv`.
- Parsed files are cached per process, keyed by (path, mtime, size), so the
  many `load_task` calls of a long run parse each file once.
- The data root comes from the config (or the command line) only, no
  environment variable: `dmea run` reads `data.root`, so an error that advised
  an env var would send the user to a setting the command ignores.
"""

from __future__ import annotations

import csv
import functools
import hashlib
import io
import json
import os
from pathlib import Path

from datasets import DatasetDict

from dmea_dist.data.user_tasks import Sample, read_utf8, to_dataset_dict
from dmea_dist.errors import DataError

# how to point a command at the corpora, said in every data-root error
ROOT_HELP = ("set data.root in the config (or --set data.root=DIR; --data-root DIR for `dmea data`) to the "
             "folder holding rnnlg/ and e2e/ (see ../shared/data/README.md)")
RNNLG_DOMAINS = ("restaurant", "hotel", "tv", "laptop")
# Percent of the distinct devset MRs that go to validation (the rest train).
E2E_VALIDATION_PERCENT = 10

CORPUS_TASKS: dict[str, str] = {
    **{f"rnnlg.{d}": f"RNNLG {d} domain: dialogue act -> sentence, 2 references per row"
       for d in RNNLG_DOMAINS},
    "e2e": "E2E NLG challenge: restaurant MR -> sentence, all references per MR; "
           "train/validation split of devset.csv by MR hash, test testset_w_refs.csv",
}

_RNNLG_SPLIT_FILES = {"train": "train.json", "validation": "valid.json", "test": "test.json"}


def resolve_data_root(data_root: str | os.PathLike | None) -> Path:
    """The corpora folder `data_root` (relative: to the current directory; `~` expanded, as the run saves it);
    None fails with how to set it."""
    if not data_root:
        raise DataError(f"no data root for the real corpora: {ROOT_HELP}")
    return Path(data_root).expanduser()


def require_data_root(data_root: str | os.PathLike | None, *, name: str) -> Path:
    """The data root, or a DataError naming the folder that does not exist (resolved) and how to set it."""
    root = resolve_data_root(data_root)
    if not root.is_dir():
        raise DataError(f"data root {str(root)!r} (= {root.resolve()}) does not exist, and task {name!r} "
                        f"reads its corpus from there; {ROOT_HELP}")
    return root


def corpus_files(name: str, *, data_root: str | os.PathLike | None) -> dict[str, Path]:
    """The file each split of corpus task `name` is read from."""
    root = resolve_data_root(data_root)
    if name == "e2e":
        dev = root / "e2e" / "devset.csv"
        return {"train": dev, "validation": dev, "test": root / "e2e" / "testset_w_refs.csv"}
    domain = name.removeprefix("rnnlg.")
    if name.startswith("rnnlg.") and domain in RNNLG_DOMAINS:
        return {split: root / "rnnlg" / domain / fname for split, fname in _RNNLG_SPLIT_FILES.items()}
    raise DataError(f"unknown corpus task {name!r}; corpus tasks: {sorted(CORPUS_TASKS)}")


def corpus_available(name: str, *, data_root: str | os.PathLike | None) -> bool:
    """Whether every file of corpus task `name` exists (False without a data root)."""
    try:
        return all(p.is_file() for p in corpus_files(name, data_root=data_root).values())
    except DataError:
        return False


def load_corpus(name: str, *, data_root: str | os.PathLike | None) -> DatasetDict:
    """Load a corpus task ("rnnlg.<domain>" or "e2e") as the standard DatasetDict."""
    require_data_root(data_root, name=name)
    files = corpus_files(name, data_root=data_root)
    for path in files.values():
        _require_file(path, name=name)
    if name == "e2e":
        dev = read_e2e_file(files["train"])
        splits = {
            "train": [s for s in dev if not is_e2e_validation_mr(s.context)],
            "validation": [s for s in dev if is_e2e_validation_mr(s.context)],
            "test": list(read_e2e_file(files["test"])),
        }
    else:
        splits = {split: list(read_rnnlg_file(path)) for split, path in files.items()}
    return to_dataset_dict(splits, source=f"corpus task {name!r}")


def is_e2e_validation_mr(mr: str) -> bool:
    """Stable, machine-independent 90/10 assignment of a devset MR to validation."""
    bucket = int.from_bytes(hashlib.sha256(mr.encode("utf-8")).digest()[:8], "big") % 100
    return bucket < E2E_VALIDATION_PERCENT


def read_rnnlg_file(path: str | os.PathLike) -> tuple[Sample, ...]:
    """Parse one RNNLG JSON file (cached per process by path, mtime and size)."""
    path = _require_file(Path(path))
    stat = path.stat()
    return _parse_rnnlg(str(path), stat.st_mtime_ns, stat.st_size)


def read_e2e_file(path: str | os.PathLike) -> tuple[Sample, ...]:
    """Parse one E2E CSV into one sample per distinct MR (cached like RNNLG)."""
    path = _require_file(Path(path))
    stat = path.stat()
    return _parse_e2e(str(path), stat.st_mtime_ns, stat.st_size)


def _require_file(path: Path, *, name: str | None = None) -> Path:
    if not path.is_file():
        task = f" of task {name!r}" if name else ""
        raise DataError(f"{path}: corpus file{task} not found; {ROOT_HELP}")
    return path


# mtime_ns and size are unused in the body: they are part of the cache key so that a
# changed file is parsed again.
@functools.lru_cache(maxsize=32)
def _parse_rnnlg(path: str, mtime_ns: int, size: int) -> tuple[Sample, ...]:
    # Blank the '#' comment lines instead of dropping them: JSON errors keep file lines.
    lines = read_utf8(Path(path)).split("\n")
    text = "\n".join("" if line.lstrip().startswith("#") else line for line in lines)
    try:
        rows = json.loads(text)
    except json.JSONDecodeError as e:
        raise DataError(f"{path}:{e.lineno}: invalid JSON ({e.msg}); an RNNLG file is '#' "
                        f"comment lines then a JSON list of [dialogue_act, ref_1, ref_2]") from e
    if not isinstance(rows, list):
        raise DataError(f"{path}: expected a JSON list of [dialogue_act, ref_1, ref_2] rows, "
                        f"got {type(rows).__name__}")
    samples = []
    for index, row in enumerate(rows):
        ok = (isinstance(row, list) and len(row) >= 2
              and all(isinstance(x, str) and x.strip() for x in row))
        if not ok:
            raise DataError(f"{path}: row {index} (0-based, in the JSON list) is malformed: "
                            f"expected [dialogue_act, ref_1, ref_2] of non-empty strings, "
                            f"got {row!r:.120}")
        samples.append(Sample(row[0], "", tuple(row[1:])))
    return tuple(samples)


@functools.lru_cache(maxsize=32)
def _parse_e2e(path: str, mtime_ns: int, size: int) -> tuple[Sample, ...]:
    refs: dict[str, list[str]] = {}  # insertion order = first appearance of each MR
    reader = csv.reader(io.StringIO(read_utf8(Path(path)), newline=""))
    header = next(reader, None)
    if header is None or [h.strip() for h in header[:2]] != ["mr", "ref"]:
        raise DataError(f"{path}:1: expected the E2E header 'mr,ref', got {header}")
    for index, row in enumerate(reader):
        if not row:  # blank line
            continue
        # as wide as the header, which may name more columns after mr,ref (the cleaned release's fixed,orig_mr)
        if len(row) != len(header) or not row[0].strip() or not row[1].strip():
            raise DataError(f"{path}: row {index} (0-based after the header, ending at line "
                            f"{reader.line_num}) is malformed: expected {len(header)} fields, mr and ref "
                            f"non-empty (quote fields that contain commas), got {row!r:.120}")
        refs.setdefault(row[0], []).append(row[1])
    if not refs:
        raise DataError(f"{path}: no data rows after the header 'mr,ref'")
    return tuple(Sample(mr, "", tuple(r)) for mr, r in refs.items())
