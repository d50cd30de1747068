"""MLflow tracking: the one module of dmea-dist that talks to MLflow.

Role: record a lifelong run as one parent run (flattened config as params,
config.yaml and tasks.json, sequence metrics) with one nested run per task
(params, metrics, metric series with steps, artifacts, the task's module folder
under `modules/`, optionally a registry version of that folder); and read them
back (`find_task_runs`, `download_task_modules`) for tests and `dmea generate`.

Key decisions:
- Tracking is a side channel: every MLflow call of `Tracker` is guarded, a
  failure is a `TrackingWarning` naming what failed, and the tracker goes on (a
  task run with a failed part ends FAILED). A tracker that cannot connect warns
  once and then no-ops. The readers have nothing to fall back to: they raise
  `TrackingError`. Only one process (the driver/coordinator) owns a Tracker.
- But a store that is broken before the run starts is bad input, not a
  transient failure: a corrupt `mlflow.db` would give a run that looks tracked
  and is not. `check_store` refuses it before any work, naming the database
  and the fixes; it opens an existing SQLite file read-only first, so a
  damaged or foreign file is never "repaired" by MLflow's table creation.
  `count_failures` counts the warnings of a run so its end can say how much
  of the record is missing.
- `MlflowClient` only, never the fluent global state, so trackers and tests do
  not interfere; `mlflow` is imported lazily (`enabled=False` never imports it).
- A relative `sqlite:///x.db` is resolved against the current directory when the
  Tracker is made (MLflow caches one store per URI string for the process). A
  new experiment on a sqlite file keeps its artifacts in `mlruns/<experiment>/`
  next to the db file; MLflow 3.17's own default is `./mlruns/<experiment_id>`
  under whatever directory the run started in. Other URIs keep MLflow's default
  (for multi-node runs: a server with `--serve-artifacts`).
- A plain module folder is registered with `create_model_version` (source = the
  run's artifact URI + `/modules`), not `register_model` (wants an MLflow model).
- Limits: params are cut to 6000 characters, keys to 250 (a hash suffix keeps
  cut keys distinct) and sanitised to MLflow's characters. Metrics are logged as
  floats; NaN stays NaN (the SQL store keeps an is_nan flag), +-inf is clamped
  by MLflow to +-max float.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import re
import sqlite3
import time
import warnings
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

from dmea_dist.errors import DmeaError

DEFAULT_URI = "sqlite:///mlflow.db"
MAX_KEY_LENGTH = 250
MAX_PARAM_LENGTH = 6000
MAX_TAG_LENGTH = 8000
PARAMS_PER_BATCH = 100  # MLflow's per-request limits
METRICS_PER_BATCH = 1000
PARENT_TAG = "mlflow.parentRunId"
TASK_ID_TAG = "dmea.task_id"
TASK_INDEX_TAG = "dmea.task_index"
MODEL_VERSION_TAG = "dmea.model_version"
MODULES_ARTIFACT = "modules"
RUN_STATUSES = ("FINISHED", "FAILED", "KILLED")
_TRUNCATED = "...[truncated]"


class TrackingWarning(UserWarning):
    """A tracking call failed; training goes on and the record may be incomplete."""


class TrackingError(DmeaError, RuntimeError):
    """Reading a recorded run failed (missing experiment, run or artifacts)."""


# --------------------------------------------------------------------------- pure helpers


def flatten(d: Mapping[str, Any], prefix: str = "") -> dict[str, str]:
    """Nested mapping -> {"dotted.key": str value}; lists and other values become JSON/str."""
    flat: dict[str, str] = {}
    for key, value in d.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping) and value:
            flat.update(flatten(value, prefix=f"{name}."))
        else:
            flat[name] = param_value(value)
    return flat


def param_value(value: Any) -> str:
    """A param as MLflow stores it: containers as JSON, anything else as str."""
    if isinstance(value, Mapping | list | tuple | set):
        return json.dumps(_jsonable(sorted(value) if isinstance(value, set) else value))
    return str(value)


def mlflow_key(key: str, limit: int = MAX_KEY_LENGTH) -> str:
    """Sanitise a param/metric/tag key: MLflow's characters, no odd path parts, <= limit."""
    # MLflow allows alphanumerics, _ - . space / (":" too, but not on Windows).
    key = re.sub(r"[^\w.\- /]", "_", str(key))
    parts = [p if p not in (".", "..") else p.replace(".", "_") for p in key.split("/") if p]
    key = "/".join(parts) or "_"
    if len(key) > limit:
        digest = hashlib.sha1(key.encode()).hexdigest()[:8]
        key = f"{key[: limit - 9]}-{digest}"
    return key


