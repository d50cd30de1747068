"""benchmarks/token_rows_leak.py asks serving for each earlier task's answers twice: in the task's token-row
scope (the rows of the tasks up to it, as runs evaluate) and with every task's rows. Serving is faked here (its
scoping is pinned by test_token_rows): the fake answers right only in the task's own scope."""

from __future__ import annotations

import dataclasses
from types import SimpleNamespace

import numpy as np

import dmea_dist.run
import dmea_dist.serving
from tests.unit.bench_script import load_script

TASKS = ["synth.restaurant.00", "synth.hotel.00", "synth.travel.00"]
ROWS = {t: [{"context": f"{t} input {i}", "question": "", "answer": [f"the answer {i} of {t}"]} for i in range(3)]
        for t in TASKS}


@dataclasses.dataclass
class FakeServed:
    config: SimpleNamespace
    scopes: dict

    def generate(self, inputs, *, task, max_new_tokens):
        assert max_new_tokens == self.config.eval.max_new_tokens
        mine = self.scopes.get(task) == tuple(TASKS[: TASKS.index(task) + 1])
        return [ROWS[task][i]["answer"][0] if mine else "" for i, _ in enumerate(inputs)]


def test_the_scoped_column_serves_each_task_with_the_rows_up_to_it_and_the_other_every_row(tmp_path, monkeypatch):
    config = SimpleNamespace(eval=SimpleNamespace(max_samples=2, max_new_tokens=8, metric="rouge"))
    served = FakeServed(config, {t: tuple(TASKS[: i + 1]) for i, t in enumerate(TASKS)})
    monkeypatch.setattr(dmea_dist.serving, "recorded_tasks", lambda run_dir: TASKS)

    def load_task_model(run_dir, task, *, tasks, latest):
        assert (task, tasks, latest) == (TASKS[-1], TASKS, True)  # the run's final modules, every task loaded
        return served

    monkeypatch.setattr(dmea_dist.serving, "load_task_model", load_task_model)
    monkeypatch.setattr(dmea_dist.run, "load_tasks",
                        lambda config: [SimpleNamespace(task_id=t, rows={"test": ROWS[t]}) for t in TASKS])
    R = np.array([[50.0, np.nan, np.nan], [40.0, 60.0, np.nan], [30.0, 45.0, 70.0]])
    np.save(tmp_path / "R.npy", R)
    rows = load_script("token_rows_leak").leak(tmp_path, None)
    assert rows == [(TASKS[0], 50.0, 30.0, 0.0, 100.0), (TASKS[1], 60.0, 45.0, 0.0, 100.0)]
