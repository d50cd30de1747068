"""The task-sequence lifecycle as an explicit state machine (no Ray, no I/O).

For each task, in order:

    EXPAND -> SELECT -> GENERATE -> ADAPT -> EVALUATE -> RECORD

and after the last task, DONE. `next_state` is the whole machine; the run's
position and everything the stages produced live in `dmea_dist.state.RunState`,
and what a stage *does* is `dmea_dist.stages` (dispatched by an explicit table),
so the same machine drives in-process stages in tests and Ray work on a cluster.
"""

from __future__ import annotations

import enum


class Stage(str, enum.Enum):
    EXPAND = "expand"
    SELECT = "select"
    GENERATE = "generate"
    ADAPT = "adapt"
    EVALUATE = "evaluate"
    RECORD = "record"
    DONE = "done"


ORDER = [Stage.EXPAND, Stage.SELECT, Stage.GENERATE, Stage.ADAPT, Stage.EVALUATE, Stage.RECORD]


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
