"""Before a run is driven: its input checked, its paths resolved, its directory made and locked.

What `dmea run`, `dmea resume` and the Ray job entry point do before the driver starts Ray or writes
anything (`dmea_dist.driver` drives the run after): `check_input` refuses bad data, config and tracking
stores and pretrains the tiny backbone once its lengths pass; `with_absolute_paths` and
`without_credentials` make the config the run saves mean the same from any directory and hold no secret;
`resume_config` reads a run's own config back, refusing changes to what it computes; `new_run_dir` and
`run_lock` give the run a directory no second driver can share; the `ray job submit` checks refuse paths
that would land in Ray's temporary copy of the repository.
"""

from __future__ import annotations

import fcntl
import json
import os
import secrets
import sys
import time
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import yaml

from dmea_dist.config import RunConfig, config_from_dict
from dmea_dist.errors import DmeaError

# Keys a resumed run may change: where and how big the work runs, and where its files and records are
# (a moved corpus or tracking store), not what it computes.
SAFE_TO_CHANGE = ("ray.", "data.root", "output_dir", "tracking.uri")



def check_resume(run_dir: str | Path, config: RunConfig) -> None:
    """Refuse a tracking store the resumed run cannot use, before Ray starts (`check_input`'s part for a resume):
    one that does not open, and one that tracking.uri points to elsewhere (the database moved) without the run's
    parent run, where a mistyped path would start an empty store and every MLflow call of the rest would fail."""
    from dmea_dist.state import load_state
    from dmea_dist.tracking import check_parent_run, check_store

    if not config.tracking.enabled:
        return
    run_dir = Path(run_dir)
    config = with_absolute_paths(config)
    recorded_in = with_absolute_paths(resume_config(run_dir, [])).tracking.uri
    # the state only where it is needed: a store that does not open is the first thing to say
    parent_run_id = load_state(run_dir).mlflow_parent_run_id if config.tracking.uri != recorded_in else None
    if parent_run_id:
        check_parent_run(uri=config.tracking.uri, experiment=config.tracking.experiment, run_id=parent_run_id,
                         recorded_in=recorded_in)  # before check_store, which would create a missing sqlite file
    else:
        check_store(uri=config.tracking.uri, experiment=config.tracking.experiment)


RAY_JOB_ENV = "RAY_JOB_CONFIG_JSON_ENV_VAR"  # the job's runtime_env, as Ray's job supervisor hands it the entry point


def job_runtime_env(environ=os.environ) -> dict:
    """The runtime env of the Ray job this driver is (`ray job submit --working-dir ... --runtime-env-json ...`),
    {} outside a job or where the variable is not what Ray writes."""
    try:
        return json.loads(environ.get(RAY_JOB_ENV) or "{}").get("runtime_env") or {}
    except (ValueError, AttributeError):
        return {}


def check_job_paths(config: RunConfig, environ=os.environ) -> None:
    """Refuse a relative output_dir or sqlite tracking.uri in a `ray job submit --working-dir` job.

    Such a job runs in Ray's temporary copy of the repository (/tmp/ray/session_*/runtime_resources/...):
    the run directory, the backbone cache and the MLflow database would land there, out of sight, and go
    with the session. Checked before anything is written.
    """
    from dmea_dist.tracking.common import sqlite_path

    if not job_runtime_env(environ).get("working_dir"):
        return
    db = sqlite_path(config.tracking.uri) if config.tracking.enabled else None
    relative = [("output_dir", config.output_dir, "/shared/runs")] if not Path(config.output_dir).is_absolute() else []
    if db is not None and not db.is_absolute():
        relative.append(("tracking.uri", config.tracking.uri, "sqlite:////shared/mlflow.db"))
    if relative:
        key, value, example = relative[0]
        raise DmeaError(f"{key} {value!r} is relative: in a `ray job submit --working-dir` job it resolves inside "
                        f"Ray's temporary copy of the repository ({os.getcwd()}), which goes with the session; "
                        f"give an absolute path on the driver's node, e.g. --set {key}={example} "
                        f"(launch/README.md)")