def _truncate(text: str, limit: int) -> str:
    return text if len(text) <= limit else text[: limit - len(_TRUNCATED)] + _TRUNCATED


def _jsonable(value: Any) -> Any:
    """Plain JSON types (tuples -> lists, Paths and other objects -> str)."""
    return json.loads(json.dumps(value, default=str))


def _tags(tags: Mapping[str, Any]) -> dict[str, str]:
    return {mlflow_key(k): _truncate(str(v), MAX_TAG_LENGTH) for k, v in tags.items()}


def _chunks(items: Sequence[Any], size: int):
    for start in range(0, len(items), size):
        yield items[start : start + size]


def sqlite_path(uri: str) -> Path | None:
    """The database file of a `sqlite:///...` URI (relative to the current directory), else None."""
    if not uri.startswith("sqlite:///"):
        return None
    db = uri[len("sqlite:///") :].split("?", 1)[0]
    return None if not db or db == ":memory:" else Path(db)


def resolve_uri(uri: str) -> str:
    """Make a relative sqlite path absolute (from the current directory), other URIs unchanged.

    MLflow caches one store per URI string for the whole process, so a relative
    `sqlite:///mlflow.db` would keep pointing at the first directory it was used in.
    """
    db = sqlite_path(uri)
    if db is None or db.is_absolute():
        return uri
    query = uri.partition("?")[2]
    return f"sqlite:///{db.resolve()}" + (f"?{query}" if query else "")


def default_artifact_location(uri: str, experiment: str) -> str | None:
    """`<db dir>/mlruns/<experiment>` for a sqlite file URI; None (MLflow decides) otherwise."""
    db = sqlite_path(uri)
    if db is None:
        return None
    folder = re.sub(r"[^\w.-]", "_", experiment).strip(".") or "experiment"
    if folder.isdigit():  # MLflow's own folders there are experiment ids
        folder = f"exp-{folder}"
    return str(db.resolve().parent / "mlruns" / folder)


# --------------------------------------------------------------------------- before a run


def check_store(*, uri: str, experiment: str) -> None:
    """Refuse a tracking store that does not open, before any work (module docstring); TrackingError says why.

    A sqlite database that does not exist yet is fine (MLflow creates it) if
    its folder exists. One that exists must pass SQLite's quick_check, hold
    MLflow's tables (or none), and open in MLflow with `experiment` not deleted.
    """
    uri = resolve_uri(uri)
    db = sqlite_path(uri)
    where = str(db) if db is not None else uri
    fixes = (f"move {db} away (e.g. mv {db} {db}.broken) and run again for a new database, point " if db is not None
             else "check the server, or point ") + \
        "tracking.uri at another store (--set tracking.uri=sqlite:///other.db), or run untracked " \
        "(--set tracking.enabled=false)"
    if db is not None:
        if not db.exists():
            if not db.parent.is_dir():
                raise TrackingError(f"tracking.uri {uri!r}: the folder {db.parent} does not exist; create it or "
                                    f"set tracking.uri (--set tracking.uri=sqlite:///path/mlflow.db)")
            return
        if not _check_sqlite_file(db, fixes):
            return  # an empty database: MLflow creates its tables when the run starts
    try:
        from mlflow import MlflowClient

        found = MlflowClient(tracking_uri=uri, registry_uri=uri).get_experiment_by_name(experiment)
    except Exception as exc:  # MLflow wraps SQLAlchemy and HTTP errors in several types
        raise TrackingError(f"MLflow tracking store {where} does not open "
                            f"({_truncate(f'{type(exc).__name__}: {exc}', 300)}); {fixes}") from None
    if found is not None and found.lifecycle_stage == "deleted":
        raise TrackingError(f"experiment {experiment!r} in {where} is deleted; restore it (mlflow experiments "
                            f"restore) or set tracking.experiment")


