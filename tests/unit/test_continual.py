"""CL metrics on small hand-made R matrices with expected numbers worked out by hand."""

from __future__ import annotations

import math

import numpy as np
import pytest

from dmea_dist.evaluation.continual import (
    as_matrix,
    average_trajectory,
    backward_transfer,
    final_average,
    forgetting,
    forward_transfer,
    summarize,
    why_no_bwt,
)

NAN = float("nan")

# R[j][i]: score on task i after training task j; every entry evaluated.
FULL = np.array([
    [80.0, 99.0, 5.0],
    [85.0, 60.0, 20.0],
    [65.0, 55.0, 90.0],
])
# The usual protocol: only tasks seen so far (upper triangle NaN).
SEEN = np.array([
    [80.0, NAN, NAN],
    [85.0, 60.0, NAN],
    [65.0, 55.0, 90.0],
])


@pytest.mark.parametrize("R", [FULL, SEEN])
def test_final_average_and_trajectory(R):
    assert final_average(R) == pytest.approx((65 + 55 + 90) / 3)
    np.testing.assert_allclose(average_trajectory(R), [80.0, (85 + 60) / 2, (65 + 55 + 90) / 3])


@pytest.mark.parametrize("R", [FULL, SEEN])
def test_backward_transfer(R):
    # ((65 - 80) + (55 - 60)) / 2
    assert backward_transfer(R) == pytest.approx(-10.0)


@pytest.mark.parametrize("R", [FULL, SEEN])
def test_forgetting_uses_best_score_after_learning(R):
    # task 0: best of R[0][0], R[1][0] is 85 -> 85 - 65 = 20; task 1: 60 - 55 = 5.
    # FULL's R[0][1] = 99 was measured before task 1 was trained and must not count
    # (it would give 99 - 55 = 44 for task 1).
    assert forgetting(R) == pytest.approx((20 + 5) / 2)


def test_forward_transfer():
    # ((R[0][1] - b1) + (R[1][2] - b2)) / 2 = ((99 - 9) + (20 - 15)) / 2; baseline[0] unused.
    assert forward_transfer(FULL, [NAN, 9.0, 15.0]) == pytest.approx(47.5)


def test_forward_transfer_names_missing_entries():
    with pytest.raises(ValueError, match=r"R\[0\]\[1\], R\[1\]\[2\]"):
        forward_transfer(SEEN, [0.0, 0.0, 0.0])
    with pytest.raises(ValueError, match=r"baseline\[2\]"):
        forward_transfer(FULL, [0.0, 0.0, NAN])
    with pytest.raises(ValueError, match=r"shape \(3,\)"):
        forward_transfer(FULL, [0.0, 0.0])


def test_missing_evaluations_are_errors_not_skipped():
    gap = SEEN.copy()
    gap[2, 1] = NAN
    for fn in (final_average, backward_transfer, forgetting, average_trajectory):
        with pytest.raises(ValueError, match=r"R\[2\]\[1\]"):
            fn(gap)
    gap = SEEN.copy()
    gap[1, 0] = NAN  # only needed by the trajectory and forgetting
    assert final_average(gap) == pytest.approx(70.0)
    assert backward_transfer(gap) == pytest.approx(-10.0)
    with pytest.raises(ValueError, match=r"R\[1\]\[0\]"):
        average_trajectory(gap)
    with pytest.raises(ValueError, match=r"R\[1\]\[0\]"):
        forgetting(gap)


def test_single_task():
    assert final_average([[42.0]]) == 42.0
    np.testing.assert_allclose(average_trajectory([[42.0]]), [42.0])
    assert math.isnan(backward_transfer([[42.0]]))
    assert math.isnan(forgetting([[42.0]]))
    assert math.isnan(forward_transfer([[42.0]], [0.0]))


def test_forgetting_against_loops_on_random_matrix():
    rng = np.random.default_rng(0)
    R = rng.uniform(0, 100, size=(6, 6))
    T = 6
    drops = []
    for i in range(T - 1):
        best = -math.inf
        for l in range(i, T - 1):  # noqa: E741 - the paper's index
            best = max(best, R[l][i])
        drops.append(best - R[T - 1][i])
    assert forgetting(R) == pytest.approx(sum(drops) / len(drops))
    assert backward_transfer(R) == pytest.approx(
        sum(R[T - 1][i] - R[i][i] for i in range(T - 1)) / (T - 1))


def test_forgetting_with_eval_every_against_loops_over_the_rows_scored():
    """eval.every 3 of 7 tasks: rows 2, 5 and 6 score every seen task, the others only their own; a task's best is
    taken over the rows that scored it. An entry of a full row still has to be there."""
    rng = np.random.default_rng(1)
    T, every = 7, 3
    R = rng.uniform(0, 100, size=(T, T))
    full = {j for j in range(T) if (j + 1) % every == 0 or j == T - 1}
    for j in range(T):
        for i in range(T):
            if i > j or (j not in full and i != j):
                R[j][i] = NAN
    drops = []
    for i in range(T - 1):
        best = max(R[j][i] for j in range(i, T - 1) if j == i or j in full)
        drops.append(best - R[T - 1][i])
    assert forgetting(R, every=every) == pytest.approx(sum(drops) / len(drops))
    with pytest.raises(ValueError, match=r"R\[1\]\[0\]"):
        forgetting(R)  # read as every row full: the skipped entries are missing
    R[5][1] = NAN
    with pytest.raises(ValueError, match=r"R\[5\]\[1\]"):
        forgetting(R, every=every)


