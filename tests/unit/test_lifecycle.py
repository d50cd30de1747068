"""The lifecycle state machine and the run state that carries it (no Ray, no training)."""

import json

import pytest

from dmea_dist.method.lifecycle import ORDER, Stage, next_state
from dmea_dist.state import RunState, StateError, load_state, save_state, write_text


def _step_all(state: RunState, run_dir, *, fail_at=None) -> list:
    """Step like the coordinator: run a (fake) stage, advance, save; a failure leaves the last saved state."""
    calls = []
    while not state.done:
        here = (state.task_index, state.stage)
        if here == fail_at:
            raise RuntimeError("worker died")
        calls.append(here)
        state.advance({"did": f"{state.stage.value}{state.task_index}"}, seconds=0.0)
        save_state(state, run_dir)
    return calls


def test_runs_every_stage_of_every_task_in_order(tmp_path):
    state = RunState.new(["a", "b"])
    calls = _step_all(state, tmp_path)
    assert calls == [(0, s) for s in ORDER] + [(1, s) for s in ORDER]
    assert state.done and state.status == "finished" and len(state.history) == 12
    assert state.history[0]["did"] == "expand0" and state.history[-1]["task"] == "b"
    assert state.completed(1, Stage.RECORD)


def test_next_state_transitions():
    assert next_state(0, Stage.EXPAND, 2) == (0, Stage.SELECT)
    assert next_state(0, Stage.RECORD, 2) == (1, Stage.EXPAND)
    assert next_state(1, Stage.RECORD, 2) == (1, Stage.DONE)
    with pytest.raises(ValueError):
        next_state(1, Stage.DONE, 2)


def test_resume_after_a_crash_redoes_nothing(tmp_path):
    state = RunState.new(["a", "b"])
    with pytest.raises(RuntimeError):
        _step_all(state, tmp_path, fail_at=(1, Stage.ADAPT))
    # the state on disk is the boundary before the failed stage: resume from it
    resumed = load_state(tmp_path)
    assert (resumed.task_index, resumed.stage) == (1, Stage.ADAPT)
    assert resumed.completed(1, Stage.GENERATE) and not resumed.completed(1, Stage.ADAPT)
    calls = _step_all(resumed, tmp_path)
    assert calls == [(1, Stage.ADAPT), (1, Stage.EVALUATE), (1, Stage.RECORD)]
    assert [h["stage"] for h in resumed.history].count("select") == 2  # one per task, nothing redone


def test_state_round_trips_through_json_with_nan_as_null(tmp_path):
    state = RunState.new(["a", "b"])
    state.R[0][0] = 61.5
    state.similarity[1][0] = float("nan")
    state.tasks[0].path, state.tasks[0].pseudo = [0, 1], {"x": "tasks/000-a/pseudo_samples/x.parquet"}
    save_state(state, tmp_path)
    again = load_state(tmp_path)
    assert again.R[0][0] == 61.5 and again.similarity[1][0] is None
    assert again.tasks[0].path == [0, 1] and again.tasks[0].pseudo == state.tasks[0].pseudo
    assert json.loads((tmp_path / "state.json").read_text())["format"] == "dmea-run-state"


def test_empty_sequence_missing_and_foreign_state(tmp_path):
    with pytest.raises(ValueError, match="empty"):
        RunState.new([])
    with pytest.raises(StateError, match="not a resumable run directory"):
        load_state(tmp_path)
    write_text(tmp_path / "state.json", '{"format": "something else"}')
    with pytest.raises(StateError, match="not a dmea-run-state"):
        load_state(tmp_path)
    write_text(tmp_path / "state.json", "{half")
    with pytest.raises(StateError, match="unreadable"):
        load_state(tmp_path)


@pytest.mark.parametrize("damage", ["task_key", "stage", "missing"])
def test_a_state_of_another_version_names_the_file_and_the_key(tmp_path, damage):
    save_state(RunState.new(["a"]), tmp_path)
    data = json.loads((tmp_path / "state.json").read_text())
    if damage == "task_key":
        data["tasks"][0]["adapter_rank"] = 8  # a field a newer version added
    elif damage == "stage":
        data["stage"] = "distill"
    else:
        del data["tasks"]
    write_text(tmp_path / "state.json", json.dumps(data))
    key = {"task_key": "adapter_rank", "stage": "distill", "missing": "tasks"}[damage]
    with pytest.raises(StateError, match=rf"state.json: not a run state this dmea-dist can read.*{key}"):
        load_state(tmp_path)


def test_atomic_write_leaves_the_old_file_when_the_new_one_fails(tmp_path):
    target = tmp_path / "x.json"
    write_text(target, "old")

    with pytest.raises(TypeError):
        write_text(target, 42)  # a write that fails half-way
    assert target.read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["x.json"]  # no temp file left behind