def _check_sqlite_file(db: Path, fixes: str) -> bool:
    """Read-only: an SQLite file that passes quick_check and holds MLflow's tables (True) or no tables (False)."""
    try:
        with contextlib.closing(sqlite3.connect(f"{db.resolve().as_uri()}?mode=ro", uri=True)) as con:
            problems = [row[0] for row in con.execute("PRAGMA quick_check")]
            tables = {row[0] for row in con.execute("SELECT name FROM sqlite_master WHERE type='table'")}
    except sqlite3.Error as exc:
        raise TrackingError(f"{db}: the MLflow database is damaged or not a database ({exc}); {fixes}") from None
    if problems != ["ok"]:
        raise TrackingError(f"{db}: the MLflow database is damaged (SQLite: {'; '.join(problems[:3])}); {fixes}")
    if tables and "experiments" not in tables:
        raise TrackingError(f"{db}: an SQLite database without MLflow's tables (it has {sorted(tables)[:5]}), "
                            f"so not an MLflow database; {fixes}")
    return bool(tables)


@contextlib.contextmanager
def count_failures() -> Iterator[list[str]]:
    """Collect the TrackingWarnings raised inside (each still shown) for the report at the end of a run.

    Every one is shown and counted, repeats included (Python shows a repeated
    warning once per place by default). Only this process's: the driver is the
    one process that talks to MLflow.
    """
    failures: list[str] = []
    with warnings.catch_warnings():
        warnings.simplefilter("always", TrackingWarning)
        show = warnings.showwarning

        def counted(message, category, *args, **kwargs):
            if issubclass(category, TrackingWarning):
                failures.append(str(message))
            show(message, category, *args, **kwargs)

        warnings.showwarning = counted  # catch_warnings puts the original back
        yield failures


def failures_summary(failures: Sequence[str], *, uri: str) -> str:
    """One line for the end of a run whose tracking failed somewhere ("" when nothing failed)."""
    if not failures:
        return ""
    first = failures[0].removeprefix("MLflow tracking: ")
    return (f"tracking: {len(failures)} MLflow call(s) failed during this run, so its record at {uri} is "
            f"incomplete (the run directory has every result); first: {_truncate(first, 300)}")


# --------------------------------------------------------------------------- writer


