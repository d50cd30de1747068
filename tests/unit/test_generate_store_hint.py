"""`dmea generate models:/...` or RUN_ID without a store at the default sqlite:///mlflow.db names the option
that points it elsewhere (--tracking-uri, $MLFLOW_TRACKING_URI), not the run config's key."""

from __future__ import annotations

import pytest

from dmea_dist.errors import DmeaError
from dmea_dist.serving import load_task_model


@pytest.mark.parametrize("source", ["models:/quickstart-dmea-20261207-023917-d412@synth-restaurant-00",
                                    "d3ce973777f542cf86848061be7df4ef"])
def test_a_missing_default_store_names_the_tracking_uri_option(tmp_path, monkeypatch, source):
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    with pytest.raises(DmeaError) as err:
        load_task_model(source)
    message = str(err.value)
    assert f"no MLflow database at 'sqlite:///{tmp_path / 'mlflow.db'}'" in message
    assert "--tracking-uri" in message and "MLFLOW_TRACKING_URI" in message
    assert not (tmp_path / "mlflow.db").exists()
