"""Drive one lifelong run: coordinator + tracking + the final report, resumable.

`run_sequence` is what `dmea run` and the Ray job entry point call, and
`resume_sequence` what `dmea resume` calls. The story: take the run
directory (new, unique, locked against a second driver), start the
coordinator (in process, or as a Ray actor), open or reattach the MLflow
parent run, step the stages (progress per stage and task), record every
finished task in a nested MLflow run exactly once (the driver is the only
process that talks to MLflow; a record cut short by a tracking failure is
made again at the next resume), and end with the R matrix, the
continual-learning metrics and a Markdown/HTML report in the run directory.

Stops are safe: Ctrl-C stops after the stage in progress with the state
saved, SIGTERM and SIGHUP (a closed terminal) at once, as a second Ctrl-C; a
failure leaves the state at the last finished stage; either way the MLflow
runs are marked (KILLED, FAILED), never left RUNNING, and the message says
how to resume. A killed driver leaves the state on disk too: `dmea resume
RUN_DIR` continues in the same parent run.
"""

from __future__ import annotations

import io
import json
import os
import shutil
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from dmea_dist.config import RunConfig
from dmea_dist.errors import DmeaError
from dmea_dist.evaluation import continual, report
from dmea_dist.method.lifecycle import Stage
from dmea_dist.preflight import (
    check_input,
    check_resume,
    new_run_dir,
    resume_command,
    resume_config,
    run_lock,
    with_absolute_paths,
    without_credentials,
)
from dmea_dist.progress import StageProgress, task_summary
from dmea_dist.stops import StopRequest
from dmea_dist.typed_yaml import dump_yaml


@dataclass
class SequenceResult:
    run_dir: Path
    tasks: list[str]
    R: np.ndarray
    metrics: dict[str, float]
    parent_run_id: str | None
    history: list[dict[str, Any]]


CoordinatorFactory = Callable[..., Any]  # (config, run_dir, *, resume, progress) -> a Coordinator or its remote handle


class RunStopped(DmeaError):
    """The run was stopped (Ctrl-C) at a stage boundary; its state is saved and it can be resumed."""


def own_error(err: BaseException) -> BaseException:
    """`err`, or the DmeaError it is on Ray: an error raised in a Ray task comes back as RayTaskError(<its
    class>), whose str is a traceback; the error itself is its `cause`."""
    return err.cause if isinstance(getattr(err, "cause", None), DmeaError) else err


def report_error(err: DmeaError) -> int:
    """Print `err` in one line on stderr, as `dmea` and the Ray job entry point do; returns the exit code
    (130 for a stopped run, 2 for the rest). On Ray, the error itself (`own_error`)."""
    err = own_error(err)
    if isinstance(err, RunStopped) and str(err).startswith("stopped"):  # "stopped by Ctrl-C ...", not "stopped: stopped"
        print(err, file=sys.stderr)
    else:
        print(f"{'stopped' if isinstance(err, RunStopped) else 'error'}: {err}", file=sys.stderr)
    return 130 if isinstance(err, RunStopped) else 2


def run_sequence(config: RunConfig, *, run_dir: str | Path | None = None,
                 coordinator_factory: CoordinatorFactory | None = None, progress: bool = True,
                 echo: Callable[[str], None] = print, check: bool = True,
                 started: float | None = None) -> SequenceResult:
    """Run the whole task sequence of `config` in a new run directory; returns the R matrix and metrics.

    `coordinator_factory` makes what steps the stages: by default an in-process
    `Coordinator`; `dmea run` on Ray passes one that starts it as an actor.
    `check`: refuse bad input first (`check_input`), before anything is written;
    False when the caller has just done it. `started`: when the command began (`time.time()`; the CLI and the Ray
    job pass their process's start), from which the run's time line counts its one-time start-up.
    """
    from dmea_dist.state import STATE_FILE

    if check:
        check_input(config)
    config = with_absolute_paths(without_credentials(config))

    # absolute, as on Ray (the coordinator actor's): `--run-dir .` would name the MLflow run and the registered
    # model after "", and the records would hold paths that mean nothing from another directory
    run_dir = Path(os.path.abspath(run_dir)) if run_dir else None
    ours = run_dir is None or not run_dir.exists()  # a folder this run makes: removed if it never starts
    run_dir = run_dir or new_run_dir(config)
    if (run_dir / STATE_FILE).exists():
        raise DmeaError(f"{run_dir} already holds a run; continue it with `dmea resume {run_dir}` "
                        f"or choose another --run-dir")
    return _drive(config, run_dir, resume=False, coordinator_factory=coordinator_factory, progress=progress,
                  echo=echo, remove_unstarted=ours, started=started)


