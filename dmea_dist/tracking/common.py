"""Names, limits and pure helpers every part of `dmea_dist.tracking` shares (no MLflow import).

Keys and values as MLflow accepts them (`mlflow_key`, `flatten`), store URIs
(`resolve_uri`, `sqlite_path`), secrets kept out of everything written or
printed (`redact_uri`, `redact_config`), and registry aliases for task ids
(`task_alias`).
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Mapping, Sequence
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
MODEL_ARTIFACT = "model"  # a task's pyfunc model, registered with an alias
ALIAS_TAG = "dmea.alias"
RUN_STATUSES = ("FINISHED", "FAILED", "KILLED")
_TRUNCATED = "...[truncated]"


class TrackingWarning(UserWarning):
    """A tracking call failed; training goes on and the record may be incomplete."""


class TrackingError(DmeaError, RuntimeError):
    """Reading a recorded run failed (missing experiment, run or artifacts)."""


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


# --------------------------------------------------------------------------- secrets

REDACTED = "***"
# userinfo of a URI: scheme://user:password@host (also user@host for tokens passed as the user name)
_USERINFO = re.compile(r"(?P<scheme>[A-Za-z][A-Za-z0-9+.\-]*://)(?P<user>[^/@:\s]*)(?::(?P<password>[^/@\s]*))?@")
# query parameters that carry secrets: ?token=..., &password=..., access_token, api_key, sig (signed URLs)
_SECRET_QUERY = re.compile(r"(?i)([?&;](?:[\w.\-]*(?:token|password|passwd|secret|api[_-]?key|signature|credential)|sig)=)[^&;#\s]*")
# a key whose last word names a secret: password, db_password, mlflow_token, api_key, aws_secret_access_key
_SECRET_KEY = re.compile(r"(?i)(^|[_\-])(password|passwd|secret|token|api_?key|access_key|credentials?)$")


def redact_uri(text: str) -> str:
    """`text` with the password of every `scheme://user:password@` and secret query values replaced by ***.

    Works on any string that contains URIs (messages, exceptions), so it can
    wrap whatever is printed or logged. The user name stays (it says whose
    credentials to look up); a bare `scheme://token@host` (no colon) hides
    the token, since some services take the token as the user name.
    """
    def userinfo(match: re.Match) -> str:
        if match.group("password") is not None:
            return f"{match.group('scheme')}{match.group('user')}:{REDACTED}@"
        return f"{match.group('scheme')}{REDACTED}@"

    return _SECRET_QUERY.sub(lambda m: m.group(1) + REDACTED, _USERINFO.sub(userinfo, str(text)))


def redact_config(value: Any, key: str = "") -> Any:
    """A config (nested dicts/lists) with secrets redacted: URIs' passwords, values of secret-named keys."""
    if isinstance(value, Mapping):
        return {k: redact_config(v, str(k)) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [redact_config(v, key) for v in value]
    if isinstance(value, str):
        return REDACTED if value and _SECRET_KEY.search(key.rsplit(".", 1)[-1]) else redact_uri(value)
    return value


def credentials_from_uri(uri: str) -> tuple[str, str | None, str | None]:
    """(uri without userinfo, user, password): where a run takes credentials out of its config.

    MLflow reads MLFLOW_TRACKING_USERNAME / MLFLOW_TRACKING_PASSWORD for HTTP
    basic auth, so a URI without them authenticates the same way once they
    are in the environment, and the config the run writes holds no secret.
    """
    match = _USERINFO.search(uri)
    if match is None or not uri.startswith(match.group(0)):
        return uri, None, None
    return uri[: len(match.group("scheme"))] + uri[match.end():], match.group("user") or None, match.group("password")


# --------------------------------------------------------------------------- registry names

_ALIAS_BAD = re.compile(r"[^A-Za-z0-9_\-]+")
_RESERVED_ALIAS = re.compile(r"^(latest|[vV]\d+)$", re.IGNORECASE)
MAX_ALIAS_LENGTH = 255


def search_runs(client, experiment_id: str, filter_string: str) -> list:
    """Every run of `experiment_id` that `filter_string` matches, over all of MLflow's result pages."""
    runs, token = [], None
    while True:
        page = client.search_runs([experiment_id], filter_string=filter_string, page_token=token)
        runs.extend(page)
        token = page.token
        if not token:
            return runs


def task_alias(task_id: str) -> str:
    """The registry alias of a task: every run of characters outside [A-Za-z0-9_-] becomes "-".

    MLflow aliases allow only alphanumerics, "_" and "-" and reserve "latest"
    and "v<digits>", so `synth.restaurant.00` -> `synth-restaurant-00`,
    `rnnlg.hotel` -> `rnnlg-hotel`, `e2e` stays; a reserved or empty result is
    prefixed `task-`; one over 255 characters is cut with a hash suffix.
    Deterministic: the same task id always gives the same alias.
    """
    alias = _ALIAS_BAD.sub("-", str(task_id)).strip("-")
    if not alias or _RESERVED_ALIAS.match(alias):
        alias = f"task-{alias}".rstrip("-")
    if len(alias) > MAX_ALIAS_LENGTH:
        alias = f"{alias[: MAX_ALIAS_LENGTH - 9]}-{hashlib.sha1(str(task_id).encode()).hexdigest()[:8]}"
    return alias


def task_aliases(task_ids: Sequence[str]) -> dict[str, str]:
    """{task id: alias} for a run's tasks; two ids that map to one alias both get `-t<index>` appended."""
    aliases = {task: task_alias(task) for task in task_ids}
    counts: dict[str, int] = {}
    for alias in aliases.values():
        counts[alias] = counts.get(alias, 0) + 1
    return {task: f"{alias}-t{index}" if counts[alias] > 1 else alias
            for index, (task, alias) in enumerate(aliases.items())}


def registered_model_name(config_name: str, method: str, run_name: str) -> str:
    """One registered model per run: `<config name>-<method>-<time>-<suffix>` (the run folder's stamp)."""
    stamp = run_name.removeprefix(f"{config_name}-")
    name = f"{config_name}-{method}-{stamp}"
    return re.sub(r"[^\w.\-]+", "-", name)
