"""What a report shows, read from a run directory alone, and the figure data derived from it (pure).

`load_run(run_dir)` reads `config.yaml`, `state.json`, `tasks/*/record.json`,
`R.npy` / `metrics.json` and the modules' manifests into a `RunData`, so a
report can be written for any run, finished or stopped, old or new, without
MLflow. Everything after loading is a pure function of `RunData` (tested
without files): the path grid, parameters added, eta and loss series, pseudo
samples, seconds per stage, the similarity matrices and the synthetic
tasks' ground truth.

Key decisions:
- A missing piece is None/empty, never an error: a run stopped after two of
  five tasks still gets a report of what it did.
- The R matrix comes from the state (finished or not); `R.npy` only when
  there is no state (a run written before state.json existed).
- Metrics: `metrics.json` when the run finished; otherwise computed here
  from R where it has what they need.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import yaml

from dmea_dist.errors import DmeaError
from dmea_dist.state import task_folder_order

STAGES = ("expand", "select", "generate", "adapt", "evaluate", "record")
NEW, REUSED = "new", "reused"


@dataclass
class RunData:
    """One run, as its directory holds it. Matrices are (T, T) float arrays with NaN where not measured."""

    name: str  # the run folder's name
    method: str
    config_name: str
    tasks: list[str]
    R: np.ndarray
    metrics: dict[str, float]
    metric_name: str = "rouge"
    status: str = "finished"
    similarity: np.ndarray | None = None  # [new][earlier] subspace similarity (selection)
    token_similarity: np.ndarray | None = None  # [new][earlier] token-distribution cosine (expansion init)
    paths: dict[str, list[int]] = field(default_factory=dict)
    selected: dict[str, list[str]] = field(default_factory=dict)
    records: dict[str, dict[str, Any]] = field(default_factory=dict)  # task -> record.json
    history: list[dict[str, Any]] = field(default_factory=list)
    module_params: int | None = None  # parameters of one module (two adapters)
    eta_clamp: tuple[float, float] | None = None
    unreadable: list[str] = field(default_factory=list)  # run files there but damaged: what the report lacks


def load_run(run_dir: str | Path) -> RunData:
    """Read a run directory; a DmeaError names what is missing when it is no run directory at all."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise DmeaError(f"{run_dir} is not a run directory ({'a file' if run_dir.exists() else 'no such folder'}); "
                        f"pass the folder `dmea run` printed")
    config = _read_yaml(run_dir / "config.yaml")
    # state.json; runs written before it existed have lifecycle.json (position and history) and the records
    unreadable: list[str] = []
    state = _read_json(run_dir / "state.json", unreadable) or _read_json(run_dir / "lifecycle.json", unreadable) or {}
    if not config and not state:
        damaged = "".join(f"; could not read {file.name}: {why}" for file, why in unreadable)
        raise DmeaError(f"{run_dir} is not a run directory (no config.yaml, no state.json{damaged}); pass the "
                        f"folder `dmea run` printed")
    tasks = [t["task_id"] if isinstance(t, dict) else str(t) for t in state.get("tasks", [])] or \
        list(config.get("data", {}).get("tasks", []))
    records = {}
    for file in sorted(run_dir.glob("tasks/*-*/record.json"), key=lambda p: task_folder_order(p.parent.name)):
        rec = _read_json(file, unreadable)
        if rec and rec.get("task_id") in tasks:
            records[rec["task_id"]] = rec
    task_states = {t["task_id"]: t for t in state.get("tasks", []) if isinstance(t, dict)}
    R = _matrix(state.get("R"), len(tasks))
    if np.isnan(R).all() and (run_dir / "R.npy").is_file():
        R = np.load(run_dir / "R.npy")
    method = config.get("method", {})
    return RunData(
        name=run_dir.resolve().name, method=str(method.get("name", "?")), config_name=str(config.get("name", "?")),
        tasks=tasks, R=R, metrics=_read_json(run_dir / "metrics.json", unreadable) or sequence_metrics(
            R, every=_every(config), baseline=_baseline(state.get("baseline"), len(tasks))),
        metric_name=str(config.get("eval", {}).get("metric", "rouge")),
        status=_status(run_dir, state),
        similarity=_matrix(state["similarity"], len(tasks)) if state.get("similarity") else
        _record_matrix(tasks, records, "subspace_similarity"),
        token_similarity=_record_matrix(tasks, records, "token_similarity"),
        paths={t: list(p) for t in tasks if isinstance(p := _task_value(t, task_states, records, "path"), list)},
        selected={t: list(_task_value(t, task_states, records, "selected") or []) for t in tasks},
        records=records, history=list(state.get("history") or []), module_params=_module_params(run_dir),
        eta_clamp=tuple(method.get("adaptation", {}).get("eta_clamp", ())) or None,
        unreadable=[f"{file.relative_to(run_dir)} ({why})" for file, why in unreadable])