def resume_sequence(run_dir: str | Path, *, overrides: list[str] | None = None,
                    coordinator_factory: CoordinatorFactory | None = None, progress: bool = True,
                    echo: Callable[[str], None] = print, check: bool = True,
                    saved: list[str] | None = None, started: float | None = None) -> SequenceResult:
    """Continue the run in `run_dir` from its last finished stage, in the same MLflow parent run.

    `check`: refuse a tracking store that cannot take the run first (`check_resume`); False when the caller
    has just done it (before starting Ray). `saved`: the overrides written into the run's config.yaml for
    later resumes (default: all of `overrides`); the user's `--set`s, not the sizes a cluster gave them.
    `started`: as `run_sequence`'s.
    """
    from dmea_dist.files import write_text
    from dmea_dist.state import load_state

    run_dir = Path(os.path.abspath(run_dir))  # `dmea resume .`: the run's own name, as when it started (run_sequence)
    state = load_state(run_dir)  # a clear error if this is no run directory
    # an override's relative path (`--set data.root=../corpora`) from here, as `dmea run` resolves the config's
    # its note on other threads or ranks only where the caller has not said it (`dmea resume` checked first)
    config = with_absolute_paths(resume_config(run_dir, overrides or [], note=check))
    if check:
        check_resume(run_dir, config)
    saved = list(overrides or []) if saved is None else list(saved)
    with run_lock(run_dir, resume=True):  # a running run's config.yaml is not rewritten by a second resume
        state = load_state(run_dir)  # as the lock's holder left it
        kept = with_absolute_paths(resume_config(run_dir, saved, note=False))
        if kept != with_absolute_paths(resume_config(run_dir, [], note=False)):
            # what this resume moved (the store, the corpus, the sizes asked for) holds for the rest of the run: a
            # later plain `dmea resume` would go back to the old store and split the run's records between two
            write_text(run_dir / "config.yaml", dump_yaml(kept.to_dict()))
            echo(f"{run_dir / 'config.yaml'} now records {', '.join(saved)}")
        echo(f"resuming {run_dir} at task {state.task_index + 1}/{len(state.tasks)} "
             f"({state.tasks[min(state.task_index, len(state.tasks) - 1)].task_id}), stage {state.stage.value}")
        return _drive(config, run_dir, resume=True, coordinator_factory=coordinator_factory, progress=progress,
                      echo=echo, started=started)


def local_coordinator(config: RunConfig, run_dir: Path, *, resume: bool, progress=None):
    from dmea_dist.coordinator import Coordinator

    return Coordinator(config, run_dir, resume=resume, progress=progress)