def resume_command(run_dir: Path, environ=os.environ) -> str:
    """How to continue the run in `run_dir`: as a Ray job when this driver is one (RAY_JOB_ENV set), the way it
    was started, else `dmea resume`."""
    if environ.get(RAY_JOB_ENV):
        working_dir = " --working-dir ." if "working_dir" in environ[RAY_JOB_ENV] else ""
        return (f"ray job submit --address http://HEAD:8265{working_dir} -- "
                f"python ray_jobs/run_sequence.py --resume {run_dir}")
    return f"dmea resume {run_dir}"


def check_input(config: RunConfig) -> None:
    """Refuse bad input here, before Ray starts or anything is written.

    `build_run` checks the same, but on Ray it runs in the coordinator actor,
    where an error comes back as a Ray traceback, after the run directory and
    the MLflow parent run exist. Order: data and config first (seconds), the
    tracking store, then the lengths, which need the tokenizer. For the tiny
    backbone that is `tiny_backbone`, which pretrains and caches it only once
    the lengths pass; the coordinator then loads it from the cache.
    Warnings about truncated inputs are printed here, once.
    """
    from dmea_dist.data.tokenizer import load_pretrained_tokenizer
    from dmea_dist.errors import DataWarning
    from dmea_dist.run import (
        check_checkpoint,
        check_max_length,
        length_check,
        load_tasks,
        tiny_backbone,
    )
    from dmea_dist.tracking import check_store

    tasks = load_tasks(config)
    check = length_check(config, tasks, positions=check_max_length(config))
    if config.tracking.enabled:
        check_store(uri=config.tracking.uri, experiment=config.tracking.experiment)

    def check_and_say(tokenizer) -> None:  # said at once: before the pretraining that follows
        with warnings.catch_warnings(record=True) as said:
            warnings.simplefilter("always", DataWarning)
            check(tokenizer)
        for warning in said:
            if issubclass(warning.category, DataWarning):
                print(f"warning: {warning.message}", file=sys.stderr)
            else:  # not ours to reword
                warnings.showwarning(warning.message, warning.category, warning.filename, warning.lineno)

    say = lambda line: print(line, file=sys.stderr, flush=True)  # noqa: E731  (a first run pretrains: say so)
    if config.model.pretrained:
        tokenizer = load_pretrained_tokenizer(config.model.pretrained, max_tasks=config.model.max_tasks)
        check_checkpoint(config, tokenizer)
        check_and_say(tokenizer)
    else:
        tiny_backbone(config, tasks, cache_root=Path(config.output_dir) / "_cache", check_tokenizer=check_and_say,
                      load_model=False, say=say)


def with_absolute_paths(config: RunConfig) -> RunConfig:
    """`config` with its relative paths made absolute from this directory: data.root, output_dir, a sqlite
    tracking.uri, user task files and a local model.pretrained folder.

    The run saves its config (config.yaml) and `dmea resume` reads it back from whatever directory it is
    started in: relative paths would then name other files (another corpus, a new empty MLflow store).
    Resolved here, in the driver, they also mean the same in the coordinator actor, whatever its directory.
    """
    import dataclasses

    from dmea_dist.tracking.common import resolve_uri

    def absolute(path):
        return path if path is None else os.path.abspath(os.path.expanduser(str(path)))

    d, m = config.data, config.model
    user_tasks = {name: {k: absolute(v) if k in ("path", "train", "validation", "test") else v
                         for k, v in spec.items()} for name, spec in d.user_tasks.items()}
    pretrained = m.pretrained
    if pretrained and os.path.isdir(os.path.expanduser(pretrained)):  # a local checkpoint, not a hub name
        pretrained = absolute(pretrained)
    return dataclasses.replace(
        config, output_dir=absolute(config.output_dir),
        data=dataclasses.replace(d, root=absolute(d.root), user_tasks=user_tasks),
        model=dataclasses.replace(m, pretrained=pretrained),
        tracking=dataclasses.replace(config.tracking, uri=resolve_uri(config.tracking.uri)))


