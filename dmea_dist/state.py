"""The run's state: everything a later stage, a resumed run or a reader needs, on disk.

A lifelong run lasts hours to days and something will die during it, so the
run's data lives here, not in the memory of whatever steps the stages (the
Ray Train v2 controller's typed states are the model: each state carries its
data). `RunState` is small and JSON: the lifecycle position and history, the
R matrix, similarities, selections, paths, MLflow run ids, and the names of
the files that hold everything large. Those files are written by the stage
that makes them, before the state that names them:

    run_dir/state.json                       this state (atomic and durable: dmea_dist.files)
    run_dir/state/modules-<k>.safetensors    the module pools after the latest stage that changed them
    run_dir/state/backbone-<k>/              the backbone after full fine-tuning (lamol, finetune)
    run_dir/tasks/NNN-<task>/record.json     the task's record (params, metrics, series, artifacts)
    run_dir/tasks/NNN-<task>/token_counts.json, basis.safetensors, pseudo_samples/*.parquet, modules/

Every write is atomic, so a run killed at any instant leaves the last
completed stage boundary readable: `dmea resume` continues from there and
nothing completed is lost or redone. Nothing here is pickled.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from dmea_dist.errors import DmeaError
from dmea_dist.files import write_text
from dmea_dist.method.lifecycle import ORDER, Stage, next_state

STATE_FILE = "state.json"
FORMAT = "dmea-run-state"
VERSION = 1


class StateError(DmeaError):
    """A run directory whose state is missing, unreadable or of another run."""


@dataclass
class TaskState:
    """What the run knows about one task; file names are relative to the run directory."""

    task_id: str
    index: int
    path: list[int] | None = None  # its modules, one id per layer (None: full fine-tuning)
    new_modules: int | None = None
    selected: list[str] = field(default_factory=list)
    # the selected tasks whose pseudo samples its path trains on (None, in states from before transfer
    # could be gated: every selected task that has pseudo samples)
    transfer: list[str] | None = None
    token_counts: str | None = None  # token_counts.json: expansion's similarity of later tasks
    basis: str | None = None  # basis.safetensors: its input subspace per layer (selection)
    pseudo: dict[str, str] = field(default_factory=dict)  # earlier task -> parquet of its pseudo samples
    record: str | None = None  # record.json: what MLflow gets
    modules: str | None = None  # the task's path manifest + modules, servable alone
    mlflow_run_id: str | None = None  # its nested run, once recorded


@dataclass
class RunState:
    """One run's state (module docstring). `R[j][i]`: score on task i after task j (None: not evaluated)."""

    tasks: list[TaskState]
    task_index: int = 0
    stage: Stage = Stage.EXPAND
    status: str = "running"  # running | stopped | failed | finished
    message: str = ""  # why it stopped or failed
    history: list[dict[str, Any]] = field(default_factory=list)  # one entry per finished stage
    R: list[list[float | None]] = field(default_factory=list)
    similarity: list[list[float | None]] = field(default_factory=list)  # [new][earlier] subspace similarity
    baseline: list[float | None] = field(default_factory=list)  # untrained scores (forward transfer)
    modules: str | None = None  # the module pools after the latest stage that changed them
    backbone: str | None = None  # the fine-tuned backbone (full fine-tuning), else the run's own
    mlflow_parent_run_id: str | None = None
    stage_count: int = 0  # stages finished; names snapshot files uniquely
    # every earlier task generated, replayed and scored in its token-row scope (RunContext.scope); False in
    # states written before scopes existed, whose R rows scored earlier tasks with every task's rows
    token_row_scopes: bool = False

    @classmethod
    def new(cls, task_ids: list[str]) -> RunState:
        if not task_ids:
            raise ValueError("the task sequence is empty")
        n = len(task_ids)
        return cls(tasks=[TaskState(t, i) for i, t in enumerate(task_ids)], R=_nans(n, n),
                   similarity=_nans(n, n), baseline=[None] * n, token_row_scopes=True)

    # ------------------------------------------------------------- position

    @property
    def task_ids(self) -> list[str]:
        return [t.task_id for t in self.tasks]

    @property
    def done(self) -> bool:
        return self.stage is Stage.DONE

    def task(self, task_id: str) -> TaskState:
        for t in self.tasks:
            if t.task_id == task_id:
                return t
        raise KeyError(f"task {task_id!r} is not in this run; its tasks: {self.task_ids}")

    def advance(self, summary: dict[str, Any], *, seconds: float) -> None:
        """Record the finished current stage and move to the next state."""
        self.history.append({"task": self.tasks[self.task_index].task_id, "task_index": self.task_index,
                             "stage": self.stage.value, "seconds": seconds, **(summary or {})})
        self.task_index, self.stage = next_state(self.task_index, self.stage, len(self.tasks))
        self.stage_count += 1
        if self.done:
            self.status, self.message = "finished", ""

    def completed(self, task_index: int, stage: Stage) -> bool:
        """Has `stage` of task `task_index` finished?"""
        if self.done:
            return True
        return (task_index, ORDER.index(stage)) < (self.task_index, ORDER.index(self.stage))

    # ---------------------------------------------------------------- JSON

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["stage"] = self.stage.value
        return {"format": FORMAT, "version": VERSION, **_finite(out)}

    @classmethod
    def from_dict(cls, data: dict[str, Any], *, source: str = "state") -> RunState:
        if not isinstance(data, dict):  # valid JSON, but null, a list or a number: no .get below
            raise StateError(f"{source}: not a run state (a JSON {type(data).__name__}, not an object); the run's "
                             f"files were changed or damaged outside dmea: start the run again")
        if data.get("format") != FORMAT or data.get("version") != VERSION:
            raise StateError(f"{source}: not a {FORMAT} version {VERSION} file "
                             f"(format {data.get('format')!r}, version {data.get('version')!r})")
        body = {k: v for k, v in data.items() if k not in ("format", "version")}
        try:
            body["tasks"] = [TaskState(**t) for t in body["tasks"]]
            body["stage"] = Stage(body["stage"])
            return cls(**body)
        except (KeyError, TypeError, ValueError) as err:  # a damaged file, or one a newer checkout wrote
            raise StateError(f"{source}: not a run state this dmea-dist can read ({type(err).__name__}: {err}); "
                             f"written by another version, or damaged: resume it with the version that wrote "
                             f"it, or start the run again") from None