def _drive(config: RunConfig, run_dir: Path, *, resume: bool, coordinator_factory: CoordinatorFactory | None,
           progress: bool, echo: Callable[[str], None], remove_unstarted: bool = False,
           started: float | None = None) -> SequenceResult:
    """`remove_unstarted`: a new run's folder, made for it, is removed if the run fails or is stopped before
    its coordinator is built (a cluster too small for its pools, `ray job stop` at start-up): nothing ran,
    nothing was recorded, and a folder left "running" at task 1 would only look like a live run."""
    from dmea_dist.tracking import Tracker, registered_model_name, task_aliases

    clock = {"started": time.time() if started is None else started, "from_command": started is not None}
    stop = StopRequest()
    with run_lock(run_dir), stop.on_termination():
        bar = StageProgress(config.data.tasks, enabled=progress)
        coordinator = None
        try:
            # the coordinator first: on Ray its actor imports and builds the run while the driver opens MLflow
            # (2-4 s: its import, a new database's tables), instead of after
            coordinator = (coordinator_factory or local_coordinator)(config, run_dir, resume=resume, progress=bar)
            tracker = Tracker(uri=config.tracking.uri, experiment=config.tracking.experiment,
                              enabled=config.tracking.enabled)
            # the first call: on Ray an error building the run (a damaged snapshot) arrives here, and it fails
            # the command as it does in process, where the factory raises it; nothing has started to stop
            coordinator.tracking()
        except BaseException:  # Ctrl-C while connecting: leave no coordinator (or Ray actor) behind
            if coordinator is not None:
                _try(coordinator.close)
            if remove_unstarted:
                shutil.rmtree(run_dir, ignore_errors=True)
            raise
        stepped = False
        try:
            parent = _open_tracking(tracker, coordinator, config, run_dir)
            _record_unrecorded(tracker, coordinator, config)
            clock["first_stage"] = time.time()
            with stop.on_sigint(echo):
                _step_until_done(coordinator, tracker, config, bar, stop, echo)
            clock["last_stage"] = time.time()
            results = coordinator.results()
            stepped = True
        except BaseException as err:
            with stop.recording():  # Ctrl-C pressed again and again, a SIGHUP after a SIGTERM: recorded all the same
                stop_message = _stop_message(err, stop)
                stopped = stop_message is not None
                bar.close(ended="stopped" if stopped else "failed")
                message = stop_message or str(own_error(err)) or type(err).__name__
                _try(lambda: coordinator.mark("stopped" if stopped else "failed", message))
                tracker.finish_sequence(status="KILLED" if stopped else "FAILED")
                echo(f"{'stopped' if stopped else 'failed'}: the state of {run_dir} is saved at its last finished "
                     f"stage; continue with: {resume_command(run_dir)}")
            raise
        finally:
            if not stepped:
                with stop.recording():
                    _try(coordinator.close)
        # every stage is done; what is left (closing the workers, R, the report, the sequence metrics) takes 1-3 s,
        # and a Ctrl-C, SIGTERM or SIGHUP there must not leave the parent run RUNNING either, nor end without a word
        try:
            _try(coordinator.close)
            bar.close()
            R, names = results["R"], config.data.tasks
            metrics = sequence_metrics(R, baseline=results.get("baseline"), every=config.eval.every)
            figures = write_reports(run_dir, config, R, metrics, similarity=results["similarity"],
                                    paths=results["paths"])
            reports = {"report": run_dir / "report.md", "report_html": run_dir / "report.html",
                       "report/report_files": figures} if figures else {}
            tracker.log_sequence_metrics(metrics, artifacts={**reports, "R": run_dir / "R.npy"})
            tracker.finish_sequence(status="FINISHED")
        except BaseException as err:
            with stop.recording():
                stopped = _stop_message(err, stop) is not None
                tracker.finish_sequence(status="KILLED" if stopped else "FAILED")
                echo(f"{'stopped' if stopped else 'failed'} while writing the results of {run_dir}: every task is "
                     f"done and saved; write them with: {resume_command(run_dir)}")
            raise

    print_results(echo, names, R, metrics, metric=config.eval.metric, method=config.method.name)
    echo(time_line(clock, time.time(), resume=resume))
    echo(where_line(run_dir, config))
    if tracker.active:
        name = registered_model_name(config.name, config.method.name, run_dir.name)
        first = task_aliases(names)[names[0]]
        echo(f"registered models: models:/{name}@<task alias>, e.g. models:/{name}@{first} "
             f"(dmea generate models:/{name}@{first} INPUT...)")
    return SequenceResult(run_dir=run_dir, tasks=names, R=R, metrics=metrics, parent_run_id=parent,
                          history=results["history"])


def _stop_message(err: BaseException, stop: StopRequest) -> str | None:
    """What stopped the run ("stopped by SIGHUP", ...), None where `err` is a failure."""
    if stop.signal is not None:
        return f"stopped by {stop.signal.name}"
    if isinstance(err, SystemExit):  # no signal noted: Ray's own SIGTERM handler (sys.exit), where ours was not set
        return "stopped by SIGTERM"
    if isinstance(err, KeyboardInterrupt):
        return "stopped by Ctrl-C"
    return str(err) if isinstance(err, RunStopped) else None


def command_started() -> float:
    """When this process started (`time.time()`'s clock): the command's own start, imports included."""
    import psutil

    return psutil.Process().create_time()


def time_line(clock: dict[str, float], end: float, *, resume: bool) -> str:
    """Where the command's time went: the one-time start-up (until the first stage), the stages, the finish
    (issue 9: start-up is paid once per run, and shown). `clock`: started, first_stage, last_stage (time.time());
    `from_command`: `started` is the command's own start (its imports, input check and a first run's backbone
    pretraining count), else the drive's."""
    before = ("imports, input check, the backbone, Ray, the coordinator" if clock["from_command"]
              else "the coordinator and tracking")
    stages = "the rest of the stages" if resume else "the stages"
    return (f"\ntime: {end - clock['started']:.1f} s: {clock['first_stage'] - clock['started']:.1f} s to start ({before}; "
            f"once per run), {clock['last_stage'] - clock['first_stage']:.1f} s in {stages}, "
            f"{end - clock['last_stage']:.1f} s to finish (the report, the records)")


