"""A tracking server nobody answers at is refused at once: MLflow's client retries a refused connection
with backoff for ~4 minutes (MLFLOW_HTTP_REQUEST_MAX_RETRIES) before the job says anything."""

from __future__ import annotations

import socket
import time

import pytest

from dmea_dist.tracking import TrackingError, check_store


def _closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]  # closed again when this returns: nothing listens there


@pytest.fixture
def no_mlflow_client(monkeypatch):
    import mlflow

    class Client:
        def __init__(self, *a, **k):
            pytest.fail("reached MLflow's client, which retries a dead server for minutes")

    monkeypatch.setattr(mlflow, "MlflowClient", Client)


@pytest.mark.parametrize("scheme", ["http", "https"])
def test_a_server_that_refuses_the_connection_fails_the_check_at_once(no_mlflow_client, scheme):
    port = _closed_port()
    start = time.monotonic()
    with pytest.raises(TrackingError) as err:
        check_store(uri=f"{scheme}://alice:s3cret@127.0.0.1:{port}", experiment="dmea-dist")
    assert time.monotonic() - start < 10
    message = str(err.value)
    assert f"nothing answers at 127.0.0.1:{port}" in message and "--set tracking.uri=" in message
    assert "s3cret" not in message


def test_a_listening_server_is_left_to_mlflow(monkeypatch):
    """The probe only connects; whatever answers is MLflow's to judge (here a fake client)."""
    import mlflow

    seen = []

    class Client:
        def __init__(self, tracking_uri, registry_uri):
            seen.append(tracking_uri)

        def get_experiment_by_name(self, name):
            return None

    monkeypatch.setattr(mlflow, "MlflowClient", Client)
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen()
        uri = f"http://127.0.0.1:{server.getsockname()[1]}"
        check_store(uri=uri, experiment="dmea-dist")
    assert seen == [uri]