class Tracker:
    """Records a task sequence in MLflow; every failure warns, nothing here raises on MLflow errors.

    Usage: `start_sequence` (or `resume_sequence` after a crash), one
    `record_task` per finished task, `log_sequence_metrics`, `finish_sequence`.
    """

    def __init__(
        self, *, uri: str = DEFAULT_URI, experiment: str = "dmea-dist", enabled: bool = True
    ):
        self.uri = resolve_uri(uri)
        self.experiment = experiment
        self.enabled = enabled
        self._client = None
        self._experiment_id: str | None = None
        self._parent_run_id: str | None = None
        if enabled:
            connected = self._fetch(
                f"connecting to {self.uri} (experiment {experiment!r}); tracking is off",
                self._connect,
            )
            if connected is not None:
                self._client, self._experiment_id = connected

    @property
    def active(self) -> bool:
        """True when the tracker is enabled and connected."""
        return self._client is not None

    @property
    def parent_run_id(self) -> str | None:
        """The sequence run being recorded (persist it to resume after a crash)."""
        return self._parent_run_id

    # ----------------------------------------------------------------- sequence

    def start_sequence(
        self,
        *,
        run_name: str,
        config: Mapping[str, Any],
        tasks: list[str],
        tags: Mapping[str, Any] | None = None,
    ) -> str | None:
        """Create the parent run with the config (params + config.yaml) and the task list."""
        if self._client is None:
            return None
        run_tags = _tags({"dmea.kind": "sequence", "dmea.num_tasks": len(tasks), **(tags or {})})
        run = self._fetch(
            f"creating the sequence run {run_name!r}",
            lambda: self._client.create_run(self._experiment_id, run_name=run_name, tags=run_tags),
        )
        if run is None:
            return None
        run_id = self._parent_run_id = run.info.run_id
        params = {"sequence.tasks": json.dumps(list(tasks)), "sequence.num_tasks": str(len(tasks))}
        params.update(flatten(config))
        self._attempt("logging the config params", lambda: self._log_params(run_id, params))
        self._attempt("logging config.yaml", lambda: self._log_config(run_id, config))
        self._attempt(
            "logging tasks.json",
            lambda: self._client.log_dict(run_id, {"tasks": list(tasks)}, "tasks.json"),
        )
        return run_id

    def resume_sequence(self, run_id: str) -> str | None:
        """Reattach to an existing parent run (after a crash) and mark it RUNNING again."""
        if self._client is None:
            return None

        def reattach():
            run = self._client.get_run(run_id)
            if run.info.lifecycle_stage == "deleted":
                raise TrackingError(
                    f"run {run_id} is deleted; restore it (mlflow runs restore) or start a new run"
                )
            self._client.update_run(run_id, status="RUNNING")
            return run.info.experiment_id

        experiment_id = self._fetch(f"resuming the sequence run {run_id}", reattach)
        if experiment_id is None:
            return None
        self._experiment_id, self._parent_run_id = experiment_id, run_id
        return run_id

    def log_sequence_metrics(
        self,
        metrics: Mapping[str, float],
        artifacts: Mapping[str, str | Path] | None = None,
        *,
        step: int | None = None,
    ) -> None:
        """Metrics (e.g. A_T, BWT; `step` = tasks done, optional) and artifacts of the parent run."""
        if self._client is None or not self._has_sequence("log_sequence_metrics"):
            return
        run_id = self._parent_run_id
        self._attempt(
            "logging sequence metrics",
            lambda: self._log_metrics(run_id, metrics, {}, step=step or 0),
        )
        self._log_artifacts(run_id, artifacts or {}, "the sequence run")

    def finish_sequence(self, status: str = "FINISHED") -> None:
        """End the parent run with `status` (FINISHED, FAILED or KILLED)."""
        if status not in RUN_STATUSES:
            raise ValueError(f"finish_sequence(status={status!r}): use one of {RUN_STATUSES}")
        if self._client is None or not self._has_sequence("finish_sequence"):
            return
        run_id, self._parent_run_id = self._parent_run_id, None
        self._attempt(
            f"ending the sequence run {run_id}", lambda: self._client.set_terminated(run_id, status)
        )

    # ----------------------------------------------------------------- tasks

    def record_task(
        self,
        *,
        task_index: int,
        task_id: str,
        params: Mapping[str, Any],
        metrics: Mapping[str, float],
        series: Mapping[str, Sequence[float]] | None = None,
        tags: Mapping[str, Any] | None = None,
        artifacts: Mapping[str, str | Path] | None = None,
        model_dir: str | Path | None = None,
        registered_model: str | None = None,
    ) -> str | None:
        """One nested run for a finished task; ends FAILED if any part could not be recorded.

        `params` values that are not scalars are logged as JSON; each `series` is
        one metric with steps 0..n-1; `artifacts` maps an artifact sub-path to a
        local file or folder; `model_dir` is logged under `modules/` and, with
        `registered_model`, registered as a new version of that model.
        """
        if self._client is None or not self._has_sequence(f"record_task({task_id!r})"):
            return None
        what = f"task {task_index} ({task_id})"
        run_tags = _tags(
            {
                **(tags or {}),
                PARENT_TAG: self._parent_run_id,
                TASK_ID_TAG: task_id,
                TASK_INDEX_TAG: task_index,
            }
        )
        run = self._fetch(
            f"creating the run of {what}",
            lambda: self._client.create_run(self._experiment_id, run_name=task_id, tags=run_tags),
        )
        if run is None:
            return None
        run_id = run.info.run_id
        task_params = {str(k): param_value(v) for k, v in params.items()}
        ok = [
            self._attempt(
                f"logging params of {what}", lambda: self._log_params(run_id, task_params)
            ),
            self._attempt(
                f"logging metrics of {what}",
                lambda: self._log_metrics(run_id, metrics, series or {}),
            ),
            self._log_artifacts(run_id, artifacts or {}, what),
        ]
        if model_dir is not None:
            ok.append(self._log_artifacts(run_id, {MODULES_ARTIFACT: model_dir}, what))
            if ok[-1] and registered_model:
                ok.append(
                    self._attempt(
                        f"registering the modules of {what} as {registered_model!r}",
                        lambda: self._register(
                            registered_model, run, task_id=task_id, task_index=task_index
                        ),
                    )
                )
        status = "FINISHED" if all(ok) else "FAILED"
        self._attempt(
            f"ending the run of {what}", lambda: self._client.set_terminated(run_id, status)
        )
        return run_id

    # ----------------------------------------------------------------- MLflow calls

    def _connect(self):
        from mlflow import MlflowClient

        client = MlflowClient(tracking_uri=self.uri, registry_uri=self.uri)
        return client, _experiment_id(
            client, self.experiment, default_artifact_location(self.uri, self.experiment)
        )

    def _log_params(self, run_id: str, params: Mapping[str, str]) -> None:
        from mlflow.entities import Param

        # Sanitising keys can merge two keys; the dict keeps the last one (one value per key).
        clean = {mlflow_key(k): _truncate(v, MAX_PARAM_LENGTH) for k, v in params.items()}
        entities = [Param(k, v) for k, v in clean.items()]
        for batch in _chunks(entities, PARAMS_PER_BATCH):
            self._client.log_batch(run_id, params=batch)

    def _log_metrics(
        self,
        run_id: str,
        metrics: Mapping[str, float],
        series: Mapping[str, Sequence[float]],
        step: int = 0,
    ) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        points = [(k, v, step) for k, v in metrics.items()]
        points += [(k, v, i) for k, values in series.items() for i, v in enumerate(values)]
        entities, bad = [], []
        for key, value, i in points:
            try:
                entities.append(Metric(mlflow_key(key), float(value), now, i))
            except (TypeError, ValueError):
                bad.append(f"{key}[{i}]={value!r}")
        if bad:
            warnings.warn(
                f"MLflow tracking: skipped metric values that are not numbers: {bad[:10]}",
                TrackingWarning,
                stacklevel=3,
            )
        for batch in _chunks(entities, METRICS_PER_BATCH):
            self._client.log_batch(run_id, metrics=batch)

    def _log_config(self, run_id: str, config: Mapping[str, Any]) -> None:
        import yaml

        self._client.log_text(
            run_id, yaml.safe_dump(_jsonable(dict(config)), sort_keys=False), "config.yaml"
        )

    def _log_artifacts(self, run_id: str, artifacts: Mapping[str, str | Path], what: str) -> bool:
        """Log each local file/folder under its artifact sub-path; False if any failed."""
        ok = True
        for sub_path, local in artifacts.items():
            ok &= self._attempt(
                f"logging artifact {sub_path!r} of {what}",
                lambda s=sub_path, p=local: self._log_artifact(run_id, s, Path(p)),
            )
        return ok

    def _log_artifact(self, run_id: str, sub_path: str, local: Path) -> None:
        sub_path = str(sub_path).strip("/") or None
        if local.is_dir():
            self._client.log_artifacts(run_id, str(local), artifact_path=sub_path)
        elif local.is_file():
            self._client.log_artifact(run_id, str(local), artifact_path=sub_path)
        else:
            raise FileNotFoundError(f"{local} does not exist (artifact {sub_path!r})")

    def _register(self, name: str, run, *, task_id: str, task_index: int):
        from mlflow.exceptions import MlflowException

        try:
            self._client.create_registered_model(
                name, description="DMEA per-task modules (dmea-dist)"
            )
        except MlflowException as exc:
            if exc.error_code != "RESOURCE_ALREADY_EXISTS":
                raise
        source = f"{run.info.artifact_uri.rstrip('/')}/{MODULES_ARTIFACT}"
        version = self._client.create_model_version(
            name,
            source=source,
            run_id=run.info.run_id,
            tags={"task_id": task_id, "task_index": str(task_index)},
        )
        self._client.set_tag(run.info.run_id, MODEL_VERSION_TAG, f"{name}/{version.version}")
        return version

    # ----------------------------------------------------------------- guards

    def _has_sequence(self, caller: str) -> bool:
        if self._parent_run_id is None:
            warnings.warn(
                f"MLflow tracking: {caller} has no sequence run (start_sequence or resume_sequence "
                "did not run or failed); not recorded",
                TrackingWarning,
                stacklevel=3,
            )
        return self._parent_run_id is not None

    def _fetch(self, what: str, call: Callable[[], Any]) -> Any:
        """call() or None after a TrackingWarning naming `what`."""
        try:
            return call()
        except Exception as exc:  # tracking must never stop training
            _warn(what, exc)
            return None

    def _attempt(self, what: str, call: Callable[[], Any]) -> bool:
        """True if call() ran; False after a TrackingWarning naming `what`."""
        return self._fetch(what, lambda: (call(), True)[1]) is not None


