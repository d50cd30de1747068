"""`Tracker`: records a lifelong run in MLflow (parent run, nested task runs, registry).

Tracking is a side channel: every MLflow call of `Tracker` is guarded, a
failure is a `TrackingWarning` naming what failed, and the tracker goes on
(a task run with a failed part ends FAILED). A tracker that cannot connect
warns once and then no-ops. Only one process (the driver) owns a Tracker.
`MlflowClient` only, never the fluent global state, so trackers and tests do
not interfere; `mlflow` is imported lazily (`enabled=False` never imports it).
"""

from __future__ import annotations

import json
import math
import sys
import time
import warnings
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

from dmea_dist.tracking.common import (
    DEFAULT_URI,
    MAX_PARAM_LENGTH,
    METRICS_PER_BATCH,
    MODEL_VERSION_TAG,
    MODULES_ARTIFACT,
    PARAMS_PER_BATCH,
    PARENT_TAG,
    RUN_STATUSES,
    TASK_ID_TAG,
    TASK_INDEX_TAG,
    TrackingError,
    TrackingWarning,
    _chunks,
    _jsonable,
    _tags,
    _truncate,
    default_artifact_location,
    flatten,
    mlflow_key,
    param_value,
    redact_config,
    redact_uri,
    resolve_uri,
    search_runs,
)
from dmea_dist.tracking.registry import (
    ServableTask,
    log_task_model,
    register_task_model,
    version_of_run,
)


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
        self._resumed = False  # the parent run may already hold this run's sequence metrics
        if enabled:
            connected = self._fetch(
                f"connecting to {redact_uri(self.uri)} (experiment {experiment!r}); tracking is off",
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
        params.update(flatten(redact_config(config)))
        self._attempt("logging the config params", lambda: self._log_params(run_id, params))
        self._attempt("logging config.yaml", lambda: self._log_config(run_id, config))
        self._attempt(
            "logging tasks.json",
            lambda: self._client.log_dict(run_id, {"tasks": list(tasks)}, "tasks.json"),
        )
        return run_id

    def resume_sequence(self, run_id: str) -> str | None:
        """Reattach to an existing parent run (after a crash) and mark it RUNNING again.

        A task run still RUNNING under it was being recorded when the driver died (only the driver records,
        one at a time): it is ended KILLED, and the task is recorded again into it (`driver._record_unrecorded`,
        `record_task`)."""
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
        self._experiment_id, self._parent_run_id, self._resumed = experiment_id, run_id, True
        self._attempt(f"ending the task runs of {run_id} left running", lambda: self._end_unfinished(run_id))
        return run_id

    def log_sequence_metrics(
        self,
        metrics: Mapping[str, float],
        artifacts: Mapping[str, str | Path] | None = None,
        *,
        step: int | None = None,
    ) -> None:
        """Metrics (e.g. A_T, BWT; `step` = tasks done, optional) and artifacts of the parent run.

        In a resumed sequence a point the parent run already holds (same key, step and value: a finished run
        resumed, or one killed after its final metrics were logged) is not logged again, so each metric's
        history holds it once."""
        if self._client is None or not self._has_sequence("log_sequence_metrics"):
            return
        run_id = self._parent_run_id

        def log():
            self._log_metrics(run_id, metrics, {}, step=step or 0, only_new=self._resumed)

        self._attempt("logging sequence metrics", log)
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
        servable: ServableTask | None = None,
    ) -> str | None:
        """One nested run for a finished task; ends FAILED if any part could not be recorded.

        In a resumed sequence, a run of the task that an earlier attempt left FAILED or KILLED is recorded into
        again (`_start_task_run`), with the metric points it holds left out: one run per task, however often
        its record failed.

        `params` values that are not scalars are logged as JSON; each `series` is
        one metric with steps 0..n-1; `artifacts` maps an artifact sub-path to a
        local file or folder; `model_dir` is logged under `modules/`. With
        `servable`, the task's pyfunc model is logged under `model/` and, with
        `registered_model`, registered as a new version of that model with the
        task's alias; without it, `model_dir` is the registered version.
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
        started = self._fetch(f"creating the run of {what}", lambda: self._start_task_run(task_index, task_id, run_tags))
        if started is None:
            return None
        run, again = started
        run_id = run.info.run_id
        task_params = {str(k): param_value(v) for k, v in params.items()}
        ok = [
            self._attempt(
                f"logging params of {what}", lambda: self._log_params(run_id, task_params)
            ),
            self._attempt(
                f"logging metrics of {what}",
                lambda: self._log_metrics(run_id, metrics, series or {}, only_new=again),
            ),
            self._log_artifacts(run_id, artifacts or {}, what),
        ]
        if model_dir is not None:
            ok.append(self._log_artifacts(run_id, {MODULES_ARTIFACT: model_dir}, what))
        if servable is not None:
            ok.append(self._attempt(f"logging the pyfunc model of {what}",
                                    lambda: log_task_model(self._client, run_id, task_id, servable)))
            if ok[-1] and registered_model:
                ok.append(self._attempt(
                    f"registering the model of {what} as {registered_model}@{servable.alias}",
                    lambda: register_task_model(self._client, registered_model, run, task_id=task_id,
                                                task_index=task_index, servable=servable,
                                                parent_run_id=self._parent_run_id)))
        elif model_dir is not None:
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

    def _start_task_run(self, task_index: int, task_id: str, tags: Mapping[str, str]) -> tuple[Any, bool]:
        """(the task's run, whether it is an earlier attempt's): in a resumed sequence, the run an earlier attempt
        to record the task left FAILED or KILLED is started again, so a record that keeps failing stays one run
        per task (not one more at each resume), and a model version it registered stays its only version."""
        earlier = None
        if self._resumed:

            earlier = max(search_runs(self._client, self._experiment_id,
                                       f"tags.`{PARENT_TAG}` = '{self._parent_run_id}' and tags.`{TASK_INDEX_TAG}` = "
                                       f"'{task_index}' and attributes.status != 'FINISHED'"),
                          key=lambda run: run.info.start_time, default=None)
        if earlier is None:
            return self._client.create_run(self._experiment_id, run_name=task_id, tags=tags), False
        from mlflow.entities import RunTag

        self._client.log_batch(earlier.info.run_id, tags=[RunTag(k, v) for k, v in tags.items()])
        self._client.update_run(earlier.info.run_id, status="RUNNING")
        return earlier, True

    def _end_unfinished(self, parent_run_id: str) -> None:

        for run in search_runs(self._client, self._experiment_id,
                                f"tags.`{PARENT_TAG}` = '{parent_run_id}' and attributes.status = 'RUNNING'"):
            self._client.set_terminated(run.info.run_id, "KILLED")

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
        *,
        only_new: bool = False,
    ) -> None:
        """`only_new`: leave out the points the run's history already holds (a resumed run logging again)."""
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
        if only_new:
            entities = self._not_yet_logged(run_id, entities)
        for batch in _chunks(entities, METRICS_PER_BATCH):
            self._client.log_batch(run_id, metrics=batch)

    def _not_yet_logged(self, run_id: str, entities: list) -> list:
        """The metric points of `entities` that the run's history does not hold (same key, step and value)."""

        def point(m) -> tuple:
            if math.isnan(m.value):  # NaN != NaN
                return m.key, m.step, "nan"
            # MLflow's SQL store keeps +-inf as +-the largest float: a loss that overflowed reads back as that
            return m.key, m.step, math.copysign(sys.float_info.max, m.value) if math.isinf(m.value) else m.value

        held = self._client.get_run(run_id).data.metrics  # the keys it has: one history call each, not one per key given
        logged = {point(h) for key in {m.key for m in entities} & set(held)
                  for h in self._client.get_metric_history(run_id, key)}
        return [m for m in entities if point(m) not in logged]

    def _log_config(self, run_id: str, config: Mapping[str, Any]) -> None:
        import yaml

        self._client.log_text(
            run_id, yaml.safe_dump(_jsonable(redact_config(dict(config))), sort_keys=False), "config.yaml"
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
        version = version_of_run(self._client, name, run.info.run_id) or self._client.create_model_version(
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
            warn_failure(what, exc, stacklevel=4)
            return None

    def _attempt(self, what: str, call: Callable[[], Any]) -> bool:
        """True if call() ran; False after a TrackingWarning naming `what`."""
        return self._fetch(what, lambda: (call(), True)[1]) is not None


def warn_failure(what: str, exc: Exception, consequence: str = "training continues", *,
                 stacklevel: int = 2) -> None:
    """A TrackingWarning: `what` failed (the error, redacted and truncated), and what that means for the run."""
    detail = _truncate(redact_uri(f"{type(exc).__name__}: {exc}"), 600)
    warnings.warn(
        f"MLflow tracking: {what} failed ({detail}); {consequence}",
        TrackingWarning,
        stacklevel=stacklevel,
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
