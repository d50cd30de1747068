"""Before and around a run: refuse a broken tracking store, count tracking failures.

A store that is broken before the run starts is bad input, not a transient
failure: a corrupt `mlflow.db` would give a run that looks tracked and is
not. `check_store` refuses it before any work, naming the database and the
fixes; it opens an existing SQLite file read-only first, so a damaged or
foreign file is never "repaired" by MLflow's table creation.
`count_failures` counts the warnings of a run so its end can say how much of
the record is missing.
"""

from __future__ import annotations

import contextlib
import sqlite3
import warnings
from collections.abc import Iterator, Sequence
from pathlib import Path

from dmea_dist.tracking.common import (
    TrackingError,
    TrackingWarning,
    _truncate,
    redact_uri,
    resolve_uri,
    sqlite_path,
)


def check_store(*, uri: str, experiment: str) -> None:
    """Refuse a tracking store that does not open, before any work (module docstring); TrackingError says why.

    A sqlite database that does not exist yet is fine (MLflow creates it) if
    its folder exists. One that exists must pass SQLite's quick_check, hold
    MLflow's tables (or none), and open in MLflow with `experiment` not deleted.
    """
    uri = resolve_uri(uri)
    db = sqlite_path(uri)
    where = str(db) if db is not None else redact_uri(uri)
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
    _probe_server(uri, fixes)
    try:
        from mlflow import MlflowClient

        found = MlflowClient(tracking_uri=uri, registry_uri=uri).get_experiment_by_name(experiment)
    except Exception as exc:  # MLflow wraps SQLAlchemy and HTTP errors in several types
        raise TrackingError(f"MLflow tracking store {where} does not open "
                            f"({_truncate(redact_uri(f'{type(exc).__name__}: {exc}'), 300)}); {fixes}") from None
    if found is not None and found.lifecycle_stage == "deleted":
        raise TrackingError(f"experiment {experiment!r} in {where} is deleted; restore it (mlflow experiments "
                            f"restore) or set tracking.experiment")


PROBE_TIMEOUT_S = 5.0


def _probe_server(uri: str, fixes: str) -> None:
    """An http(s) store that nothing answers at fails now: MLflow's client retries a refused connection with
    backoff for minutes before it gives up. Only a TCP connect; what answers is for MLflow to judge. Skipped
    where a proxy carries the requests (the proxy, not this machine, reaches the server)."""
    import socket
    import urllib.request
    from urllib.parse import urlsplit

    parts = urlsplit(uri)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        return
    if urllib.request.getproxies().get(parts.scheme) and not urllib.request.proxy_bypass(parts.hostname):
        return
    address = parts.netloc.rpartition("@")[2]  # host:port, without credentials
    try:
        port = parts.port or (443 if parts.scheme == "https" else 80)
        socket.create_connection((parts.hostname, port), timeout=PROBE_TIMEOUT_S).close()
    except (OSError, ValueError) as exc:  # refused, unknown host, timed out; a port that is no number
        raise TrackingError(f"MLflow tracking store {redact_uri(uri)} does not open: nothing answers at {address} "
                            f"({type(exc).__name__}: {exc}); {fixes}") from None


def check_parent_run(*, uri: str, experiment: str, run_id: str, recorded_in: str) -> None:
    """A resumed run's MLflow parent run `run_id` is in the store at `uri` (a resume that points tracking.uri
    elsewhere, e.g. where the database moved); TrackingError otherwise, before any work. A sqlite file that does
    not exist is refused without creating it: a mistyped path would start an empty database."""
    uri = resolve_uri(uri)
    fix = (f"point tracking.uri at the store the run was recorded in ({redact_uri(recorded_in)}, or where that "
           f"database is now), or start a new run")
    db = sqlite_path(uri)
    if db is not None and not db.is_file():
        raise TrackingError(f"tracking.uri {redact_uri(uri)!r}: {db} does not exist, so it cannot hold this run's MLflow "
                            f"parent run {run_id}; {fix}")
    check_store(uri=uri, experiment=experiment)  # opens, with MLflow's tables
    try:
        from mlflow import MlflowClient

        MlflowClient(tracking_uri=uri).get_run(run_id)
    except Exception as exc:  # noqa: BLE001 - MlflowException (not found) or the store's own errors
        raise TrackingError(f"tracking.uri {redact_uri(uri)!r} does not hold this run's MLflow parent run {run_id} "
                            f"({_truncate(redact_uri(f'{type(exc).__name__}: {exc}'), 200)}); {fix}") from None


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
    first = redact_uri(failures[0].removeprefix("MLflow tracking: "))
    return (f"tracking: {len(failures)} MLflow call(s) failed during this run, so its record at {redact_uri(uri)} is "
            f"incomplete (the run directory has every result); first: {_truncate(first, 300)}; once the store works, "
            f"`dmea resume RUN_DIR` (the run directory above) records the tasks whose record failed")