def _baseline(values, n_tasks: int) -> list | None:
    """state.json's untrained scores (FWT's baseline), one per task, or None where the run has none."""
    if not isinstance(values, list) or len(values) != n_tasks:
        return None
    return [v if isinstance(v, int | float) else None for v in values]


def _every(config: dict) -> int:
    try:
        return max(1, int((config.get("eval") or {}).get("every", 1)))
    except (TypeError, ValueError):  # a hand-edited config.yaml: the strict reading
        return 1


def _task_value(task: str, task_states: dict[str, dict], records: dict[str, dict], key: str):
    """A task's `key` from the state, else from its record's params (older runs)."""
    if task_states.get(task, {}).get(key) is not None:
        return task_states[task][key]
    return records.get(task, {}).get("params", {}).get(key)


def full_rows(R: np.ndarray) -> np.ndarray:
    """(T,) bool: whether row j scored every task seen by then (R[j][0..j] measured). eval.every > 1 scores only
    the task just trained in the rows between (older runs: nothing), and a stopped run has none past its stop."""
    return np.array([not np.isnan(R[j, : j + 1]).any() for j in range(R.shape[0])], dtype=bool)


def last_evaluated(R: np.ndarray) -> int | None:
    """The last task j after which every seen task was scored, None before any: the row a stopped run's
    metrics and latest scores are read from. The last task for a finished run; eval.every > 1 scores only the
    new task in the rows between, so it is the last full row, not the count of them."""
    evaluated = np.flatnonzero(full_rows(R))
    return int(evaluated[-1]) if evaluated.size else None


def sequence_metrics(R: np.ndarray, *, every: int = 1, baseline=None) -> dict[str, float]:
    """A_T, BWT, forgetting and (with the untrained `baseline` of an `eval.all_tasks` run) FWT where R has
    what they need; a stopped run's over the tasks done, up to its last full row. `every`: the run's
    eval.every."""
    from dmea_dist.evaluation import continual

    last = last_evaluated(R)
    if last is None:
        return {}
    if baseline is not None:
        baseline = np.array([np.nan if b is None else b for b in baseline], dtype=np.float64)[: last + 1]
    # strict=False: a folder no run of this code leaves (a hand-edited state.json) still gets what it has
    return continual.measured(R[: last + 1, : last + 1], baseline=baseline, every=every, strict=False)


# ------------------------------------------------------------------- figure data (pure)


def path_grid(paths: dict[str, list[int]], tasks: list[str]) -> list[list[tuple[int, str, int]]]:
    """Per task (in sequence order), per layer: (module id, NEW | REUSED, index of the task that added it).

    A module is new for the first task whose path uses it in that layer;
    every later task using it reuses it. Tasks without a path are skipped.
    """
    first_user: dict[tuple[int, int], int] = {}
    grid = []
    for index, task in enumerate(tasks):
        if task not in paths:
            continue
        row = []
        for layer, module in enumerate(paths[task]):
            owner = first_user.setdefault((layer, module), index)
            row.append((module, NEW if owner == index else REUSED, owner))
        grid.append(row)
    return grid


def params_added(paths: dict[str, list[int]], tasks: list[str], module_params: int | None) -> dict[str, int | None]:
    """Parameters each task added: its new modules times one module's size (None when the size is unknown)."""
    grid = path_grid(paths, tasks)
    with_path = [t for t in tasks if t in paths]
    return {task: (sum(kind == NEW for _, kind, _ in row) * module_params if module_params else None)
            for task, row in zip(with_path, grid, strict=True)}


def series(records: dict[str, dict[str, Any]], prefix: str) -> dict[str, dict[str, list[float]]]:
    """{task: {stream: values}} of the record series named `<prefix>.<stream>` (eta, loss)."""
    out = {}
    for task, rec in records.items():
        found = {k.removeprefix(f"{prefix}."): [float(v) for v in vals] for k, vals in rec.get("series", {}).items()
                 if k.startswith(f"{prefix}.") and vals}
        if found:
            out[task] = found
    return out


def pseudo_samples(records: dict[str, dict[str, Any]], tasks: list[str]) -> list[dict[str, Any]]:
    """One row per (new task, earlier task) pseudo-sample batch: yield, fidelity, kept, requested, why."""
    rows = []
    for task in tasks:
        rec = records.get(task, {})
        metrics, params = rec.get("metrics", {}), rec.get("params", {})
        for key, value in metrics.items():
            if not key.startswith("pseudo.yield."):
                continue
            old = key.removeprefix("pseudo.yield.")
            roles = [r for r, names in (("transfer", params.get("transfer", [])), ("replay", params.get("replay", [])))
                     if old in (names or [])]
            rows.append({"task": task, "of": old, "yield": float(value),
                         "fidelity": _finite(metrics.get(f"pseudo.fidelity.{old}")),
                         "real_fidelity": _finite(metrics.get(f"pseudo.real_fidelity.{old}")),
                         "kept": _finite(metrics.get(f"pseudo.kept.{old}")),
                         "requested": _finite(metrics.get(f"pseudo.requested.{old}")), "role": "+".join(roles)})
    return rows