def without_credentials(config: RunConfig) -> RunConfig:
    """`config` with a `user:password@` taken out of tracking.uri into MLflow's environment variables.

    MLflow authenticates from MLFLOW_TRACKING_USERNAME/PASSWORD, so the run works
    the same, and the config it saves (config.yaml, MLflow params) holds no
    secret. `dmea resume` needs the variables set (launch/README.md).
    """
    import dataclasses

    from dmea_dist.tracking import credentials_from_uri, redact_uri

    clean, user, password = credentials_from_uri(config.tracking.uri)
    if clean == config.tracking.uri:
        return config
    if user:
        os.environ["MLFLOW_TRACKING_USERNAME"] = user
    if password:
        os.environ["MLFLOW_TRACKING_PASSWORD"] = password
    print(f"note: tracking.uri {redact_uri(config.tracking.uri)} carries credentials: this run authenticates with "
          f"them from MLFLOW_TRACKING_USERNAME/PASSWORD and saves tracking.uri={clean}; set those variables to "
          f"resume it", file=sys.stderr)
    return dataclasses.replace(config, tracking=dataclasses.replace(config.tracking, uri=clean))


def resume_config(run_dir: Path, overrides: list[str], *, note: bool = True) -> RunConfig:
    """The run's own config with `overrides`; refuses changes to anything but SAFE_TO_CHANGE keys. `note`: say
    on stderr when the overrides change floating-point sums (threads, ranks)."""
    from dmea_dist.config import apply_override
    from dmea_dist.tracking import flatten

    source = run_dir / "config.yaml"
    if not run_dir.is_dir():  # a mistyped path, or one relative to another directory
        raise DmeaError(f"{run_dir} does not exist{'' if run_dir.is_absolute() else f' (in {os.getcwd()})'}; "
                        f"pass the run directory `dmea run` printed")
    if not source.is_file():
        raise DmeaError(f"{run_dir} has no config.yaml: not a run directory; pass the folder `dmea run` printed")
    saved = yaml.safe_load(source.read_text())
    raw = yaml.safe_load(source.read_text())
    for keys, old in ADDED_SINCE.items():  # a run written before such a key resumes as it started
        if _missing(saved, keys):
            for d in (saved, raw):
                _put(d, keys, old)
            if note:
                print(f"note: {source} was written before {'.'.join(keys)} existed: the run resumes with "
                      f"{old!r}, what it computed with", file=sys.stderr)
    for item in overrides:
        apply_override(raw, item, source=str(source))
    config = config_from_dict(raw, source=str(source))
    before, after = flatten(config_from_dict(saved, source=str(source)).to_dict()), flatten(config.to_dict())
    changed = sorted(k for k in set(before) | set(after) if before.get(k) != after.get(k))
    unsafe = [k for k in changed if not k.startswith(SAFE_TO_CHANGE)]
    if unsafe:
        allowed = ", ".join(p + "*" if p.endswith(".") else p for p in SAFE_TO_CHANGE)  # ray.*, data.root, ...
        raise DmeaError(f"resuming {run_dir} with a changed config is refused for {unsafe}: a resume continues the "
                        f"run as it started, and only where and how big the work runs and where its files are may "
                        f"change ({allowed}); start a new run for the rest")
    # the roles' cores are their torch threads, whose count changes floating-point sums; the ranks' count
    # changes them too (the same global batch, summed in shares), as do a GPU's kernels and adaptation moved to
    # the coordinator (its threads, one rank): allowed, but the rest is not bit for bit
    threads = [k for k in changed if k in ("ray.search_cpus", "ray.generation_cpus", "ray.train_cpus",
                                           "ray.num_train_workers", "ray.use_gpu", "ray.adapt_on")]
    if threads and note:
        print(f"note: resuming with {', '.join(f'{k}={after.get(k)}' for k in threads)} (was "
              f"{', '.join(str(before.get(k)) for k in threads)}): the remaining tasks compute in other "
              f"floating-point sums, so they may differ in the last bits, and onwards, from an uninterrupted run",
              file=sys.stderr)
    ranks = {k: 1 if c.get("ray.adapt_on") == "coordinator" else c.get("ray.num_train_workers")
             for k, c in (("before", before), ("after", after))}
    if note and ranks["before"] != ranks["after"] and (steps := _checkpointed_steps(run_dir)):
        # the checkpoint holds each rank's optimizer shard and generator: a job of another world size cannot take it
        print(f"note: the adaptation the run stopped in starts again from its first step on {ranks['after']} "
              f"training rank(s): its checkpoint (step {steps}) is of {ranks['before']} and continues only on as "
              f"many (resume without changing them to continue from it)", file=sys.stderr)
    return config


