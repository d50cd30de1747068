"""MLflow tracking: the one package of dmea-dist that talks to MLflow.

Role: record a lifelong run as one parent run (flattened config as params,
config.yaml and tasks.json, sequence metrics, the report's images) with one
nested run per task (params, metrics, metric series with steps, artifacts,
the task's module folder under `modules/`, its servable MLflow model under
`model/`, registered with an alias per task); and read them back
(`find_task_runs`, `download_task_modules`, `download_run`,
`download_registered_model`) for tests and `dmea generate`.

    common    names, limits, URIs, redaction, aliases (no MLflow import)
    store     check_store before a run; counting tracking failures
    writer    Tracker: parent run, task runs, artifacts, registry versions
    registry  the per-task pyfunc model: saved, registered, aliased
    readers   task runs, module folders, whole runs and registered models back
    pyfunc    the pyfunc model class (imported only by MLflow's model loader)

Key decisions:
- Tracking is a side channel (writer.py): a failure warns, training goes on.
  The readers raise `TrackingError`.
- `MlflowClient` only, never the fluent global state; `mlflow` is imported
  lazily, so `enabled=False` never imports it.
- A relative `sqlite:///x.db` is resolved against the current directory when the
  Tracker is made (MLflow caches one store per URI string for the process). A
  new experiment on a sqlite file keeps its artifacts in `mlruns/<experiment>/`
  next to the db file; MLflow 3.17's own default is `./mlruns/<experiment_id>`
  under whatever directory the run started in. Other URIs keep MLflow's default
  (for multi-node runs: a server with `--serve-artifacts`).
- Secrets stay out: a `user:password@` in a URI and values of keys named like
  password/token/secret are redacted in params, config.yaml, warnings and
  errors (`redact_uri`, `redact_config`); a run takes credentials from the
  environment (MLFLOW_TRACKING_USERNAME/PASSWORD/TOKEN), never from its config.
- A task's registered model version is an MLflow pyfunc model (registry.py);
  a plain module folder without one is registered with `create_model_version`
  (source = the run's artifact URI + `/modules`), as before.
- Limits: params are cut to 6000 characters, keys to 250 (a hash suffix keeps
  cut keys distinct) and sanitised to MLflow's characters. Metrics are logged as
  floats; NaN stays NaN (the SQL store keeps an is_nan flag), +-inf is clamped
  by MLflow to +-max float.
"""

from dmea_dist.tracking.common import (
    DEFAULT_URI,
    MAX_KEY_LENGTH,
    MAX_PARAM_LENGTH,
    MAX_TAG_LENGTH,
    MODEL_VERSION_TAG,
    MODULES_ARTIFACT,
    PARENT_TAG,
    TASK_ID_TAG,
    TASK_INDEX_TAG,
    TrackingError,
    TrackingWarning,
    credentials_from_uri,
    default_artifact_location,
    flatten,
    mlflow_key,
    param_value,
    redact_config,
    redact_uri,
    registered_model_name,
    resolve_uri,
    sqlite_path,
    task_alias,
    task_aliases,
)
from dmea_dist.tracking.readers import (
    download_registered_model,
    download_run,
    download_task_modules,
    find_task_runs,
)
from dmea_dist.tracking.store import check_parent_run, check_store, count_failures, failures_summary
from dmea_dist.tracking.writer import Tracker, warn_failure

__all__ = [
    "DEFAULT_URI", "MAX_KEY_LENGTH", "MAX_PARAM_LENGTH", "MAX_TAG_LENGTH", "MODEL_VERSION_TAG", "MODULES_ARTIFACT",
    "PARENT_TAG", "TASK_ID_TAG", "TASK_INDEX_TAG", "Tracker", "TrackingError", "TrackingWarning", "check_parent_run", "check_store",
    "count_failures", "credentials_from_uri", "default_artifact_location", "download_registered_model",
    "download_run", "download_task_modules", "failures_summary", "find_task_runs", "flatten", "mlflow_key",
    "param_value", "redact_config", "redact_uri", "registered_model_name", "resolve_uri", "sqlite_path",
    "task_alias", "task_aliases", "warn_failure",
]
