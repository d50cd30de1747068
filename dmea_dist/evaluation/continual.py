"""Continual-learning metrics over the score matrix R, as small pure functions.

`R` has shape (T, T): `R[j][i]` is the score (0..100) on task `i` after
training task `j`, NaN where it was not evaluated. The usual protocol fills
the lower triangle and the diagonal (every task seen so far); the entries
above the diagonal exist only when unseen tasks are evaluated too (needed by
forward transfer).

Key decisions:
- Each function checks exactly the entries it reads and raises a ValueError
  listing the missing ones (`R[j][i]`) rather than silently skipping NaN: a
  missing evaluation is a bug in the run, not a value. Entries a schedule
  leaves out on purpose (eval.every > 1) are not read: forgetting is told it.
- Metrics over earlier tasks (BWT, FWT, forgetting) are undefined with a
  single task and return NaN.
- Forgetting follows Chaudhry et al. 2018 (Riemannian Walk), at the end of the
  sequence: f_i = max_{i <= l < T-1} R[l][i] - R[T-1][i], averaged over
  i < T-1. The max starts at l = i (after task i was trained): a score
  measured before training task i (forward evaluation) is not knowledge that
  can be forgotten.
- Function style after Avalanche's `evaluation/functional.py`: arrays in,
  floats out, no state.
"""

from __future__ import annotations

import math
from collections.abc import Iterable

import numpy as np


def as_matrix(R, *, name: str = "R", n_tasks: int | None = None) -> np.ndarray:
    """Return `R` as a float64 (T, T) array; raise if it is not square and non-empty."""
    try:
        matrix = np.asarray(R, dtype=np.float64)
    except (TypeError, ValueError) as err:
        raise ValueError(f"{name} must be a (T, T) array of numbers: {err}") from err
    if matrix.ndim != 2 or matrix.shape[0] != matrix.shape[1] or matrix.shape[0] == 0:
        raise ValueError(
            f"{name} must be a non-empty square (T, T) array "
            f"(row = after training task j, column = task i), got shape {matrix.shape}"
        )
    if n_tasks is not None and matrix.shape[0] != n_tasks:
        raise ValueError(
            f"{name} has shape {matrix.shape} but there are {n_tasks} tasks; "
            f"expected ({n_tasks}, {n_tasks})"
        )
    return matrix


def _require(matrix: np.ndarray, entries: Iterable[tuple[int, int]], needed_for: str) -> None:
    """Raise a ValueError naming every NaN entry among `entries` (j, i)."""
    missing = [f"R[{j}][{i}]" for j, i in entries if math.isnan(matrix[j, i])]
    if missing:
        raise ValueError(
            f"{needed_for} needs entries that were not evaluated (NaN): {', '.join(missing)}"
        )


def final_average(R) -> float:
    """A_T: mean score over all T tasks after training the last one (the papers' number)."""
    matrix = as_matrix(R)
    last = matrix.shape[0] - 1
    _require(matrix, ((last, i) for i in range(last + 1)), "final_average")
    return float(matrix[last].mean())


def average_trajectory(R) -> np.ndarray:
    """A_j for each j: mean of R[j][0..j] (tasks seen so far); shape (T,)."""
    matrix = as_matrix(R)
    n = matrix.shape[0]
    _require(matrix, ((j, i) for j in range(n) for i in range(j + 1)), "average_trajectory")
    return np.array([matrix[j, : j + 1].mean() for j in range(n)])


def backward_transfer(R) -> float:
    """BWT = mean over i < T-1 of R[T-1][i] - R[i][i] (negative means forgetting)."""
    matrix = as_matrix(R)
    last = matrix.shape[0] - 1
    if last == 0:
        return float("nan")
    entries = [(last, i) for i in range(last)] + [(i, i) for i in range(last)]
    _require(matrix, entries, "backward_transfer")
    return float(np.mean([matrix[last, i] - matrix[i, i] for i in range(last)]))


def forward_transfer(R, baseline) -> float:
    """FWT = mean over i >= 1 of R[i-1][i] - baseline[i].

    `baseline[i]` is the reference score on task i (e.g. the untrained model);
    `baseline[0]` is not used. Needs the entries just above the diagonal, i.e.
    task i evaluated after training task i-1, before training it.
    """
    matrix = as_matrix(R)
    n = matrix.shape[0]
    base = np.asarray(baseline, dtype=np.float64)
    if base.shape != (n,):
        raise ValueError(f"baseline must have shape ({n},) (one score per task), got {base.shape}")
    if n == 1:
        return float("nan")
    _require(matrix, ((i - 1, i) for i in range(1, n)), "forward_transfer")
    missing = [f"baseline[{i}]" for i in range(1, n) if math.isnan(base[i])]
    if missing:
        raise ValueError(f"forward_transfer needs baseline scores that are NaN: {', '.join(missing)}")
    return float(np.mean([matrix[i - 1, i] - base[i] for i in range(1, n)]))


