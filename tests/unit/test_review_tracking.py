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


def _task_runs(client, experiment_id: str, parent: str) -> list:
    return client.search_runs([experiment_id], filter_string=f"tags.`mlflow.parentRunId` = '{parent}'")


def test_a_task_record_that_keeps_failing_stays_one_run_across_resumes(tmp_path, monkeypatch):
    """The registry failed (a full disk) at every attempt to record task a: each resume added one more FAILED run
    of it, and the experiment filled with duplicates. Each resume now records into the same run, logs no metric
    point twice, and the attempt that succeeds finishes that run with one model version."""
    import mlflow
    from mlflow import MlflowClient

    from dmea_dist.tracking import Tracker, TrackingWarning

    uri, modules = f"sqlite:///{tmp_path}/mlflow.db", tmp_path / "modules"
    modules.mkdir()
    (modules / "w.txt").write_text("weights")
    real_version = MlflowClient.create_model_version

    def full_disk(self, *args, **kwargs):
        raise mlflow.exceptions.MlflowException("No space left on device")

    def record(tracker):
        return tracker.record_task(task_index=0, task_id="a", params={"seed": 1}, metrics={"score": 0.5},
                                   series={"loss": [3.0, 2.0]}, model_dir=modules, registered_model="m")

    monkeypatch.setattr(MlflowClient, "create_model_version", full_disk)
    first = Tracker(uri=uri, experiment="exp")
    parent = first.start_sequence(run_name="seq", config={"a": 1}, tasks=["a"])
    with pytest.warns(TrackingWarning, match="No space left"):
        failed = record(first)
    for _ in range(2):  # `dmea resume`, twice, with the disk still full
        again = Tracker(uri=uri, experiment="exp")
        again.resume_sequence(parent)
        with pytest.warns(TrackingWarning, match="No space left"):
            assert record(again) == failed
    client = MlflowClient(uri)
    experiment_id = client.get_experiment_by_name("exp").experiment_id
    assert [r.info.run_id for r in _task_runs(client, experiment_id, parent)] == [failed]
    assert client.get_run(failed).info.status == "FAILED"

    monkeypatch.setattr(MlflowClient, "create_model_version", real_version)
    last = Tracker(uri=uri, experiment="exp")
    last.resume_sequence(parent)
    assert record(last) == failed
    assert [r.info.run_id for r in _task_runs(client, experiment_id, parent)] == [failed]
    assert client.get_run(failed).info.status == "FINISHED"
    assert [(m.step, m.value) for m in client.get_metric_history(failed, "loss")] == [(0, 3.0), (1, 2.0)]
    assert [m.value for m in client.get_metric_history(failed, "score")] == [0.5]
    assert [v.run_id for v in client.search_model_versions("name = 'm'")] == [failed]


