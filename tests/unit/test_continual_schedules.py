"""The metrics of finished and stopped runs under eval.every / eval.all_tasks, against loops written from the
definitions: R filled as stages.evaluate's schedule fills it, a stopped run's rows past its stop empty."""

from __future__ import annotations

import math

import numpy as np
import pytest

from dmea_dist import driver
from dmea_dist.evaluation import continual, run_data

NAN = float("nan")


def scheduled(T: int, every: int, all_tasks: bool) -> set[tuple[int, int]]:
    """(j, i) a finished run scores: row j every seen task (every task with all_tasks) when j+1 is a multiple of
    `every` or j is the last; between them task j alone (and task j+1 with all_tasks)."""
    out = set()
    for j in range(T):
        targets = range(T) if all_tasks else range(j + 1)
        if (j + 1) % every and j != T - 1:
            targets = [i for i in targets if i in (j, j + 1)]
        out |= {(j, i) for i in targets}
    return out


def reference(R: np.ndarray) -> tuple[int | None, dict[str, float]]:
    """The last row that scored every task seen by then, and A, BWT and forgetting over the tasks up to it.
    Forgetting: a task's best over the rows after its training that scored it (the entries that are there)."""
    T = len(R)
    full = [j for j in range(T) if all(not math.isnan(R[j][i]) for i in range(j + 1))]
    if not full:
        return None, {}
    L = full[-1]
    out = {"final_average": sum(R[L][i] for i in range(L + 1)) / (L + 1)}
    if L == 0:
        return L, {**out, "bwt": NAN, "forgetting": NAN}
    if any(math.isnan(R[i][i]) for i in range(L)):
        return L, out
    out["bwt"] = sum(R[L][i] - R[i][i] for i in range(L)) / L
    drops = []
    for i in range(L):
        best = max(R[j][i] for j in range(i, L) if not math.isnan(R[j][i]))
        drops.append(best - R[L][i])
    out["forgetting"] = sum(drops) / L
    return L, out


def same(a: dict[str, float], b: dict[str, float]) -> bool:
    return a.keys() == b.keys() and all(
        (math.isnan(a[k]) and math.isnan(b[k])) or a[k] == pytest.approx(b[k]) for k in a)


@pytest.mark.filterwarnings("error")  # no RuntimeWarning from an empty mean (T = 1, a stop after task 0)
@pytest.mark.parametrize("all_tasks", [False, True])
@pytest.mark.parametrize("every", [1, 2, 3, 5])
def test_metrics_of_finished_and_stopped_runs_against_loops(every, all_tasks):
    rng = np.random.default_rng(every * 2 + all_tasks)
    for T in range(1, 13):
        cells = scheduled(T, every, all_tasks)
        for stop in [*range(T), None]:  # rows from `stop` on not evaluated; None: finished
            R = np.full((T, T), NAN)
            for j, i in cells:
                if stop is None or j < stop:
                    R[j, i] = rng.integers(0, 11) * 10.0  # ties in the best score too
            L, want = reference(R)
            assert run_data.last_evaluated(R) == L, (T, stop, R)
            assert same(run_data.sequence_metrics(R, every=every), want), (T, stop, R)
            # FWT (all_tasks) over the tasks done, from state.json's untrained scores (None: never measured)
            untrained = [None, *(float(rng.integers(0, 4)) for _ in range(T - 1))]
            if T > 2 and rng.integers(0, 4) == 0:  # a task whose untrained score is missing: no FWT through it
                untrained[int(rng.integers(1, T))] = None
            if all_tasks and L is not None and L > 0 and None not in untrained[1: L + 1]:
                want = {**want, "fwt": sum(R[i - 1][i] - untrained[i] for i in range(1, L + 1)) / L}
            assert same(run_data.sequence_metrics(R, every=every, baseline=untrained), want), (T, stop, R)
            if stop is None:
                assert L == T - 1
                baseline = rng.uniform(0, 30, size=T)
                got = driver.sequence_metrics(R, baseline=baseline, every=every)
                if all_tasks and T > 1:
                    want = {**want, "fwt": sum(R[i - 1][i] - baseline[i] for i in range(1, T)) / (T - 1)}
                assert same(got, want), (T, R)
                if T > 1:
                    assert continual.forgetting(R, every=every) == pytest.approx(want["forgetting"])


def test_a_stopped_runs_task_table_compares_no_score_from_before_a_tasks_training():
    """eval.every 2 with all_tasks, stopped after task 2 of 4: the table reads row 1 (the last full row), whose
    R[1][2] = 15 was scored before task 2 was trained; its "change" was 15 - R[2][2] = -35, a drop that never
    happened. Only tasks trained by the row read have a change."""
    from dmea_dist.evaluation.pages import task_panel

    R = np.array([[70, 20, NAN, NAN], [60, 40, 15, 10], [NAN, NAN, 50, 25], [NAN] * 4])
    run = run_data.RunData(name="x", method="dmea", config_name="c", tasks=["a", "b", "c", "d"], R=R,
                           metrics=run_data.sequence_metrics(R, every=2), status="stopped")
    header, rows = task_panel(run).table
    assert header[:4] == ["task", "own", "after t1", "change"]
    assert [row[3] for row in rows] == ["-10.0", "0.0", "-", "-"]
    # nor a score under "after t1" for a task not trained by then (R[1][2] and R[1][3] were scored untrained)
    assert [row[2] for row in rows] == ["60.0", "40.0", "-", "-"]