def test_why_no_bwt_of_a_long_run_names_a_few_entries_and_the_count():
    """A 50-task multitask run (or one from before the diagonal was scored) listed all 49 R[i][i] in one line."""
    R = np.full((50, 50), NAN)
    R[-1] = 1.0
    why = why_no_bwt(R, method="multitask")
    assert "R[0][0], R[1][1], R[2][2], ... (49 entries) were not evaluated" in why and "R[3][3]" not in why, why
    assert "R[0][0], R[1][1] were not evaluated" in why_no_bwt([[NAN] * 3, [NAN] * 3, [1.0] * 3])


def test_shapes_are_checked():
    with pytest.raises(ValueError, match=r"square.*\(2, 3\)"):
        final_average(np.zeros((2, 3)))
    with pytest.raises(ValueError, match=r"square.*\(3,\)"):
        backward_transfer(np.zeros(3))
    with pytest.raises(ValueError, match="square"):
        forgetting(np.zeros((0, 0)))
    with pytest.raises(ValueError, match="3 tasks"):
        as_matrix(np.zeros((2, 2)), n_tasks=3)


def test_lists_with_none_are_accepted():
    R = [[80, None], [70, 60]]
    assert final_average(R) == pytest.approx(65.0)
    assert summarize(R) == pytest.approx(
        {"final_average": 65.0, "bwt": -10.0, "forgetting": 10.0})
    with pytest.raises(ValueError, match=r"R\[0\]\[1\]"):
        summarize(R, baseline=[0, 0])


def test_summarize_with_baseline():
    result = summarize(FULL, baseline=[NAN, 9.0, 15.0])
    assert result == pytest.approx(
        {"final_average": 70.0, "bwt": -10.0, "forgetting": 12.5, "fwt": 47.5})


def test_summarize_a_matrix_evaluated_every_other_task():
    """eval.every 2 scores rows 1 and 3 in full and rows 0 and 2 on their own task alone: forgetting takes the
    schedule, as the run's own metrics do."""
    R = [[80, NAN, NAN, NAN], [70, 60, NAN, NAN], [NAN, NAN, 50, NAN], [65, 55, 45, 90]]
    # forgetting: task 0's best 80 -> 65, task 1's 60 -> 55, task 2's 50 -> 45
    assert summarize(R, every=2) == pytest.approx({"final_average": 63.75, "bwt": -25 / 3, "forgetting": 25 / 3})
    with pytest.raises(ValueError):
        summarize(R)  # every=1 expects every seen task scored in each row


def test_why_no_bwt_names_multitask_not_eval_every_for_a_multitask_run():
    """multitask trains once, at the end, so R has only its last row; the reason given was eval.every > 1,
    a setting the user never changed."""
    R = [[NAN, NAN, NAN], [NAN, NAN, NAN], [70.0, 60.0, 50.0]]
    why = why_no_bwt(R, method="multitask")
    assert "R[0][0], R[1][1] were not evaluated" in why and "multitask trains once" in why
    assert "eval.every" not in why
    assert "eval.every" in why_no_bwt(R) and why_no_bwt(FULL, method="multitask") == ""


def test_measured_leaves_out_what_the_protocol_skips_and_raises_on_what_a_run_lost():
    """What a run reports: BWT and forgetting are absent where the diagonal was never scored (multitask), FWT
    where untrained tasks were not scored; an entry the protocol needs but lacks is a bug, and raises."""
    from dmea_dist.evaluation.continual import measured

    multitask = [[NAN, NAN], [60.0, 70.0]]
    assert measured(multitask, baseline=[NAN, 5.0]) == {"final_average": pytest.approx(65.0)}
    assert measured([[90.0]], baseline=[1.0]) == {"final_average": 90.0, "bwt": pytest.approx(NAN, nan_ok=True),
                                                  "forgetting": pytest.approx(NAN, nan_ok=True)}
    with pytest.raises(ValueError, match=r"R\[1\]\[1\]"):  # the last row lost a score
        measured([[80.0, NAN], [70.0, NAN]])
    lost = [[80.0, NAN, NAN], [NAN, 50.0, NAN], [60.0, 40.0, 30.0]]
    with pytest.raises(ValueError, match=r"R\[1\]\[0\]"):  # the diagonal is there, a row forgetting reads is not
        measured(lost)
    # a report of such a folder: what it has, the rest left out
    assert measured(lost, strict=False) == {"final_average": pytest.approx(130 / 3), "bwt": pytest.approx(-15.0)}