def where_line(run_dir: Path, config: RunConfig) -> str:
    """The run's last line but one: its folder, its report and where MLflow recorded it (nowhere when off)."""
    from dmea_dist.tracking import redact_uri

    tracking = redact_uri(config.tracking.uri) if config.tracking.enabled else "off (tracking.enabled: false)"
    return f"\nrun directory: {run_dir}   report: {run_dir / 'report.html'}   tracking: {tracking}"


def _step_until_done(coordinator, tracker, config: RunConfig, bar: StageProgress, stop: StopRequest,
                     echo: Callable[[str], None]) -> None:
    n_tasks = len(config.data.tasks)
    out = {"done": coordinator.state_position()["done"], "next": coordinator.state_position()["next"]}
    while not out["done"]:
        if stop.requested:
            task_index, stage = out["next"]
            raise RunStopped(f"stopped by Ctrl-C before stage {stage} of task {task_index + 1}/{n_tasks} "
                             f"({config.data.tasks[task_index]})")
        bar.start(out["next"][0], Stage(out["next"][1]))
        out = coordinator.step()
        bar.close()
        for warning in out["finished"].get("warnings", []):
            echo(f"WARNING: {warning}")
        rec = out["record"]
        if rec is not None:
            _record(tracker, coordinator, config, rec)
            history = [h for h in coordinator.results()["history"] if h["task_index"] == rec["task_index"]]
            echo(task_summary(rec, history, n_tasks=n_tasks))
            sys.stdout.flush()  # in a log (not a terminal), beside the progress lines on stderr


def _open_tracking(tracker, coordinator, config: RunConfig, run_dir: Path) -> str | None:
    """The parent run: reattached when the state names one, else created (and named in the state)."""
    parent = coordinator.tracking()["parent"]
    if parent is not None:
        return tracker.resume_sequence(parent)
    parent = tracker.start_sequence(run_name=run_dir.name, config=config.to_dict(), tasks=config.data.tasks,
                                    tags={"method": config.method.name})
    if parent is not None:
        coordinator.set_tracking(parent=parent)
    tracker.log_sequence_metrics({}, artifacts={name: run_dir / name for name in ("tokenizer", "backbone")
                                                 if (run_dir / name).exists()})
    return parent


def _record(tracker, coordinator, config: RunConfig, rec: dict[str, Any]) -> None:
    """The task's nested MLflow run; its pyfunc model registered as `models:/<run's model>@<task alias>`."""
    with _servable(tracker, config, rec) as servable:
        run_id = tracker.record_task(task_index=rec["task_index"], task_id=rec["task_id"], params=rec["params"],
                                     metrics=rec["metrics"], series=rec["series"], artifacts=rec["artifacts"],
                                     model_dir=rec.get("model_dir"), servable=servable,
                                     registered_model=servable.model_tags["dmea.registered_model"]
                                     if servable else None)
    if run_id is not None:
        coordinator.set_tracking(task_id=rec["task_id"], run_id=run_id)


@contextmanager
def _servable(tracker, config: RunConfig, rec: dict[str, Any]) -> Iterator[Any]:
    """The task alone as a run folder (a temporary copy) for its registered model; None when untracked."""
    if not tracker.active or not rec.get("model_dir"):
        yield None
        return
    import tempfile

    from dmea_dist.serving import stage_task
    from dmea_dist.tracking import registered_model_name, task_aliases, warn_failure
    from dmea_dist.tracking.registry import ServableTask

    run_dir = Path(rec["model_dir"]).parents[2]  # <run_dir>/tasks/NNN-<task>/modules
    name = registered_model_name(config.name, config.method.name, run_dir.name)
    with tempfile.TemporaryDirectory(prefix="dmea-servable-") as tmp:
        try:
            folder = stage_task(run_dir, rec["task_id"], Path(tmp) / "run")
        except Exception as err:  # tracking never stops the run (a full /tmp, a lamol backbone too big)
            warn_failure(f"staging {rec['task_id']}'s model for the registry", err,
                         "the task is recorded without a registered model; the run goes on", stacklevel=3)
            yield None
            return
        yield ServableTask(folder=folder, alias=task_aliases(config.data.tasks)[rec["task_id"]],
                           path=rec["params"].get("path"),
                           model_tags={"dmea.registered_model": name, "dmea.config": config.name,
                                       "dmea.method": config.method.name, "dmea.run_dir": str(run_dir)})


