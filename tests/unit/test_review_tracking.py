"""A resumed sequence run and the task runs a killed driver left behind (real MLflow, a sqlite store)."""

from __future__ import annotations

import pytest

pytest.importorskip("mlflow")


def test_a_task_run_the_killed_driver_left_running_is_ended_when_the_sequence_is_resumed(tmp_path):
    """The driver died while recording a task (its nested run created, never ended): a resume records the task
    again, and the half-made run must not stay RUNNING forever beside it."""
    from mlflow import MlflowClient

    from dmea_dist.tracking import Tracker

    uri = f"sqlite:///{tmp_path}/mlflow.db"
    first = Tracker(uri=uri, experiment="exp")
    parent = first.start_sequence(run_name="seq", config={"a": 1}, tasks=["a", "b"])
    done = first.record_task(task_index=0, task_id="a", params={}, metrics={"x": 1.0})
    client = MlflowClient(uri)
    # what record_task had made of task b when the driver was killed: the run, not yet ended
    half = client.create_run(first._experiment_id, run_name="b", tags={
        "mlflow.parentRunId": parent, "dmea.task_id": "b", "dmea.task_index": "1"}).info.run_id
    del first

    second = Tracker(uri=uri, experiment="exp")
    assert second.resume_sequence(parent) == parent
    assert client.get_run(half).info.status == "KILLED"
    assert client.get_run(done).info.status == "FINISHED"  # a finished record stays as it is
    assert client.get_run(parent).info.status == "RUNNING"  # the sequence itself goes on


def test_a_resumed_sequence_logs_each_final_metric_once(tmp_path):
    """The driver was killed after logging the final metrics, before ending the parent run: the resume logs
    them again. The history keeps one point per (step, value); a value that did change is a new point."""
    from mlflow import MlflowClient

    from dmea_dist.tracking import Tracker

    uri = f"sqlite:///{tmp_path}/mlflow.db"
    first = Tracker(uri=uri, experiment="exp")
    parent = first.start_sequence(run_name="seq", config={"a": 1}, tasks=["a", "b"])
    first.log_sequence_metrics({"final_average": 50.0, "bwt": -2.5, "fwt": float("nan")})
    del first  # killed before finish_sequence

    second = Tracker(uri=uri, experiment="exp")
    assert second.resume_sequence(parent) == parent
    second.log_sequence_metrics({"final_average": 50.0, "bwt": -3.0, "fwt": float("nan")})
    second.finish_sequence()
    client = MlflowClient(uri)
    points = {key: [m.value for m in client.get_metric_history(parent, key)] for key in ("final_average", "bwt")}
    assert points == {"final_average": [50.0], "bwt": [-2.5, -3.0]}
    assert len(client.get_metric_history(parent, "fwt")) == 1
