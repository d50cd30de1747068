"""The lifecycle state machine, stepped with a recording executor (no Ray, no training)."""

import pytest

from dmea_dist.method.lifecycle import ORDER, Lifecycle, LifecycleState, Stage, next_state


class Recorder:
    def __init__(self, fail_at=None):
        self.calls = []
        self.fail_at = fail_at

    def run_stage(self, stage, task_index):
        if (stage, task_index) == self.fail_at:
            raise RuntimeError("worker died")
        self.calls.append((stage, task_index))
        return {"did": f"{stage.value}{task_index}"}


def test_runs_every_stage_of_every_task_in_order():
    rec = Recorder()
    state = Lifecycle(LifecycleState(tasks=["a", "b"]), rec).run()
    assert rec.calls == [(s, 0) for s in ORDER] + [(s, 1) for s in ORDER]
    assert state.done and len(state.history) == 12
    assert state.history[0]["did"] == "expand0" and state.history[-1]["task"] == "b"


def test_next_state_transitions():
    assert next_state(0, Stage.EXPAND, 2) == (0, Stage.SELECT)
    assert next_state(0, Stage.RECORD, 2) == (1, Stage.EXPAND)
    assert next_state(1, Stage.RECORD, 2) == (1, Stage.DONE)
    with pytest.raises(ValueError):
        next_state(1, Stage.DONE, 2)


def test_state_roundtrip_and_resume_after_a_crash():
    rec = Recorder(fail_at=(Stage.ADAPT, 1))
    saved = []
    lc = Lifecycle(LifecycleState(tasks=["a", "b"]), rec, on_transition=lambda s: saved.append(s.to_dict()))
    with pytest.raises(RuntimeError):
        lc.run()
    # the last persisted state is the boundary before the failed stage: resume from it
    resumed = LifecycleState.from_dict(saved[-1])
    assert (resumed.task_index, resumed.stage) == (1, Stage.ADAPT)
    rec2 = Recorder()
    Lifecycle(resumed, rec2).run()
    assert rec2.calls == [(Stage.ADAPT, 1), (Stage.EVALUATE, 1), (Stage.RECORD, 1)]
    assert [h["stage"] for h in resumed.history].count("select") == 2  # nothing redone


def test_empty_sequence_and_step_after_done():
    with pytest.raises(ValueError):
        Lifecycle(LifecycleState(tasks=[]), Recorder())
    lc = Lifecycle(LifecycleState(tasks=["a"]), Recorder())
    lc.run()
    with pytest.raises(RuntimeError):
        lc.step()
