"""Nothing secret leaves the process (params, config.yaml, warnings, errors, printed lines); registry names.

A tracking URI with `user:password@` and config values of secret-named keys
are redacted wherever they are written or printed; a run takes the
credentials out of its config into MLflow's environment variables. Task ids
map to valid, distinct MLflow aliases.
"""

from __future__ import annotations

import time
import warnings
from pathlib import Path

import pytest
import yaml

from dmea_dist.config import load_config
from dmea_dist.preflight import without_credentials
from dmea_dist.tracking import (
    Tracker,
    TrackingError,
    TrackingWarning,
    check_store,
    credentials_from_uri,
    failures_summary,
    redact_config,
    redact_uri,
    registered_model_name,
    task_alias,
    task_aliases,
)

pytestmark = pytest.mark.integration

SECRET = "s3cret-Pw"
URI = f"http://alice:{SECRET}@127.0.0.1:9/mlflow"  # port 9: nothing listens, refused at once
CONFIG = Path(__file__).resolve().parents[2] / "configs" / "quickstart.yaml"


@pytest.fixture(autouse=True)
def no_http_retries(monkeypatch):
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "5")


@pytest.mark.parametrize("text, expected", [
    (URI, "http://alice:***@127.0.0.1:9/mlflow"),
    ("https://tok_abc@host/x", "https://***@host/x"),  # a token passed as the user name
    ("see postgresql://u:p%40ss@db:5432/mlflow and more", "see postgresql://u:***@db:5432/mlflow and more"),
    ("https://h/x?token=abc&page=2", "https://h/x?token=***&page=2"),
    ("https://h/a?X-Amz-Signature=ff&sig=1", "https://h/a?X-Amz-Signature=***&sig=***"),
    ("sqlite:////tmp/mlflow.db", "sqlite:////tmp/mlflow.db"),
    ("http://127.0.0.1:5000", "http://127.0.0.1:5000"),
])
def test_redact_uri(text, expected):
    assert redact_uri(text) == expected


def test_credentials_leave_the_uri_and_secret_keys_are_redacted():
    assert credentials_from_uri(URI) == ("http://127.0.0.1:9/mlflow", "alice", SECRET)
    assert credentials_from_uri("sqlite:///mlflow.db") == ("sqlite:///mlflow.db", None, None)
    config = {"tracking": {"uri": URI}, "db_password": "pw1", "hub": {"token": "t1", "max_new_tokens": 64},
              "tokenizer": "gpt2", "notes": ["http://bob:pw2@x/"]}
    assert redact_config(config) == {
        "tracking": {"uri": "http://alice:***@127.0.0.1:9/mlflow"}, "db_password": "***",
        "hub": {"token": "***", "max_new_tokens": 64}, "tokenizer": "gpt2", "notes": ["http://bob:***@x/"]}


def test_a_run_takes_credentials_into_the_environment(monkeypatch, capsys):
    for name in ("MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD"):
        monkeypatch.delenv(name, raising=False)
    config = load_config(CONFIG, [f"tracking.uri={URI}"])
    clean = without_credentials(config)
    assert clean.tracking.uri == "http://127.0.0.1:9/mlflow" and SECRET not in yaml.safe_dump(clean.to_dict())
    import os

    assert os.environ["MLFLOW_TRACKING_USERNAME"] == "alice" and os.environ["MLFLOW_TRACKING_PASSWORD"] == SECRET
    err = capsys.readouterr().err
    assert "carries credentials" in err and SECRET not in err
    assert without_credentials(clean) is clean