@pytest.mark.parametrize("killed_at", ["set_registered_model_alias", "set_terminated"])
def test_a_driver_killed_between_registering_and_ending_a_task_run_leaves_one_version(tmp_path, monkeypatch,
                                                                                      killed_at):
    """Killed after the task's model version was registered, before its run ended: the registry kept a version
    of an unfinished run, and the resume registered a second one for the task. The resume now records the task
    into that run again and keeps its version (its source is that run's `model/`, logged anew), with the alias."""
    from mlflow import MlflowClient

    from dmea_dist.tracking import Tracker
    from dmea_dist.tracking.registry import ServableTask

    class Killed(BaseException):  # as SIGKILL: nothing of the tracker's guards catches it
        pass

    uri, folder = f"sqlite:///{tmp_path}/mlflow.db", tmp_path / "run"
    folder.mkdir()
    (folder / "config.yaml").write_text("name: t\n")
    servable = ServableTask(folder=folder, alias="a", path=[0])
    real = getattr(MlflowClient, killed_at)

    def kill(self, *args, **kwargs):
        if args[0] != parent:  # the task's alias or its run's end, not the sequence's
            raise Killed
        return real(self, *args, **kwargs)

    first = Tracker(uri=uri, experiment="exp")
    parent = first.start_sequence(run_name="seq", config={"a": 1}, tasks=["a"])
    monkeypatch.setattr(MlflowClient, killed_at, kill)
    with pytest.raises(Killed):
        first.record_task(task_index=0, task_id="a", params={}, metrics={"score": 0.5}, servable=servable,
                          registered_model="m")
    monkeypatch.setattr(MlflowClient, killed_at, real)
    client = MlflowClient(uri)
    [stale] = client.search_model_versions("name = 'm'")

    second = Tracker(uri=uri, experiment="exp")
    second.resume_sequence(parent)
    run_id = second.record_task(task_index=0, task_id="a", params={}, metrics={"score": 0.5}, servable=servable,
                                registered_model="m")
    experiment_id = client.get_experiment_by_name("exp").experiment_id
    assert [r.info.run_id for r in _task_runs(client, experiment_id, parent)] == [run_id] == [stale.run_id]
    assert client.get_run(run_id).info.status == "FINISHED"
    assert [v.version for v in client.search_model_versions("name = 'm'")] == [stale.version]
    assert client.get_model_version_by_alias("m", "a").version == stale.version
    assert client.get_run(run_id).data.tags["dmea.model_version"] == f"m/{stale.version}"


def test_dmea_generate_of_a_task_run_whose_record_failed_says_so(tmp_path):
    """`dmea generate TASK_RUN_ID` of a task whose record ended FAILED rebuilt the run without that task (only
    FINISHED task runs are taken) and then failed with '/tmp/dmea-serve-.../run has no task': a folder the user
    never saw, and no word of the failed record or of the fix."""
    from dmea_dist.tracking import Tracker, TrackingError, TrackingWarning, download_run

    uri, modules = f"sqlite:///{tmp_path}/mlflow.db", tmp_path / "modules"
    modules.mkdir()
    (modules / "w.txt").write_text("weights")
    tracker = Tracker(uri=uri, experiment="exp")
    tracker.start_sequence(run_name="seq", config={"a": 1}, tasks=["a", "b"])
    with pytest.warns(TrackingWarning):
        failed = tracker.record_task(task_index=0, task_id="a", params={}, metrics={}, model_dir=modules,
                                     artifacts={"missing": tmp_path / "nope.txt"})
    tracker.record_task(task_index=1, task_id="b", params={}, metrics={}, model_dir=modules)
    with pytest.raises(TrackingError, match=r"\(a\) .* is FAILED, not FINISHED.*dmea resume RUN_DIR"):
        download_run(uri=uri, run_id=failed, dst=tmp_path / "served")

    # a task run its driver is recording now: resume is refused while the driver runs, so the advice says wait
    from mlflow import MlflowClient

    from dmea_dist.tracking.common import PARENT_TAG, TASK_ID_TAG, TASK_INDEX_TAG

    client = MlflowClient(tracking_uri=uri)
    live = client.create_run(client.get_run(failed).info.experiment_id,
                             tags={PARENT_TAG: tracker.parent_run_id, TASK_ID_TAG: "c", TASK_INDEX_TAG: "2"})
    with pytest.raises(TrackingError, match=r"\(c\) .* is RUNNING, not FINISHED: the run's driver is recording it now"):
        download_run(uri=uri, run_id=live.info.run_id, dst=tmp_path / "served-live")


