"""The task registry: a task name resolves to one standard DatasetDict.

Three kinds of names:
- corpus: `rnnlg.restaurant`, `rnnlg.hotel`, `rnnlg.tv`, `rnnlg.laptop`, `e2e`, read from
  the data root (config key `data.root`);
- synthetic: `synth.<family>.<index>`, generated (any number of them);
- user: any other name declared in the run config's user tasks (`UserTaskSpec`).

Every task has the splits train/validation/test with exactly the columns
`context: str`, `question: str`, `answer: list[str]` (`user_tasks.TASK_FEATURES`).

Key decisions:
- Names are checked before any file is read; an unknown name fails with the
  known names and the closest match (difflib).
- User task names may not shadow corpus names or the `synth.` prefix, so a name
  means the same task in every run, nor hold '/' or '\\': a task's files are in
  one folder named after it (tasks/NNN-<name>), where the report and serving look.
- `max_samples` keeps the first N rows of a split (deterministic; the loaders
  already fix each split's order), for quick runs and tests.
"""

from __future__ import annotations

import dataclasses
import difflib
import os
import re
from collections.abc import Mapping, Sequence
from typing import Any, Literal

from datasets import DatasetDict

from dmea_dist.data.corpora import CORPUS_TASKS, corpus_available, corpus_files
from dmea_dist.data.corpora import load_corpus as _load_corpus
from dmea_dist.data.synthetic import FAMILIES, PREFIX, load_synthetic_task, parse_synthetic_name
from dmea_dist.data.user_tasks import SPLITS, UserTaskSpec, load_user_task
from dmea_dist.errors import DataError

TaskKind = Literal["corpus", "user", "synthetic"]


@dataclasses.dataclass(frozen=True)
class TaskInfo:
    """One entry of `list_tasks`; synthetic families appear once, as synth.<family>.<index>."""

    name: str
    kind: TaskKind
    source: str  # the files read, or "generated"
    description: str
    available: bool  # whether load_task can load it now (files present)


def load_task(
    name: str,
    *,
    data_root: str | os.PathLike | None,
    user_tasks: Mapping[str, UserTaskSpec | Mapping[str, Any]] | None = None,
    synth_seed: int = 0,
    synth_sizes: Sequence[int] = (400, 50, 50),
    max_samples: Mapping[str, int] | None = None,
) -> DatasetDict:
    """Load task `name` as a DatasetDict of train/validation/test.

    data_root: folder of the real corpora (`data.root`); only corpus tasks read it.
    user_tasks: user task name -> spec (a `UserTaskSpec` or its config mapping).
    synth_seed, synth_sizes: seed and (train, validation, test) sizes of synthetic tasks.
    max_samples: split -> keep only the first N rows of that split.
    """
    specs = normalize_user_tasks(user_tasks)
    kind = task_kind(name, user_tasks=specs)
    if kind == "corpus":
        tasks = _load_corpus(name, data_root=data_root)
    elif kind == "user":
        tasks = load_user_task(specs[name], name=name)
    else:
        tasks = load_synthetic_task(name, seed=synth_seed, sizes=tuple(synth_sizes))
    return cap_splits(tasks, max_samples=max_samples, name=name)


def task_kind(name: str, *, user_tasks: Mapping[str, Any] | None = None) -> TaskKind:
    """"corpus", "user" or "synthetic"; an unknown name raises DataError with a suggestion."""
    if not isinstance(name, str):
        raise DataError(f"task names are strings, got {name!r}")
    if name in CORPUS_TASKS:
        return "corpus"
    if user_tasks and name in user_tasks:
        return "user"
    if name.startswith(PREFIX):
        parse_synthetic_name(name)  # raises with the list of families
        return "synthetic"
    known = [*CORPUS_TASKS, *(user_tasks or {})]
    close = difflib.get_close_matches(name, [*known, *(f"{PREFIX}{f}.00" for f in FAMILIES)], n=1)
    hint = f" (did you mean {close[0]!r}?)" if close else ""
    raise DataError(f"unknown task {name!r}{hint}; known tasks: {', '.join(known)}, and "
                    f"synth.<family>.<index> with family in {', '.join(FAMILIES)}; declare "
                    f"other tasks with a data file under data.user_tasks in the config")


