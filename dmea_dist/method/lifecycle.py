"""The task-sequence lifecycle as an explicit state machine (no Ray, no I/O).

For each task, in order:

    EXPAND -> SELECT -> GENERATE -> ADAPT -> EVALUATE -> RECORD

and after the last task, DONE. `Lifecycle.step()` runs the current stage on an
executor and moves to the next state; the state is a small serialisable
value, so a coordinator (in-process, or a Ray actor) can hold it, persist it
at stage boundaries and resume from it. What a stage *does* is the executor's
business (`StageExecutor`), so the same machine drives in-process stages in
tests and Ray work on a cluster.
"""

from __future__ import annotations

import enum
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol


class Stage(str, enum.Enum):
    EXPAND = "expand"
    SELECT = "select"
    GENERATE = "generate"
    ADAPT = "adapt"
    EVALUATE = "evaluate"
    RECORD = "record"
    DONE = "done"


ORDER = [Stage.EXPAND, Stage.SELECT, Stage.GENERATE, Stage.ADAPT, Stage.EVALUATE, Stage.RECORD]


class StageExecutor(Protocol):
    """Runs one stage of one task; returns a JSON-able summary of what it did."""

    def run_stage(self, stage: Stage, task_index: int) -> dict[str, Any]: ...


@dataclass
class LifecycleState:
    tasks: list[str]
    task_index: int = 0
    stage: Stage = Stage.EXPAND
    history: list[dict[str, Any]] = field(default_factory=list)  # one entry per finished stage

    @property
    def done(self) -> bool:
        return self.stage is Stage.DONE

    def to_dict(self) -> dict[str, Any]:
        return {"tasks": list(self.tasks), "task_index": self.task_index, "stage": self.stage.value,
                "history": list(self.history)}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> LifecycleState:
        return cls(tasks=list(data["tasks"]), task_index=int(data["task_index"]),
                   stage=Stage(data["stage"]), history=list(data.get("history", [])))


def next_state(task_index: int, stage: Stage, n_tasks: int) -> tuple[int, Stage]:
    """The state after `stage` of task `task_index` finishes."""
    if stage is Stage.DONE:
        raise ValueError("the lifecycle is already done")
    position = ORDER.index(stage)
    if position + 1 < len(ORDER):
        return task_index, ORDER[position + 1]
    if task_index + 1 < n_tasks:
        return task_index + 1, Stage.EXPAND
    return task_index, Stage.DONE


class Lifecycle:
    """Steps a `LifecycleState` through the stages on an executor."""

    def __init__(self, state: LifecycleState, executor: StageExecutor,
                 on_transition: Callable[[LifecycleState], None] | None = None):
        if not state.tasks:
            raise ValueError("the task sequence is empty")
        self.state = state
        self.executor = executor
        self.on_transition = on_transition  # e.g. persist the state for resuming

    def step(self) -> Stage:
        """Run the current stage and advance; returns the new stage."""
        state = self.state
        if state.done:
            raise RuntimeError("step() called on a finished lifecycle")
        started = time.perf_counter()
        summary = self.executor.run_stage(state.stage, state.task_index)
        state.history.append({
            "task": state.tasks[state.task_index], "task_index": state.task_index, "stage": state.stage.value,
            "seconds": time.perf_counter() - started, **(summary or {}),
        })
        state.task_index, state.stage = next_state(state.task_index, state.stage, len(state.tasks))
        if self.on_transition is not None:
            self.on_transition(state)
        return state.stage

    def run(self) -> LifecycleState:
        while not self.state.done:
            self.step()
        return self.state
