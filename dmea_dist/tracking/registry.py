"""A task's model in the MLflow registry: a pyfunc model, one registered model per run, an alias per task.

    models:/<config>-<method>-<time>-<suffix>@<task alias>     e.g. models:/quickstart-dmea-20261202-082536-10ab@synth-restaurant-00

A task's model is an MLflow pyfunc model made *from code*: the model folder
holds `MLmodel`, a three-line loader script (`dmea_task_model.py`, which
imports `dmea_dist.tracking.pyfunc.DmeaTaskModel`) and one artifact, `run/`: a
run folder that holds only this task (config.yaml, the tokenizer, the tiny
backbone or, for a pretrained backbone, its name in the config, and
`tasks/NNN-<task>/modules` with the path manifest). Nothing is pickled, so
loading needs dmea-dist installed (its version is the model's requirement)
and runs no foreign code. `mlflow models serve -m models:/NAME@ALIAS
--env-manager local` and `mlflow.pyfunc.load_model` both work with it.

Aliases: `task_alias` (tracking/common.py) maps a task id to MLflow's alias
characters deterministically (`synth.restaurant.00` -> `synth-restaurant-00`).
Version tags: dmea.task_id (also `task_id`), task index, the task's path,
its run and the sequence run.
"""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
import warnings
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path

from dmea_dist.tracking.common import ALIAS_TAG, MODEL_ARTIFACT, MODEL_VERSION_TAG, _tags

LOADER = "dmea_task_model.py"
# models-from-code: MLflow runs this file to get the model object; it only names a class of this package
LOADER_CODE = '''"""Loader of a dmea-dist task model (MLflow models-from-code): the class lives in dmea_dist."""
import mlflow.models

from dmea_dist.tracking.pyfunc import DmeaTaskModel

mlflow.models.set_model(DmeaTaskModel())
'''
DEFAULT_MAX_NEW_TOKENS = 64  # as `dmea generate`, so that both answer alike


@dataclass(frozen=True)
class ServableTask:
    """What makes a task's registered model: its run folder (only this task) and registry names."""

    folder: Path  # serving.stage_task's output: config.yaml, tokenizer/, backbone/, tasks/NNN-<task>/modules
    alias: str  # task_alias(task_id), unique within the run
    path: list[int] | None  # the task's path (None: a full fine-tuning baseline)
    model_tags: Mapping[str, str] = field(default_factory=dict)  # of the registered model: run, config, method


def signature():
    """Inputs: context (and optionally question, task); output: the answer; decoding as params."""
    from mlflow.models import ModelSignature
    from mlflow.types import ColSpec, ParamSchema, ParamSpec, Schema

    inputs = Schema([ColSpec("string", "context"), ColSpec("string", "question", required=False),
                     ColSpec("string", "task", required=False)])
    params = ParamSchema([ParamSpec("decoding", "string", "greedy"),
                          ParamSpec("max_new_tokens", "long", DEFAULT_MAX_NEW_TOKENS),
                          ParamSpec("top_k", "long", 20), ParamSpec("seed", "long", 0),
                          ParamSpec("batch_size", "long", 32)])
    return ModelSignature(inputs=inputs, outputs=Schema([ColSpec("string", "answer")]), params=params)


def save_task_model(servable: ServableTask, task_id: str, dst: Path) -> Path:
    """Write the task's pyfunc model folder at `dst` (must not exist)."""
    with _quiet_mlflow(), tempfile.TemporaryDirectory(prefix="dmea-loader-") as tmp:
        import mlflow.pyfunc

        from dmea_dist import __version__

        loader = Path(tmp) / LOADER
        loader.write_text(LOADER_CODE)
        mlflow.pyfunc.save_model(
            path=str(dst), python_model=str(loader), artifacts={"run": str(servable.folder)},
            model_config={"task_id": task_id}, signature=signature(),
            pip_requirements=[f"dmea-dist=={__version__}"],
            metadata={"task_id": task_id, "path": json.dumps(servable.path), "alias": servable.alias})
    return dst


@contextlib.contextmanager
def _quiet_mlflow() -> Iterator[None]:
    """Drop MLflow's own UserWarnings and artifact progress bars while a task model is saved.

    MLflow 3.17 warns about its own type hints on first import, about a
    predict without type hints (on purpose: pyfunc.py) and a missing
    input_example (one would make it load the model and predict while
    saving): none is the user's to act on. Its type-hint check sets its own
    "once" filter, so the warnings are dropped where they are shown. Copying
    the `run/` artifact is no download worth a progress bar.
    """
    saved = os.environ.get("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR")
    with warnings.catch_warnings():  # restores showwarning too
        warnings.simplefilter("ignore", UserWarning)
        shown = warnings.showwarning

        def show(message, category, filename, *args, **kwargs):
            if not (issubclass(category, UserWarning) and f"{os.sep}mlflow{os.sep}" in str(filename)):
                shown(message, category, filename, *args, **kwargs)

        warnings.showwarning = show
        os.environ["MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR"] = "false"
        try:
            yield
        finally:
            if saved is None:
                os.environ.pop("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", None)
            else:
                os.environ["MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR"] = saved


def log_task_model(client, run_id: str, task_id: str, servable: ServableTask) -> None:
    """Save the task's pyfunc model and log it under `model/` of the task's run."""
    with tempfile.TemporaryDirectory(prefix="dmea-model-") as tmp:
        folder = save_task_model(servable, task_id, Path(tmp) / MODEL_ARTIFACT)
        client.log_artifacts(run_id, str(folder), artifact_path=MODEL_ARTIFACT)


def register_task_model(client, name: str, run, *, task_id: str, task_index: int, servable: ServableTask,
                        parent_run_id: str | None):
    """A new version of `name` from the run's `model/`, with the task's alias and tags; returns it."""
    from mlflow.exceptions import MlflowException

    try:
        client.create_registered_model(name, tags=_tags(servable.model_tags),
                                       description="dmea-dist: one version per task of one run, alias = task")
    except MlflowException as exc:
        if exc.error_code != "RESOURCE_ALREADY_EXISTS":
            raise
    version = version_of_run(client, name, run.info.run_id) or client.create_model_version(
        name, source=f"{run.info.artifact_uri.rstrip('/')}/{MODEL_ARTIFACT}", run_id=run.info.run_id,
        tags=_tags({"task_id": task_id, "task_index": task_index, "dmea.task_id": task_id,
                    "dmea.path": json.dumps(servable.path), "dmea.alias": servable.alias,
                    "dmea.parent_run_id": parent_run_id or ""}))
    client.set_registered_model_alias(name, servable.alias, version.version)
    client.set_tag(run.info.run_id, MODEL_VERSION_TAG, f"{name}/{version.version}")
    client.set_tag(run.info.run_id, ALIAS_TAG, f"models:/{name}@{servable.alias}")
    return version


def version_of_run(client, name: str, run_id: str):
    """The version of `name` that `run_id` already registered, or None.

    A driver killed between registering a task's version and ending its run leaves that version; the resume
    records the task into the same run again (`Tracker.record_task`) and takes this version, whose source is
    that run's model folder, logged anew just before: one version per task, its alias on it.
    """
    return max((v for v in client.search_model_versions(f"run_id = '{run_id}'") if v.name == name),
               key=lambda v: int(v.version), default=None)