def _record_unrecorded(tracker, coordinator, config: RunConfig) -> None:
    """After a crash: record each finished task that has no complete (FINISHED) MLflow run, the one readers
    and `dmea generate RUN_ID` take. Its run is missing from the state (the driver died while recording it), or
    the state names one that ended FAILED (a part failed to record) or was left RUNNING (its end call failed)
    and then ended KILLED by `Tracker.resume_sequence`; `Tracker.record_task` records it into that run again.
    A FINISHED run MLflow holds for the task is kept."""
    if not tracker.active or tracker.parent_run_id is None:
        return
    records = coordinator.records()
    if not records:
        return
    known = coordinator.tracking()["tasks"]
    from dmea_dist.tracking import find_task_runs, warn_failure

    try:
        finished = {r["task_id"]: r["run_id"] for r in find_task_runs(
            uri=config.tracking.uri, experiment=config.tracking.experiment, parent_run_id=tracker.parent_run_id)}
    except Exception as err:  # unknown what MLflow holds: record nothing twice, try again at the next resume
        missing = [rec["task_id"] for rec in records if known.get(rec["task_id"]) is None]
        if missing:  # the runs the state names stay as they are
            warn_failure(f"looking up the records of {missing}", err,
                         "they stay unrecorded until a later `dmea resume` finds the store; the run goes on",
                         stacklevel=3)
        return
    for rec in records:
        run_id = finished.get(rec["task_id"])
        if run_id is None:
            _record(tracker, coordinator, config, rec)
        elif known.get(rec["task_id"]) != run_id:  # recorded just before the driver died: keep that one
            coordinator.set_tracking(task_id=rec["task_id"], run_id=run_id)


def _try(call: Callable[[], Any]) -> None:
    try:
        call()
    except Exception as err:  # noqa: BLE001 - cleanup after another error must not hide it
        print(f"warning: {str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__}",
              file=sys.stderr)  # the first line: a Ray error's details follow the error it is about


def write_reports(run_dir: Path, config: RunConfig, R: np.ndarray, metrics: dict[str, float], *,
                  similarity: np.ndarray, paths: dict[str, list[int]] | None) -> Path | None:
    """R.npy, metrics.json, then the report (report.html, report.md, report_files/) read back from `run_dir`.

    Returns the figures folder, or None when the report could not be drawn: the
    results are saved either way, and `dmea report RUN_DIR` draws it later.
    `similarity` and `paths` are in the run's state, which the report reads.
    """
    from dmea_dist.evaluation.pages import write_report
    from dmea_dist.files import write_bytes, write_text

    # atomic, like state.json: a run killed while writing them (or resumed, finished) keeps the previous ones
    buffer = io.BytesIO()
    np.save(buffer, R)
    write_bytes(run_dir / "R.npy", buffer.getvalue())
    write_text(run_dir / "metrics.json", json.dumps(metrics, indent=1))
    try:
        return write_report([run_dir]).figures
    except Exception as err:  # noqa: BLE001 - a figure must not fail a finished run
        print(f"warning: the report of {run_dir} could not be drawn ({type(err).__name__}: {err}); the results "
              f"are saved: try `dmea report {run_dir}`", file=sys.stderr)
        return None


def print_results(echo: Callable[[str], None], names: list[str], R: np.ndarray, metrics: dict[str, float], *,
                  metric: str, method: str | None = None) -> None:
    """The end of a run: R as a table, the metrics, and why BWT and forgetting are missing when they are."""
    echo(f"\nR matrix ({metric}, row j = after training task j):")
    # as wide as the terminal (a log: 120 columns); a longer sequence gets one line per task, not 50 columns
    echo(report.format_matrix_table(names, R, width=shutil.get_terminal_size((120, 24)).columns))
    echo("\n" + "  ".join(f"{k}={v:.2f}" for k, v in metrics.items()))
    if "bwt" not in metrics and (why := continual.why_no_bwt(R, method=method)):
        echo(why)


def sequence_metrics(R: np.ndarray, *, baseline: np.ndarray | None = None, every: int = 1) -> dict[str, float]:
    """Final average, BWT and forgetting where the R matrix has what they need; FWT when tasks were
    also evaluated before they were trained (`eval.all_tasks`) against the untrained `baseline`.
    `every`: eval.every (the rows that scored only the task just trained)."""
    return continual.measured(R, baseline=baseline, every=every)
