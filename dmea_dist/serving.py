"""Serve any recorded task of any run: from its run directory, its MLflow run, or the registry.

    load_task_model(source, task)   source: a run directory | an MLflow run id (or runs:/ID)
                                    | models:/NAME@ALIAS | models:/NAME/VERSION
    ServedTasks.generate(inputs)    answers; rows of several tasks share one batch

Every source becomes a run folder on disk (an MLflow source is downloaded to
a temporary folder, loaded, and removed): `config.yaml`, the tokenizer (tiny
runs) and backbone (tiny runs; pretrained runs name their checkpoint in the
config), and per task `tasks/NNN-<task>/modules/` (the task's modules + path
manifest; for the full fine-tuning baselines, the whole backbone after that
task). `stage_task` writes the folder of one task alone: what a registered
task model carries (tracking/registry.py).

Every task answers with the weights its own folder recorded, whatever else is
loaded beside it, and with the token rows that existed when it was recorded
(its scope: a later task's rows would compete in its softmax, whatever the
route; `DMEAModel.only_rows_of`). All loaded tasks of a module-based run share one backbone,
their modules in its pools, so a batch of rows of several tasks runs each row
along its own path (`DMEAModel.route_batch`). Where a later task reused a
module and trained it further, its folder holds other weights under the same
module id: that version goes into the pool under an id of its own and the
task's path is renumbered to it (a module's copy, not a backbone's).
The full fine-tuning baselines have a backbone per task; their rows are
answered task by task.

A task folder without `modules/` is a task whose run stopped before recording
it: the error says so, with the stage the run's state file names, and how to
finish it, rather than listing the task among the "recorded" ones. Damaged
module files fail in `modeling/io.py`; a damaged backbone or tokenizer folder
fails here, naming the folder.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import tempfile
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from dmea_dist.config import RunConfig, load_config
from dmea_dist.data.formatting import Formatter
from dmea_dist.data.lengths import prompt_length
from dmea_dist.data.tokenizer import load_pretrained_tokenizer, load_tokenizer
from dmea_dist.errors import DmeaError
from dmea_dist.method.policy import method_policy
from dmea_dist.state import task_folder_order
from dmea_dist.typed_yaml import parse_yaml

# torch and the model are imported where a model is loaded or answers: the driver stages every recorded
# task's files (`stage_task`) without them, between two stages of the run
if TYPE_CHECKING:
    from dmea_dist.modeling.io import PathModules
    from dmea_dist.modeling.model import DMEAModel

# state files that name where a run stopped: the run state, or the lifecycle file of older runs
STATE_FILES = ("state.json", "lifecycle.json")
RUN_ID = re.compile(r"(?:runs:/)?([0-9a-f]{32})/?")


@dataclass
class ServedTasks:
    """Recorded tasks of one run, loaded to answer inputs (`generate`)."""

    config: RunConfig
    formatter: Formatter
    models: dict[str, DMEAModel]  # task -> model (one shared model unless full fine-tuning)
    paths: dict[str, list[int] | None]  # task -> its path (None: full fine-tuning)
    task: str | None  # the task of inputs that name none
    scopes: dict[str, tuple[str, ...] | None] = field(default_factory=dict)  # task -> whose token rows it sees

    @property
    def tasks(self) -> list[str]:
        return list(self.models)

    def generate(self, inputs: Sequence[str | dict[str, Any]], *, task: str | None = None,
                 decoding: str = "greedy", max_new_tokens: int = 64, top_k: int | None = None,
                 batch_size: int | None = None, seed: int = 0) -> list[str]:
        """One answer per input: a context string, or {context, question?, task?}; `task` for those without."""
        from dmea_dist.method.generation import generate_answers

        rows = self.rows(inputs, task=task)
        answers: list[str | None] = [None] * len(rows)
        groups: dict[int, list[int]] = {}  # one group per model object: rows of tasks sharing a backbone
        for i, row in enumerate(rows):
            groups.setdefault(id(self.models[row["task"]]), []).append(i)
        for members in groups.values():
            model = self.models[rows[members[0]]["task"]]
            out = generate_answers(model, self.formatter, [rows[i] for i in members],
                                   paths=[self.paths[rows[i]["task"]] for i in members],
                                   scopes=[self.scopes.get(rows[i]["task"]) for i in members], decoding=decoding,
                                   max_new_tokens=max_new_tokens, top_k=top_k or self.config.eval.top_k,
                                   batch_size=batch_size or self.config.eval.batch_size, seed=seed)
            for i, answer in zip(members, out, strict=True):
                answers[i] = answer
        return answers

    def rows(self, inputs: Sequence[str | dict[str, Any]], *, task: str | None = None) -> list[dict[str, str]]:
        """Inputs as checked rows {context, question, task}; errors name the input and the fix."""
        default = task or self.task
        rows = []
        for i, item in enumerate(inputs):
            row = {"context": item} if isinstance(item, str) else dict(item)
            row_task = row.get("task") or default
            if not isinstance(row.get("context"), str) or not row["context"]:
                raise DmeaError(f"input {i + 1} has no context (a non-empty string); got {item!r}")
            if row_task is None:
                raise DmeaError(f"input {i + 1} names no task; give one (--task, or a `task` column) from "
                                f"{self.tasks}")
            if row_task not in self.models:
                raise DmeaError(f"input {i + 1}: task {row_task!r} is not loaded; loaded: {self.tasks}")
            question = row.get("question")
            rows.append({"context": row["context"], "question": question if isinstance(question, str) else "",
                         "task": row_task})
            tokens = prompt_length(self.formatter, rows[-1]["context"], rows[-1]["question"])
            if tokens > self.formatter.max_length:  # a longer prompt would be cut: another input answered
                raise DmeaError(f"input {i + 1} is {tokens} tokens with the answer separator, longer than this "
                                f"run's model.max_length={self.formatter.max_length}; shorten it")
        return rows


def load_task_model(source: str | Path, task: str | None = None, *, tasks: Sequence[str] | None = None,
                    tracking_uri: str | None = None, latest: bool = False) -> ServedTasks:
    """Load recorded tasks to answer with, in one call.

    `source`: a run directory, an MLflow run id (sequence or task run; also
    `runs:/ID`), or a registered task model `models:/NAME@ALIAS` /
    `models:/NAME/VERSION`. `task`: the default task of inputs (implied by a
    task run id or a models:/ URI). `tasks`: more tasks to load beside it (for
    models:/, found by their aliases in the same registered model). Loaded:
    `task` and `tasks`; with neither given nor implied, every recorded task
    of the run. `tracking_uri`: the MLflow
    store of a run id or models:/ URI (default $MLFLOW_TRACKING_URI, else
    sqlite:///mlflow.db). Each task answers with the weights its folder
    recorded, as it does alone; `latest`: a module several loaded tasks share
    has the weights the latest of them recorded (the run's model after the
    last loaded task, as its later stages used it).
    """
    uri = tracking_uri or os.environ.get("MLFLOW_TRACKING_URI") or "sqlite:///mlflow.db"
    wanted = list(dict.fromkeys([*([task] if task else []), *(tasks or [])])) or None
    with _run_folder(str(source), wanted, uri) as (folder, implied):
        default = task or implied
        # the task the source implies (models:/NAME@ALIAS, a task run id) is loaded beside the tasks a file names
        load = list(dict.fromkeys([*([default] if default else []), *(wanted or [])])) or None
        return _load_folder(folder, load, default, latest)


@contextlib.contextmanager
def _run_folder(source: str, wanted: list[str] | None, uri: str) -> Iterator[tuple[Path, str | None]]:
    """(a local run folder, the task the source implies); MLflow sources are downloaded, then removed."""
    if Path(source).is_dir():
        yield Path(source), None
        return
    from dmea_dist import tracking

    with tempfile.TemporaryDirectory(prefix="dmea-serve-") as tmp:
        if source.startswith("models:/"):
            yield _registered_folder(source, wanted, uri, Path(tmp))
        elif RUN_ID.fullmatch(source):
            run_id = RUN_ID.fullmatch(source).group(1)
            folder, implied = tracking.download_run(uri=uri, run_id=run_id, dst=Path(tmp) / "run")
            _check_downloaded(folder, wanted, f"MLflow run {run_id}")
            yield folder, implied
        elif Path(source).exists():
            raise DmeaError(f"{source} is not a run directory (no config.yaml); pass the folder `dmea run` printed")
        else:
            raise DmeaError(f"{source} does not exist; pass the run directory `dmea run` printed, an MLflow run "
                            f"id, or models:/NAME@ALIAS")


def _check_downloaded(folder: Path, wanted: list[str] | None, what: str) -> None:
    """Each `wanted` task has modules in `folder`, a run rebuilt from MLflow from its FINISHED task runs; else an
    error about the MLflow run, not about the temporary folder (which the user never saw)."""
    recorded = recorded_tasks(folder)
    for task_id in wanted or []:
        if task_id in recorded:
            continue
        config = parse_yaml((folder / "config.yaml").read_text()) or {}
        if task_id in ((config.get("data") or {}).get("tasks") or []):
            raise DmeaError(f"{what} has no finished record of task {task_id!r} (recorded: {recorded}): its record "
                            f"failed, or the run has not finished the task yet; `dmea resume RUN_DIR` records it "
                            f"again, and `dmea generate RUN_DIR {task_id} ...` serves it from the run directory")
        raise DmeaError(f"{what} has no task {task_id!r}; recorded tasks: {recorded}")


def _registered_folder(model_uri: str, wanted: list[str] | None, uri: str, tmp: Path) -> tuple[Path, str]:
    """The task of `model_uri`, plus the other `wanted` tasks by their aliases, merged in one run folder."""
    from dmea_dist import tracking
    from dmea_dist.tracking.readers import parse_model_uri

    folder, task = tracking.download_registered_model(uri=uri, model_uri=model_uri, dst=tmp / "0")
    name = parse_model_uri(model_uri)[0]
    for k, other in enumerate(t for t in (wanted or []) if t != task):
        extra, _ = tracking.download_registered_model(uri=uri, model_uri=f"models:/{name}@{other}",
                                                      dst=tmp / str(k + 1))
        for modules in extra.glob("tasks/*/modules"):  # same run, same backbone: only the modules differ
            shutil.copytree(modules, folder / "tasks" / modules.parent.name / "modules", dirs_exist_ok=True)
    return folder, task


def _load_folder(run_dir: Path, wanted: list[str] | None, default: str | None, latest: bool = False) -> ServedTasks:
    """Every wanted task (default: every recorded one) of the run folder, on one shared backbone if it can."""
    from dmea_dist.modeling.io import read_path_modules

    if not (run_dir / "config.yaml").is_file():
        raise DmeaError(f"{run_dir} is not a run directory (no config.yaml); pass the folder `dmea run` printed")
    config = load_config(run_dir / "config.yaml")  # a damaged file fails as a ConfigError naming it
    recorded = recorded_tasks(run_dir)
    # in task order, whatever order they were asked in (unrecorded ones fail in task_dir): with `latest` a later
    # task's folder holds the newer weights of a module it shares with an earlier one, so it must come last
    task_ids = sorted(wanted, key=lambda t: recorded.index(t) if t in recorded else -1) if wanted else recorded
    if not task_ids:
        raise DmeaError(f"{run_dir} has no recorded task yet: {stopped_at(run_dir)}")
    if config.model.pretrained:
        tokenizer = load_pretrained_tokenizer(config.model.pretrained, max_tasks=config.model.max_tasks)
    else:
        tokenizer = _tokenizer(run_dir / "tokenizer")
    models: dict[str, DMEAModel] = {}
    paths: dict[str, list[int] | None] = {}
    scopes: dict[str, tuple[str, ...] | None] = {}
    shared, pools = None, None
    for task_id in task_ids:
        modules = task_dir(run_dir, task_id)
        if (modules / "config.json").is_file():  # a saved backbone (full fine-tuning), not adapters
            models[task_id], paths[task_id] = _backbone(modules, tokenizer, config).eval(), None
            continue
        if shared is None:
            source = config.model.pretrained or run_dir / "backbone"
            shared = _backbone(source, tokenizer, config).eval()
            pools = _Pools(shared, latest=latest)
        recorded = read_path_modules(shared, modules)
        pools.put(recorded)
        models[task_id], paths[task_id] = shared, shared.path_of(task_id)
        # the rows its folder holds are those of the tasks up to it (every task's rows at the time it was
        # recorded); multitask claims every task's rows in its one training, at the last task
        scopes[task_id] = None if method_policy(config.method.name).joint else tuple(recorded.rows)
    return ServedTasks(config=config, formatter=Formatter(tokenizer, max_length=config.model.max_length),
                       models=models, paths=paths, task=default if default in models else None, scopes=scopes)


class _Pools:
    """What the loaded tasks' folders put into one shared model: each module version once, under its recorded
    id where that is free, else under a fresh one, and each task's path renumbered to the versions it recorded.
    `latest`: a folder's module overwrites the one under its id (the run's model after the last folder)."""

    def __init__(self, model: DMEAModel, *, latest: bool):
        self.model, self.latest = model, latest
        self.placed: dict[tuple[int, int, str], int] = {}  # (layer, recorded id, weights digest) -> id in the pool

    def put(self, recorded: PathModules) -> None:
        renumber: list[dict[int, int]] = []
        for layer, pool in enumerate(recorded.modules):
            renumber.append({})
            for module_id, state in pool.items():
                key = (layer, module_id, _digest(state))
                if key not in self.placed:
                    taken = str(module_id) in self.model.pools[layer] and not self.latest
                    self.placed[key] = self.model.next_ids[layer] if taken else module_id
                    self.model.put_module(layer, self.placed[key], state)
                renumber[layer][module_id] = self.placed[key]
        for owner, table in recorded.rows.items():  # a token's row is its first task's, frozen after (token_rows)
            if self.latest or owner not in self.model.token_rows.owners:
                self.model.put_token_rows(owner, table["ids"], table["weight"])
        self.model.set_path(recorded.task_id, [renumber[layer].get(module_id, module_id)
                                               for layer, module_id in enumerate(recorded.path)])


def _digest(state: dict) -> str:
    import hashlib

    import torch

    h = hashlib.sha256()
    for name in sorted(state):
        tensor = state[name].detach().cpu().contiguous()
        h.update(name.encode())
        h.update(f"{tensor.dtype}{tuple(tensor.shape)}".encode())
        h.update(tensor.reshape(-1).view(torch.uint8).numpy().tobytes())  # any dtype's bytes (bf16 has no numpy)
    return h.hexdigest()


def read_inputs(file: str | Path) -> list[dict[str, str]]:
    """Rows {context, question?, task?} of a JSONL file (objects, or strings = contexts) or a CSV file with a
    header naming `context` (and optionally `question`, `task`); errors name the file and line."""
    import csv
    import io

    file = Path(file)
    try:
        text = file.read_text(encoding="utf-8-sig")  # -sig: a leading BOM (Excel's "CSV UTF-8") is dropped
    except (OSError, UnicodeDecodeError) as err:
        raise DmeaError(f"{file}: cannot read the inputs ({err})") from None
    if file.suffix.lower() == ".csv":
        # the csv module reads the lines itself: a quoted cell may span lines or hold U+2028 (str.splitlines)
        reader = csv.DictReader(io.StringIO(text, newline=""))
        if "context" not in (reader.fieldnames or []):
            raise DmeaError(f"{file}: a CSV of inputs needs a header with a `context` column (and optionally "
                            f"`question`, `task`); its header is {reader.fieldnames}")
        return [{k: v for k, v in row.items() if k in ("context", "question", "task") and v}
                for row in reader]
    rows = []
    # split on "\n" only (as data/user_tasks.py): str.splitlines also splits at U+2028 inside JSON strings
    for number, line in enumerate(text.split("\n"), start=1):
        if not line.strip():
            continue
        try:
            item = json.loads(line)
        except json.JSONDecodeError as err:
            raise DmeaError(f"{file}, line {number}: not JSON ({err.msg}); one JSON object per line, e.g. "
                            f'{{"context": "...", "task": "..."}}') from None
        if isinstance(item, str):
            item = {"context": item}
        if not isinstance(item, dict) or not isinstance(item.get("context"), str):
            raise DmeaError(f"{file}, line {number}: needs a `context` string, got {line[:120]!r}")
        rows.append(item)
    return rows


def recorded_tasks(run_dir: Path) -> list[str]:
    """The tasks of a run folder that have modules, in task order."""
    modules = sorted(run_dir.glob("tasks/*-*/modules"), key=lambda p: task_folder_order(p.parent.name))
    return [p.parent.name.split("-", 1)[1] for p in modules]


def task_dir(run_dir: Path, task_id: str) -> Path:
    """`tasks/NNN-<task>/modules` of a recorded task, or an error saying what became of the task."""
    # the folder's name after `NNN-` is the task id: a glob `*-{task_id}` would also match task `news-qa` for `qa`
    folders = [p for p in sorted(run_dir.glob("tasks/*-*"), key=lambda p: task_folder_order(p.name))
               if p.name.split("-", 1)[1] == task_id]
    found = [p / "modules" for p in folders if (p / "modules").is_dir()]
    if found:
        return found[0]
    recorded = sorted(recorded_tasks(run_dir))
    if folders:
        raise DmeaError(f"task {task_id!r} of {run_dir} was not finished: {stopped_at(run_dir)}, before "
                        f"recording it; finish the run with `dmea resume {run_dir}` (or start it again with "
                        f"`dmea run {run_dir / 'config.yaml'}`); recorded tasks: {recorded}")
    raise DmeaError(f"{run_dir} has no task {task_id!r}; recorded tasks: {recorded}")


def stopped_at(run_dir: Path) -> str:
    """Where the run stopped, as its state file says ("the run stopped" when no file says)."""
    for name in STATE_FILES:
        try:
            state = json.loads((run_dir / name).read_text())
            tasks = [t["task_id"] if isinstance(t, dict) else t for t in state["tasks"]]
            where = f"at the {state['stage']} stage of task {state['task_index'] + 1}/{len(tasks)} " \
                    f"({tasks[state['task_index']]})"
        except (OSError, ValueError, KeyError, IndexError, TypeError):
            continue
        status = state.get("status")  # running: the driver died without a word
        said = f" ({str(state['message'])[:200]})" if state.get("message") else ""
        return f"its run {status if status in ('stopped', 'failed') else 'stopped'} {where}{said}"
    return "its run stopped"


def stage_task(run_dir: str | Path, task_id: str, dst: str | Path) -> Path:
    """Copy what serves `task_id` alone into `dst` (a run folder of one task); returns `dst`.

    config.yaml, tokenizer/ and backbone/ when the run has them (a pretrained
    backbone is named in the config, not copied), and tasks/NNN-<task>/modules.
    """
    run_dir, dst = Path(run_dir), Path(dst)
    modules = task_dir(run_dir, task_id)
    dst.mkdir(parents=True, exist_ok=True)
    shutil.copy2(run_dir / "config.yaml", dst / "config.yaml")
    config = load_config(run_dir / "config.yaml")
    for name in ("tokenizer", "backbone"):
        if (run_dir / name).is_dir() and not (name == "backbone" and config.model.pretrained):
            shutil.copytree(run_dir / name, dst / name, dirs_exist_ok=True)
    shutil.copytree(modules, dst / "tasks" / modules.parent.name / "modules", dirs_exist_ok=True)
    return dst


def _backbone(source, tokenizer, config: RunConfig) -> DMEAModel:
    """DMEAModel.from_pretrained, with a damaged or missing local checkpoint named instead of a traceback."""
    from dmea_dist.modeling.model import DMEAModel

    try:
        return DMEAModel.from_pretrained(str(source), vocab_size=len(tokenizer), bottleneck=config.model.bottleneck)
    except (OSError, ValueError, RuntimeError) as err:  # transformers and safetensors raise these
        if not Path(source).is_dir():
            raise  # a hub name: not a file of this run
        raise DmeaError(f"{source}: the backbone checkpoint cannot be loaded ({type(err).__name__}: "
                        f"{str(err)[:200]}); restore the folder from the run's MLflow artifacts or a backup, "
                        f"or run the sequence again") from None


def _tokenizer(directory: Path):
    if not directory.is_dir():
        raise DmeaError(f"{directory}: not found; the run stopped before saving its tokenizer, or the folder "
                        f"was removed: restore it or run the sequence again")
    return load_tokenizer(directory)