def test_dmea_generate_of_a_sequence_run_whose_task_record_failed_names_the_run_not_a_temporary_folder(tmp_path):
    """`dmea generate PARENT_RUN_ID TASK` where TASK's record ended FAILED: the run is rebuilt from its FINISHED
    task runs, without TASK, and the error named '/tmp/dmea-serve-.../run', a folder the user never saw."""
    from dmea_dist.errors import DmeaError
    from dmea_dist.serving import load_task_model
    from dmea_dist.tracking import Tracker, TrackingWarning

    uri, modules = f"sqlite:///{tmp_path}/mlflow.db", tmp_path / "modules"
    modules.mkdir()
    (modules / "w.txt").write_text("weights")
    tracker = Tracker(uri=uri, experiment="exp")
    parent = tracker.start_sequence(run_name="seq", config={"data": {"tasks": ["a", "b"]}}, tasks=["a", "b"])
    with pytest.warns(TrackingWarning):
        tracker.record_task(task_index=0, task_id="a", params={}, metrics={}, model_dir=modules,
                            artifacts={"missing": tmp_path / "nope.txt"})
    tracker.record_task(task_index=1, task_id="b", params={}, metrics={}, model_dir=modules)
    with pytest.raises(DmeaError) as failed:
        load_task_model(parent, "a", tracking_uri=uri)
    said = str(failed.value)
    assert f"MLflow run {parent} has no finished record of task 'a'" in said and "dmea resume RUN_DIR" in said, said
    assert "dmea-serve-" not in said
    with pytest.raises(DmeaError, match=f"MLflow run {parent} has no task 'c'; recorded tasks: \\['b'\\]"):
        load_task_model(parent, "c", tracking_uri=uri)


def test_dmea_generate_of_a_failed_task_run_serves_the_task_a_later_run_recorded(tmp_path):
    """Before a resume recorded into the failed run of a task, it recorded the task into a new run: such a run has a
    FAILED and a FINISHED run of one task. The FAILED one's id (the MLflow UI lists both) was then refused with
    'dmea resume RUN_DIR records it again', which it never does (the task has a finished record); the folder is
    rebuilt from the FINISHED runs either way, so it serves the task, as it did before."""
    from dmea_dist.tracking import Tracker, TrackingWarning, download_run

    uri, modules = f"sqlite:///{tmp_path}/mlflow.db", tmp_path / "modules"
    modules.mkdir()
    (modules / "w.txt").write_text("weights")
    tracker = Tracker(uri=uri, experiment="exp")
    tracker.start_sequence(run_name="seq", config={"a": 1}, tasks=["a"])
    with pytest.warns(TrackingWarning):
        failed = tracker.record_task(task_index=0, task_id="a", params={}, metrics={}, model_dir=modules,
                                     artifacts={"missing": tmp_path / "nope.txt"})
    again = tracker.record_task(task_index=0, task_id="a", params={}, metrics={}, model_dir=modules)
    assert again != failed  # the older code's resume: a second run of the task
    folder, task = download_run(uri=uri, run_id=failed, dst=tmp_path / "served")
    assert task == "a" and (folder / "tasks" / "000-a" / "modules" / "w.txt").read_text() == "weights"


def test_an_infinite_metric_point_is_logged_once_across_resumes(tmp_path):
    """A loss that overflowed (fp16 autocast) is an infinite point of the task's series. MLflow's SQL store keeps
    +-inf as +-1.7976931348623157e308, which compared unequal to inf: each resume recording the task again added
    the point once more."""
    from mlflow import MlflowClient

    from dmea_dist.tracking import Tracker, TrackingWarning

    uri = f"sqlite:///{tmp_path}/mlflow.db"
    first = Tracker(uri=uri, experiment="exp")
    parent = first.start_sequence(run_name="seq", config={"a": 1}, tasks=["a"])

    def record(tracker):  # the missing artifact fails the record, so each resume records it again
        with pytest.warns(TrackingWarning):
            return tracker.record_task(task_index=0, task_id="a", params={}, metrics={"overflow": float("-inf")},
                                       series={"loss": [float("inf"), 2.0]},
                                       artifacts={"missing": tmp_path / "nope.txt"})

    run_id = record(first)
    for _ in range(2):
        again = Tracker(uri=uri, experiment="exp")
        again.resume_sequence(parent)
        assert record(again) == run_id
    client = MlflowClient(uri)
    assert [m.step for m in client.get_metric_history(run_id, "loss")] == [0, 1]
    assert len(client.get_metric_history(run_id, "overflow")) == 1
