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