def _warn(what: str, exc: Exception) -> None:
    detail = _truncate(f"{type(exc).__name__}: {exc}", 600)
    warnings.warn(
        f"MLflow tracking: {what} failed ({detail}); training continues",
        TrackingWarning,
        stacklevel=4,
    )


def _experiment_id(client, name: str, artifact_location: str | None) -> str:
    from mlflow.exceptions import MlflowException

    experiment = client.get_experiment_by_name(name)
    if experiment is None:
        try:
            return client.create_experiment(name, artifact_location=artifact_location)
        except MlflowException as exc:  # another process created it first
            if exc.error_code != "RESOURCE_ALREADY_EXISTS":
                raise
            experiment = client.get_experiment_by_name(name)
    if experiment.lifecycle_stage == "deleted":
        raise TrackingError(
            f"experiment {name!r} is deleted; restore it (mlflow experiments restore) or set tracking.experiment"
        )
    return experiment.experiment_id


# --------------------------------------------------------------------------- readers


def find_task_runs(*, uri: str, experiment: str, parent_run_id: str) -> list[dict[str, Any]]:
    """The FINISHED task runs of a sequence, one per task index (the latest), in task order.

    Each: task_index, task_id, run_id, metrics (latest value per key), params,
    artifact_uri, model_version ("name/version" or None).
    """
    if not re.fullmatch(r"[\w-]+", parent_run_id):
        raise TrackingError(f"parent_run_id={parent_run_id!r} is not an MLflow run id")
    client = _reader_client(uri)
    try:
        found = client.get_experiment_by_name(experiment)
        runs = (
            _search_runs(client, found.experiment_id, f"tags.`{PARENT_TAG}` = '{parent_run_id}'")
            if found
            else []
        )
    except Exception as exc:
        raise TrackingError(
            f"could not search the task runs of {parent_run_id} at {uri}: {exc}"
        ) from exc
    if found is None:
        raise TrackingError(
            f"no experiment {experiment!r} at {uri}; check tracking.uri and tracking.experiment"
        )
    latest: dict[int, Any] = {}
    for run in runs:
        index = int(run.data.tags.get(TASK_INDEX_TAG, -1))
        if run.info.status == "FINISHED" and (
            index not in latest or run.info.start_time > latest[index].info.start_time
        ):
            latest[index] = run
    return [
        {
            "task_index": index,
            "task_id": run.data.tags.get(TASK_ID_TAG, run.info.run_name),
            "run_id": run.info.run_id,
            "metrics": dict(run.data.metrics),
            "params": dict(run.data.params),
            "artifact_uri": run.info.artifact_uri,
            "model_version": run.data.tags.get(MODEL_VERSION_TAG),
        }
        for index, run in sorted(latest.items())
    ]