def forgetting(R, *, every: int = 1) -> float:
    """Average forgetting at the end (Chaudhry et al. 2018).

    f_i = max_{i <= l < T-1} R[l][i] - R[T-1][i] for each i < T-1, averaged:
    how far each earlier task fell below its best score after it was learned.
    Scores measured before task i was trained (l < i) are ignored. Positive
    means forgetting.
    `every`: the run's eval.every. Row l scored every seen task only when l+1
    is a multiple of it (and the last row); the rows between scored task l
    alone, so a task's best is taken over the rows that scored it: R[i][i],
    the full rows after it, never the entries a schedule skipped.
    """
    matrix = as_matrix(R)
    last = matrix.shape[0] - 1
    if last == 0:
        return float("nan")

    def scored(row: int, task: int) -> bool:
        return row == task or row == last or (row + 1) % every == 0

    entries = [(j, i) for i in range(last) for j in range(i, last + 1) if scored(j, i)]
    _require(matrix, entries, "forgetting")
    drops = [max(matrix[j, i] for j in range(i, last) if scored(j, i)) - matrix[last, i] for i in range(last)]
    return float(np.mean(drops))


def why_no_bwt(R, *, method: str | None = None) -> str:
    """Why BWT and forgetting are missing from a finished run's metrics ('' when they can be computed):
    they need each earlier task's score right after it was trained, R's diagonal, which eval.every > 1 skipped
    in runs begun before every task was scored after its training, and which `method` multitask never has (it
    trains once, on every task, at the end)."""
    matrix = as_matrix(R)
    missing = [f"R[{i}][{i}]" for i in range(matrix.shape[0] - 1) if math.isnan(matrix[i, i])]
    if not missing:
        return ""
    cause = ("multitask trains once, on every task together, after the last: there is no earlier training to "
             "forget" if method == "multitask" else "eval.every > 1 in a run from before every task was scored "
             "right after its training")
    # a long run's 49 entries are one wall of text: the first few and how many
    named = ", ".join(missing) if len(missing) <= 4 else f"{', '.join(missing[:3])}, ... ({len(missing)} entries)"
    return (f"bwt and forgetting not measured: they need each earlier task's score right after it was trained, "
            f"and {named} {'was' if len(missing) == 1 else 'were'} not evaluated ({cause})")


def measured(R, *, baseline=None, every: int = 1, strict: bool = True) -> dict[str, float]:
    """The end-of-sequence numbers a run reports, from an R whose last row scored every task: final_average;
    bwt and forgetting when every task was scored right after its training (R's diagonal: multitask never
    is); fwt when the untrained `baseline` is given and every task was scored before its training too (the
    entries above the diagonal, `eval.all_tasks`). Whatever else is missing raises, as each metric does: a
    missing evaluation is a bug in the run. strict=False (a report of whatever run folder it is given):
    such a metric is left out instead. `every`: as `forgetting`."""
    matrix = as_matrix(R)
    metrics = {"final_average": final_average}
    if not np.isnan(np.diag(matrix)).any():
        metrics["bwt"] = backward_transfer
        metrics["forgetting"] = lambda m: forgetting(m, every=every)
    n = matrix.shape[0]
    if n > 1 and baseline is not None:
        base = np.asarray(baseline, dtype=np.float64)
        if not np.isnan([matrix[i - 1, i] for i in range(1, n)]).any() and not np.isnan(base[1:]).any():
            metrics["fwt"] = lambda m: forward_transfer(m, base)
    out = {}
    for name, metric in metrics.items():
        try:
            out[name] = metric(matrix)
        except ValueError:
            if strict:
                raise
    return out


def summarize(R, *, baseline=None, every: int = 1) -> dict[str, float]:
    """All end-of-sequence numbers: final_average, bwt, forgetting, and fwt if `baseline`. `every`: the
    evaluation schedule that filled R (`eval.every`; `forgetting`)."""
    result = {
        "final_average": final_average(R),
        "bwt": backward_transfer(R),
        "forgetting": forgetting(R, every=every),
    }
    if baseline is not None:
        result["fwt"] = forward_transfer(R, baseline)
    return result