def test_params_and_config_artifact_hold_no_secret(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    config = {"tracking": {"uri": URI}, "hub": {"api_key": "k-123"}, "train": {"lr": 0.1}}
    with warnings.catch_warnings():
        warnings.simplefilter("error", TrackingWarning)
        tracker = Tracker(experiment="secrets")
        parent = tracker.start_sequence(run_name="r", config=config, tasks=["a"])
        tracker.finish_sequence()
    from mlflow import MlflowClient

    client = MlflowClient(f"sqlite:///{tmp_path}/mlflow.db")
    params = client.get_run(parent).data.params
    assert params["tracking.uri"] == "http://alice:***@127.0.0.1:9/mlflow" and params["hub.api_key"] == "***"
    saved = Path(client.download_artifacts(parent, "config.yaml", str(tmp_path))).read_text()
    assert SECRET not in saved and "k-123" not in saved and "lr: 0.1" in saved


def test_warnings_and_errors_name_the_store_without_its_password(tmp_path):
    with pytest.warns(TrackingWarning) as said:
        tracker = Tracker(uri=URI)
    assert not tracker.active
    assert all(SECRET not in str(w.message) for w in said) and "alice:***@" in str(said[0].message)
    with pytest.raises(TrackingError) as err:
        check_store(uri=URI, experiment="x")
    assert SECRET not in str(err.value) and "127.0.0.1:9" in str(err.value)
    summary = failures_summary([f"MLflow tracking: connecting to {URI} failed"], uri=URI)
    assert SECRET not in summary and "alice:***@" in summary


@pytest.mark.parametrize("task_id", ["synth.restaurant.00", "rnnlg.hotel", "e2e", "v1", "V22", "latest",
                                     "my task/ü.x", "..", "a" * 300])
def test_task_aliases_are_valid_mlflow_aliases(task_id):
    from mlflow.utils import validation

    # MLflow's own checks (private: 3.18 renamed them from _validate_model_alias_name*, which 3.17 has)
    valid = getattr(validation, "_validate_alias_name", None) or validation._validate_model_alias_name
    not_reserved = (getattr(validation, "_validate_alias_name_reserved", None)
                    or validation._validate_model_alias_name_reserved)
    alias = task_alias(task_id)
    valid(alias)  # raises on a bad one
    not_reserved(alias)
    assert task_alias(task_id) == alias  # deterministic


def test_aliases_within_a_run_are_distinct_and_names_are_per_run():
    assert task_alias("synth.restaurant.00") == "synth-restaurant-00"
    aliases = task_aliases(["a.b", "a-b", "e2e"])
    assert aliases == {"a.b": "a-b-t0", "a-b": "a-b-t1", "e2e": "e2e"}
    assert registered_model_name("quickstart", "dmea", "quickstart-20261202-082536-10ab") == \
        "quickstart-dmea-20261202-082536-10ab"
    assert registered_model_name("q", "acm", "my run") == "q-acm-my-run"


def test_embedded_ray_dashboard_answers_on_loopback_only():
    """`dmea run`'s embedded Ray (distributed/cluster.py connect) binds its dashboard and job API to 127.0.0.1."""
    import urllib.error
    import urllib.request

    import ray

    from dmea_dist.distributed.cluster import connect

    if ray.is_initialized():
        pytest.skip("Ray already runs in this process")
    assert connect(num_cpus=1, dashboard=True) == "local"
    try:
        url = ray.get_runtime_context().dashboard_url if hasattr(ray.get_runtime_context(), "dashboard_url") \
            else ray._private.worker.global_worker.node.address_info["webui_url"]
        host, port = url.removeprefix("http://").rsplit(":", 1)
        assert host == "127.0.0.1"
        try:  # it is up, on loopback (and with Ray >= 2.59's token auth, closed without the token)
            urllib.request.urlopen(f"http://127.0.0.1:{port}/api/version", timeout=30)
        except urllib.error.HTTPError as err:
            assert err.code == 401
        import psutil

        # who listens on the dashboard port, read from the kernel's socket table (no traffic)
        listening = {c.laddr.ip for c in psutil.net_connections(kind="tcp")
                     if c.status == psutil.CONN_LISTEN and c.laddr.port == int(port)}
        assert listening == {"127.0.0.1"}, listening
    finally:
        ray.shutdown()


def test_embedded_ray_without_a_dashboard_starts_none_of_its_modules():
    """`ray.dashboard` off (the default where no State API is needed): Ray's head runs no dashboard modules,
    the processes that cost a 2-core machine ~2 s of CPU at start-up; on, it runs them (the test above)."""
    import psutil
    import ray

    from dmea_dist.distributed.cluster import connect, ray_dashboard_url

    if ray.is_initialized():
        pytest.skip("Ray already runs in this process")

    def dashboard_modules() -> int:
        return sum(1 for p in psutil.Process().children(recursive=True) if p.name().startswith("ray-dashboard"))

    up_after = 0.0
    for dashboard in (True, False):
        start = time.time()
        assert connect(num_cpus=1, dashboard=dashboard) == "local"
        try:
            assert (ray_dashboard_url() is not None) == dashboard
            if dashboard:  # the modules start in the background after ray.init returns
                while dashboard_modules() == 0 and time.time() < start + 60:
                    time.sleep(0.2)
                up_after = time.time() - start
            else:  # twice as long as they took to appear with the dashboard on
                time.sleep(max(0.0, start + 2 * up_after - time.time()))
            assert (dashboard_modules() > 0) == dashboard
        finally:
            ray.shutdown()
        assert ray_dashboard_url() is None  # gone with the Ray that served it


EMBEDDED_AUTH = """
import ray
from ray._private.authentication.authentication_utils import get_authentication_mode, get_authentication_mode_name

from dmea_dist.distributed.cluster import connect

connect(num_cpus=1)
assert ray.get(ray.remote(lambda: 1).remote()) == 1  # the driver talks to its cluster, whatever the mode
print(get_authentication_mode_name(get_authentication_mode()))
"""


def test_embedded_ray_keeps_token_authentication_on_without_ray_notice_about_it_in_every_run(tmp_path):
    """Ray turns token authentication on for a new local cluster and says so, in every `dmea run`; the
    embedded Ray keeps it on and drops the notice (a log filter: a user's RAY_AUTH_MODE stands as Ray takes
    it). In a fresh process: Ray sets RAY_AUTH_MODE in its own process once a local cluster starts."""
    import os
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if k not in ("RAY_AUTH_MODE", "RAY_ADDRESS")}
    out = subprocess.run([sys.executable, "-c", EMBEDDED_AUTH], env=env, capture_output=True, text=True,
                         timeout=120, cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split()[-1] == "token", out.stdout
    assert "Token authentication is enabled" not in out.stderr, out.stderr