def _search_runs(client, experiment_id: str, filter_string: str) -> list:
    runs, token = [], None
    while True:  # MLflow pages search results
        page = client.search_runs([experiment_id], filter_string=filter_string, page_token=token)
        runs.extend(page)
        token = page.token
        if not token:
            return runs


def download_task_modules(*, uri: str, run_id: str, dst: str | Path) -> Path:
    """Download the `modules/` folder of a task run into `dst`; returns `dst/modules`."""
    client = _reader_client(uri)
    dst = Path(dst)
    dst.mkdir(parents=True, exist_ok=True)
    hint = "check the run id, and that the task was recorded with model_dir"
    try:
        local = Path(client.download_artifacts(run_id, MODULES_ARTIFACT, str(dst.resolve())))
    except Exception as exc:
        raise TrackingError(
            f"could not download {MODULES_ARTIFACT}/ of run {run_id} from {uri}: {exc}; {hint}"
        ) from exc
    if not local.is_dir() or not any(local.iterdir()):
        raise TrackingError(f"run {run_id} at {uri} has no {MODULES_ARTIFACT}/ artifacts; {hint}")
    return local


def _reader_client(uri: str):
    uri = resolve_uri(uri)
    db = sqlite_path(uri)
    if db is not None and not db.is_file():  # MLflow would create an empty database
        raise TrackingError(
            f"no MLflow database at {uri!r}; check tracking.uri (relative paths start at the current directory)"
        )
    try:
        from mlflow import MlflowClient

        return MlflowClient(tracking_uri=uri, registry_uri=uri)
    except Exception as exc:
        raise TrackingError(f"cannot open MLflow tracking URI {uri!r}: {exc}") from exc