def save_state(state: RunState, run_dir: str | Path) -> Path:
    """Write `run_dir/state.json` atomically; returns its path."""
    path = Path(run_dir) / STATE_FILE
    write_json(path, state.to_dict())
    return path


def load_state(run_dir: str | Path) -> RunState:
    """The state of the run in `run_dir`, or a StateError saying what is wrong and what to do."""
    path = Path(run_dir) / STATE_FILE
    if not path.is_file():
        hint = " (it has a config.yaml: the run died before its first stage finished; start it again)" \
            if (Path(run_dir) / "config.yaml").is_file() else ""
        raise StateError(f"{run_dir} is not a resumable run directory: no {STATE_FILE}{hint}; "
                         f"pass the directory `dmea run` printed")
    try:
        data = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise StateError(f"{path}: unreadable ({err}); the run's files were changed or damaged outside dmea") from None
    return RunState.from_dict(data, source=str(path))


# ------------------------------------------------------------------ atomic files


def write_json(path: str | Path, data: Any) -> Path:
    """Write `data` as JSON atomically and durably (`dmea_dist.files`)."""
    return write_text(path, json.dumps(_finite(data), indent=1, default=_plain) + "\n")


def task_folder(index: int, task_id: str) -> str:
    """The name of a task's folder under `run_dir/tasks/` (its record, modules, checkpoints): `NNN-<task>`."""
    return f"{index:03d}-{task_id}"


def task_folder_order(folder: str) -> tuple[int, str]:
    """Sort key of a `tasks/NNN-<task>` folder name: by task index, as strings 1000-x would come before 101-x."""
    index = folder.split("-", 1)[0]
    return (int(index) if index.isdigit() else -1, folder)


def read_json(path: str | Path) -> Any:
    return json.loads(Path(path).read_text())


def _nans(rows: int, cols: int) -> list[list[float | None]]:
    return [[None] * cols for _ in range(rows)]


def _finite(value: Any) -> Any:
    """JSON has no NaN: not-a-number and infinities become null."""
    if isinstance(value, dict):
        return {str(k): _finite(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_finite(v) for v in value]
    value = _plain(value) if not isinstance(value, str | int | float | bool | type(None)) else value
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def _plain(value: Any) -> Any:
    """numpy scalars and arrays, Paths, enums as plain JSON values."""
    if hasattr(value, "tolist"):
        return value.tolist()
    if isinstance(value, Path):
        return str(value)
    if hasattr(value, "value") and isinstance(value.value, str):
        return value.value
    raise TypeError(f"{type(value).__name__} is not JSON-serialisable state: {value!r}")