def list_tasks(
    *,
    data_root: str | os.PathLike | None,
    user_tasks: Mapping[str, UserTaskSpec | Mapping[str, Any]] | None = None,
) -> list[TaskInfo]:
    """Every known task: corpus tasks, user tasks, then one entry per synthetic family."""
    infos = []
    for name, description in CORPUS_TASKS.items():
        try:
            files = corpus_files(name, data_root=data_root).values()
            source = ", ".join(dict.fromkeys(str(p) for p in files))  # e2e reads devset twice
        except DataError:
            source = "no data root (set data.root)"
        infos.append(TaskInfo(name, "corpus", source, description,
                              corpus_available(name, data_root=data_root)))
    for name, spec in normalize_user_tasks(user_tasks).items():
        files = spec.files()
        split = "split by ratios" if spec.path is not None else "per-split files"
        infos.append(TaskInfo(name, "user", ", ".join(str(p) for p in files.values()),
                              f"user task ({split})", all(p.is_file() for p in files.values())))
    for family in FAMILIES:
        kind = "list operation" if family == "listops" else "data-to-text"
        infos.append(TaskInfo(f"{PREFIX}{family}.<index>", "synthetic", "generated",
                              f"procedural {kind} tasks of the {family} family, any index >= 0",
                              True))
    return infos


def normalize_user_tasks(
    user_tasks: Mapping[str, UserTaskSpec | Mapping[str, Any]] | None,
) -> dict[str, UserTaskSpec]:
    """Validate user task names and turn config mappings into `UserTaskSpec`s."""
    specs: dict[str, UserTaskSpec] = {}
    for name, spec in (user_tasks or {}).items():
        if not isinstance(name, str) or not name.strip() or name != name.strip():
            raise DataError(f"user task name {name!r} must be a non-empty string without "
                            f"surrounding spaces")
        if "/" in name or "\\" in name:  # the task's folder is tasks/NNN-<name>: one folder, found by name
            renamed = re.sub(r"[/\\]+", "-", name)
            raise DataError(f"user task name {name!r} contains a path separator ('/' or '\\'); the run keeps "
                            f"each task in a folder named after it: rename it, e.g. {renamed!r}")
        if name in CORPUS_TASKS or name.startswith(PREFIX):
            raise DataError(f"user task {name!r} shadows a built-in task name; rename it "
                            f"(corpus tasks and the {PREFIX!r} prefix are reserved)")
        if isinstance(spec, UserTaskSpec):
            specs[name] = spec
        elif isinstance(spec, Mapping):
            try:
                specs[name] = UserTaskSpec.from_dict(spec)
            except DataError as e:
                raise DataError(f"user task {name!r}: {str(e).removeprefix('user task: ')}") from e
        else:
            raise DataError(f"user task {name!r}: expected a mapping with path or "
                            f"train/validation/test, got {type(spec).__name__}")
    return specs


def cap_splits(tasks: DatasetDict, *, max_samples: Mapping[str, int] | None,
               name: str) -> DatasetDict:
    """Keep the first N rows of the splits named in `max_samples`."""
    if not max_samples:
        return tasks
    unknown = sorted(set(max_samples) - set(SPLITS))
    if unknown:
        raise DataError(f"max_samples for task {name!r}: unknown split(s) {unknown}; "
                        f"splits are {list(SPLITS)}")
    capped = dict(tasks)
    for split, n in max_samples.items():
        if isinstance(n, bool) or not isinstance(n, int) or n < 1:
            raise DataError(f"max_samples[{split!r}] = {n!r} must be a positive int")
        if n < len(tasks[split]):
            capped[split] = tasks[split].select(range(n))
    return DatasetDict(capped)