def stage_seconds(history: list[dict[str, Any]], tasks: list[str]) -> dict[str, dict[str, float]]:
    """{task: {stage: seconds}} summed over the state's history (a resumed stage counts once per finish)."""
    out = {task: dict.fromkeys(STAGES, 0.0) for task in tasks}
    for entry in history:
        task, stage = entry.get("task"), entry.get("stage")
        if task in out and stage in out[task]:
            out[task][stage] += float(entry.get("seconds") or 0.0)
    return out


def peak_memory(history: list[dict[str, Any]], tasks: list[str]) -> dict[str, tuple[float, str]]:
    """{task: (MiB, process)}: the largest high-water resident memory of any of the run's processes by the end of
    the task, and which process that was ("coordinator", or on Ray the largest worker's role: "training",
    "replicas", "generation", "search"). Tasks whose history holds no memory figure are left out."""
    out: dict[str, tuple[float, str]] = {}
    for entry in history:
        task = entry.get("task")
        if task not in tasks:
            continue
        figures = {"coordinator": entry.get("peak_rss_mib"), **(entry.get("worker_peak_rss_mib") or {})}
        for process, mib in figures.items():
            if isinstance(mib, (int, float)) and mib > out.get(task, (0.0, ""))[0]:
                out[task] = (float(mib), process)
    return out


def _record_matrix(tasks: list[str], records: dict[str, dict[str, Any]], param: str) -> np.ndarray | None:
    """[new][earlier] from the records' `param` ({earlier task: value}): token_similarity (expansion init),
    subspace_similarity (selection)."""
    matrix = np.full((len(tasks), len(tasks)), np.nan)
    for n, task in enumerate(tasks):
        for old, value in (records.get(task, {}).get("params", {}).get(param) or {}).items():
            if old in tasks and value is not None:
                matrix[n, tasks.index(old)] = float(value)
    return None if np.isnan(matrix).all() else matrix


def ground_truth(tasks: list[str]) -> np.ndarray | None:
    """The generator's relatedness of every pair of `synth.*` tasks ([new][earlier]); None unless all are synth."""
    from dmea_dist.data.synthetic import task_relatedness

    try:
        pairs = [[task_relatedness(a, b) if i < j else np.nan for i, a in enumerate(tasks)]
                 for j, b in enumerate(tasks)]
    except Exception:  # noqa: BLE001 - not synthetic task names: there is no ground truth to show
        return None
    return np.array(pairs, dtype=float)


# ------------------------------------------------------------------- files


def _status(run_dir: Path, state: dict[str, Any]) -> str:
    """The state's status, but "interrupted" for a run that says "running" while no driver holds its lock: its
    driver died without a word (SIGKILL, a crash, the terminal closed), and `dmea resume` continues it."""
    status = str(state.get("status") or ("finished" if state.get("stage") == "done" else "?"))
    if status != "running":
        return status
    import fcntl

    try:
        with open(run_dir / ".lock") as lock:  # read only: a report may read a folder it cannot write
            fcntl.flock(lock, fcntl.LOCK_SH | fcntl.LOCK_NB)  # released as the file closes
    except OSError:  # held (BlockingIOError), or no lock file (a run from before it): as the state says
        return status
    return "interrupted"


def _matrix(rows, n: int) -> np.ndarray:
    if not rows:
        return np.full((n, n), np.nan)
    return np.array([[np.nan if v is None else float(v) for v in row] for row in rows], dtype=float)


def _module_params(run_dir: Path) -> int | None:
    """Parameters of one module from any task's manifest: two adapters of d*b + b + b*d + d each."""
    for manifest in sorted(run_dir.glob("tasks/*-*/modules/manifest.json")):
        data = _read_json(manifest) or {}
        if "d_model" in data and "bottleneck" in data:
            d, b = int(data["d_model"]), int(data["bottleneck"])
            return 2 * (2 * d * b + b + d)
    return None


def _finite(value) -> float | None:
    return None if value is None or not math.isfinite(float(value)) else float(value)


def _read_json(path: Path, unreadable: list[tuple[Path, str]] | None = None) -> dict[str, Any] | None:
    """A JSON object file (state, record, metrics, manifest); None when missing, unreadable or not an object.
    A file that is there but cannot be used is added to `unreadable` with why: the report says so, rather
    than showing a run whose state.json is damaged as one that never started."""
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as err:
        why = str(err)
    else:
        if isinstance(data, dict):
            return data
        why = f"a JSON {type(data).__name__}, not an object"
    if unreadable is not None:
        unreadable.append((path, why))
    return None


def _read_yaml(path: Path) -> dict[str, Any]:
    try:
        data = yaml.safe_load(path.read_text())
    except (OSError, yaml.YAMLError):
        return {}
    return data if isinstance(data, dict) else {}
