"""Reading recorded runs back: task runs of a sequence, their modules, whole runs and registered models.

The readers have nothing to fall back to: they raise `TrackingError` naming
the store (credentials redacted), the run and what to check.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from dmea_dist.state import task_folder
from dmea_dist.tracking.common import (
    MODEL_VERSION_TAG,
    MODULES_ARTIFACT,
    PARENT_TAG,
    TASK_ID_TAG,
    TASK_INDEX_TAG,
    TrackingError,
    redact_uri,
    resolve_uri,
    search_runs,
    sqlite_path,
)


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
        latest = _task_runs(client, found.experiment_id, parent_run_id) if found else {}
    except Exception as exc:
        raise TrackingError(
            f"could not search the task runs of {parent_run_id} at {redact_uri(uri)}: {redact_uri(str(exc))}"
        ) from None
    if found is None:
        raise TrackingError(
            f"no experiment {experiment!r} at {redact_uri(uri)}; check tracking.uri and tracking.experiment"
        )
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


def download_task_modules(*, uri: str, run_id: str, dst: str | Path) -> Path:
    """Download the `modules/` folder of a task run into `dst`; returns `dst/modules`."""
    client = _reader_client(uri)
    dst = Path(dst)
    dst.mkdir(parents=True, exist_ok=True)
    hint = "check the run id, and that the task was recorded with model_dir"
    try:
        local = Path(client.download_artifacts(run_id, MODULES_ARTIFACT, str(dst.resolve())))
    except Exception as exc:
        raise TrackingError(f"could not download {MODULES_ARTIFACT}/ of run {run_id} from {redact_uri(uri)}: "
                            f"{redact_uri(str(exc))}; {hint}") from None
    if not local.is_dir() or not any(local.iterdir()):
        raise TrackingError(f"run {run_id} at {redact_uri(uri)} has no {MODULES_ARTIFACT}/ artifacts; {hint}")
    return local


def _reader_client(uri: str):
    uri = resolve_uri(uri)
    db = sqlite_path(uri)
    if db is not None and not db.is_file():  # MLflow would create an empty database
        raise TrackingError(
            f"no MLflow database at {uri!r}; check tracking.uri, or for `dmea generate` --tracking-uri "
            f"(default $MLFLOW_TRACKING_URI, else sqlite:///mlflow.db; relative paths start at the current directory)"
        )  # a sqlite URI holds no credentials
    try:
        from mlflow import MlflowClient

        return MlflowClient(tracking_uri=uri, registry_uri=uri)
    except Exception as exc:
        raise TrackingError(f"cannot open MLflow tracking URI {redact_uri(uri)!r}: {redact_uri(str(exc))}") from None


def _task_runs(client, experiment_id: str, parent_run_id: str) -> dict[int, Any]:
    """{task index: the latest FINISHED task run} of a sequence run."""
    latest: dict[int, Any] = {}
    for run in search_runs(client, experiment_id, f"tags.`{PARENT_TAG}` = '{parent_run_id}'"):
        index = int(run.data.tags.get(TASK_INDEX_TAG, -1))
        if run.info.status == "FINISHED" and (
            index not in latest or run.info.start_time > latest[index].info.start_time
        ):
            latest[index] = run
    return latest


def download_run(*, uri: str, run_id: str, dst: str | Path) -> tuple[Path, str | None]:
    """Rebuild a run folder from MLflow; returns (folder, the task of `run_id` if it is a task run).

    `run_id`: the sequence (parent) run or a task run of a task with a FINISHED run. The folder
    holds what `dmea generate` reads from a run directory: the sequence run's
    config.yaml, tokenizer/ and backbone/ (those it has), and every finished
    task's modules/ under tasks/NNN-<task>/.
    """
    if not re.fullmatch(r"[\w-]+", run_id):
        raise TrackingError(f"{run_id!r} is not an MLflow run id")
    client, dst = _reader_client(uri), Path(dst)
    try:
        run = client.get_run(run_id)
        parent_id = run.data.tags.get(PARENT_TAG) or run_id
        task = run.data.tags.get(TASK_ID_TAG) if parent_id != run_id else None
        tasks = _task_runs(client, run.info.experiment_id, parent_id)
        # a task run that did not finish may miss its modules: not served, unless another run of its task finished
        # (an older resume recorded the task into a new run), which the folder takes, as for any task run id
        index = int(run.data.tags.get(TASK_INDEX_TAG, -1))
        if task is not None and run.info.status != "FINISHED" and index not in tasks:
            why = ("the run's driver is recording it now (try again when it is done), or was stopped while "
                   "recording it" if run.info.status == "RUNNING" else "part of its record failed, or the driver "
                   "stopped while recording it")
            raise TrackingError(f"task run {run_id} ({task}) at {redact_uri(uri)} is {run.info.status}, not "
                                f"FINISHED: {why}; `dmea resume RUN_DIR` (of a run nothing runs) records it again, "
                                f"and `dmea generate RUN_DIR {task} ...` serves it from the run directory meanwhile")
        present = {a.path for a in client.list_artifacts(parent_id)}
        dst.mkdir(parents=True, exist_ok=True)
        for name in ("config.yaml", "tokenizer", "backbone"):
            if name in present:
                client.download_artifacts(parent_id, name, str(dst.resolve()))
        for index, task_run in sorted(tasks.items()):
            folder = dst / "tasks" / task_folder(index, task_run.data.tags.get(TASK_ID_TAG, task_run.info.run_name))
            folder.mkdir(parents=True, exist_ok=True)
            client.download_artifacts(task_run.info.run_id, MODULES_ARTIFACT, str(folder.resolve()))
    except TrackingError:
        raise
    except Exception as exc:  # MLflow raises several types for a missing run or artifact
        raise TrackingError(f"could not rebuild run {run_id} from {redact_uri(uri)}: {type(exc).__name__}: "
                            f"{redact_uri(str(exc))[:300]}; check the run id and tracking URI") from None
    if "config.yaml" not in present or not tasks:
        raise TrackingError(f"run {run_id} at {redact_uri(uri)} is not a dmea sequence with recorded tasks "
                            f"(no config.yaml or no finished task runs under run {parent_id})")
    return dst, task


def parse_model_uri(model_uri: str) -> tuple[str, str | None, str | None]:
    """`models:/NAME@ALIAS` -> (NAME, ALIAS, None); `models:/NAME/VERSION` -> (NAME, None, VERSION)."""
    match = re.fullmatch(r"models:/([^@/]+)(?:@([^/]+)|/(\d+))", model_uri.strip())
    if match is None:
        raise TrackingError(f"{model_uri!r} is not a registered model URI; use models:/NAME@ALIAS "
                            f"(the alias of a task) or models:/NAME/VERSION")
    return match.group(1), match.group(2), match.group(3)


def download_registered_model(*, uri: str, model_uri: str, dst: str | Path) -> tuple[Path, str]:
    """Download a task's registered pyfunc model; returns (its run folder, its task id).

    The alias may also be the task id itself (`models:/NAME@synth.restaurant.00`): the version whose
    `task_id` tag it is, whatever alias registration gave it (`task_alias`, with `-t<index>` where two of a
    run's task ids map to one alias).
    """
    from dmea_dist.tracking.common import MODEL_ARTIFACT

    name, alias, number = parse_model_uri(model_uri)
    client, dst = _reader_client(uri), Path(dst)
    try:
        if alias is not None:
            try:
                version = client.get_model_version_by_alias(name, alias)
            except Exception:  # not an alias: perhaps the task id it was made from
                tagged = [v for v in client.search_model_versions(f"name = '{name}'")
                          if v.tags.get("task_id") == alias]
                if not tagged:
                    raise
                version = max(tagged, key=lambda v: int(v.version))
        else:
            version = client.get_model_version(name, number)
        dst.mkdir(parents=True, exist_ok=True)
        local = Path(client.download_artifacts(version.run_id, MODEL_ARTIFACT, str(dst.resolve())))
    except Exception as exc:
        raise TrackingError(f"could not load {model_uri} from {redact_uri(uri)}: {type(exc).__name__}: "
                            f"{redact_uri(str(exc))[:300]}; list the aliases in the MLflow UI (Models) or with "
                            f"MlflowClient().get_registered_model({name!r}).aliases, and check --tracking-uri"
                            ) from None
    folder = local / "artifacts" / "run"
    if not folder.is_dir() or "task_id" not in version.tags:
        raise TrackingError(f"{model_uri} is not a dmea task model (no artifacts/run folder or task_id tag); "
                            f"it was registered before dmea registered pyfunc models: use its run id instead")
    return folder, version.tags["task_id"]