# config keys added since runs were first written, with the value that computes what the code before them did
ADDED_SINCE: dict[tuple[str, ...], Any] = {("method", "adaptation", "pseudo_split"): "all"}  # a520ff7, 2026-12-08


def _missing(raw: dict, keys: tuple[str, ...]) -> bool:
    """Whether the section holding `keys` is there and the key is not (a run's config.yaml holds every key)."""
    for k in keys[:-1]:
        raw = raw.get(k) if isinstance(raw, dict) else None
    return isinstance(raw, dict) and keys[-1] not in raw


def _put(raw: dict, keys: tuple[str, ...], value: Any) -> None:
    for k in keys[:-1]:
        raw = raw[k]
    raw[keys[-1]] = value


def _checkpointed_steps(run_dir: Path) -> int | None:
    """The steps the epoch checkpoint of the adaptation `run_dir`'s run stopped in holds, if it stopped in one
    (read here without torch: the driver does not import it)."""
    from dmea_dist.method.lifecycle import Stage
    from dmea_dist.state import StateError, load_state, task_folder

    try:
        state = load_state(run_dir)
    except StateError:
        return None
    if state.done or state.stage is not Stage.ADAPT:
        return None
    task = state.tasks[state.task_index]
    progress = run_dir / "tasks" / task_folder(task.index, task.task_id) / "adapt_checkpoint" / "adapt_progress.json"
    try:
        return int(json.loads(progress.read_text())["steps"]) or None
    except (OSError, ValueError, KeyError, TypeError):
        return None


def new_run_dir(config: RunConfig) -> Path:
    """output_dir/<name>-<time>-<random>: two runs started in the same second get different folders."""
    stamp = time.strftime("%Y%m%d-%H%M%S")
    while True:
        run_dir = Path(config.output_dir) / f"{config.name}-{stamp}-{secrets.token_hex(2)}"
        try:
            run_dir.mkdir(parents=True, exist_ok=False)
            return run_dir
        except FileExistsError:
            continue


_LOCKED: dict[Path, int] = {}  # the run directories this process holds the lock of, and how many times


@contextmanager
def run_lock(run_dir: Path, *, resume: bool = False) -> Iterator[None]:
    """Hold `run_dir/.lock` for this driver: a second one on the same run fails instead of mixing files.

    Reentrant in one process: `dmea resume` takes it before it starts Ray or rewrites the run's config.yaml,
    so a second resume of a running run is refused at once, and the run takes it again. `resume`: the refusal
    suggests stopping the other one, not another --run-dir (a resume has none)."""
    run_dir = Path(os.path.abspath(run_dir))
    if _LOCKED.get(run_dir):
        _LOCKED[run_dir] += 1
        try:
            yield
        finally:
            _LOCKED[run_dir] -= 1
        return
    run_dir.mkdir(parents=True, exist_ok=True)
    handle = open(run_dir / ".lock", "a+")  # noqa: SIM115 - held for the whole run
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        handle.seek(0)
        owner = handle.read().strip() or "another process"
        handle.close()
        instead = "or stop it first" if resume else "or choose another --run-dir"
        raise DmeaError(f"{run_dir} is in use by {owner}, a `dmea run` or `dmea resume` of it still running; "
                        f"wait for it to end {instead}") from None
    handle.seek(0)
    handle.truncate()
    handle.write(f"dmea pid {os.getpid()}\n")
    handle.flush()
    _LOCKED[run_dir] = 1
    try:
        yield
    finally:
        del _LOCKED[run_dir]
        fcntl.flock(handle, fcntl.LOCK_UN)
        handle.close()
