"""benchmarks/bench_long_sequence.py's growth ratios, against numbers worked out by hand (no runs)."""

from __future__ import annotations

import json

import pytest

from tests.unit.bench_script import load_script


@pytest.fixture(scope="module")
def bench():
    return load_script("bench_long_sequence")


def rows(scored):
    """12 tasks: task k's compute (adapt) is k s, evaluation 0.5 s per task scored, peak 100 then 120 MiB."""
    out = []
    for i, n in enumerate(scored):
        row = {s: 0.0 for s in ("expand", "select", "generate", "record")}
        row.update(adapt=float(i + 1), evaluate=0.5 * n, scored=n, peak=120 if i == len(scored) - 1 else 100)
        out.append(row)
    return out


def test_growth_ratios_and_evaluation_per_task_scored(bench):
    text = bench.growth(rows([i + 1 for i in range(12)]))
    assert "task 12 / task 5: compute without evaluation 2.40x" in text  # 12 / 5
    assert "peak memory 1.20x" in text
    assert "mean of tasks 8-12 / mean of tasks 5-9: compute without evaluation 1.43x" in text  # 10 / 7
    assert "0.50 s at task 5 (5 scored), 0.50 s at task 12 (12 scored)" in text


def test_workers_peak_memory_against_task_5(bench, capsys):
    """Each kind of worker's peak (the task's record) at the last task against task 5; a run from before the
    record held them prints the coordinator's alone."""
    table = rows([i + 1 for i in range(12)])
    for i, row in enumerate(table):
        row.update(task=f"t{i}", new=0, params=0, pools=[], workers={"training": 400.0 + 10 * i, "replicas": 300.0})
    text = bench.growth(table)
    assert "peak memory 1.20x (workers: replicas 1.00x, training 1.16x);" in text  # 510 / 440
    bench.print_table("dmea", table)
    assert "| replicas 300, training 510 |" in capsys.readouterr().out
    for row in table:
        del row["workers"]
    assert "peak memory 1.20x; mean" in bench.growth(table)


def test_evaluation_every_other_task_and_all_tasks(bench):
    # eval.every 2: tasks 2, 4, ... and the last are scored; task 5 has no evaluation to divide
    every = [i + 1 if (i + 1) % 2 == 0 or i == 11 else 0 for i in range(12)]
    assert "0.50 s at task 6 (6 scored), 0.50 s at task 12 (12 scored)" in bench.growth(rows(every))
    # eval.all_tasks: every row scores all 12 tasks, so the time per task scored is flat, not falling
    assert "0.50 s at task 5 (12 scored), 0.50 s at task 12 (12 scored)" in bench.growth(rows([12] * 12))


def test_per_task_counts_the_scores_in_each_row_of_r(bench, tmp_path):
    state = {"tasks": [{"task_id": f"t{i}", "index": i} for i in range(3)],
             "history": [{"task_index": i, "stage": "evaluate", "seconds": 1.0} for i in range(3)],
             "R": [[0.5, None, None], [None, None, None], [0.4, 0.3, 0.2]]}
    (tmp_path / "state.json").write_text(json.dumps(state))
    assert [r["scored"] for r in bench.per_task(tmp_path)] == [1, 0, 3]
