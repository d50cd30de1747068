"""What a long run (50 tasks, as configs/synth50_tiny.yaml) shows when it ends and in `dmea report`.

Run folders are written by `long_run.make_long_run` (no training). Visual checks are measured: a
figure's tick labels must not overlap, a figure must fit the page, the terminal table must fit its width.
"""

from __future__ import annotations

import numpy as np

from dmea_dist import driver
from dmea_dist.evaluation.report import format_matrix_table
from dmea_dist.evaluation.run_data import sequence_metrics
from tests.unit.long_run import SYNTH50, long_r


def test_the_end_of_a_long_run_fits_the_terminal(monkeypatch):
    """50 tasks made R's table 322 columns wide: wrapped in a 80-200 column terminal it was unreadable. It is
    one line per task there (own score, final score, change); a short run keeps its full matrix."""
    R = long_r(SYNTH50, every=5)
    for columns in (80, 120, 200):
        monkeypatch.setenv("COLUMNS", str(columns))
        lines = []
        driver.print_results(lines.append, SYNTH50, R, sequence_metrics(R, every=5), metric="rouge", method="dmea")
        text = "\n".join(lines).splitlines()
        start = text.index("R matrix (rouge, row j = after training task j):") + 1
        table = text[start:text.index("", start)]
        assert max(len(line) for line in table) <= columns, columns
        row = next(line for line in table if line.startswith("4 synth.sports.00"))
        assert row.split()[2:] == [f"{R[4, 4]:.1f}", f"{R[-1, 4]:.1f}", f"{R[-1, 4] - R[4, 4]:.1f}"]
        assert "report.html" in table[1] and len(table) < 60
    short = np.array([[80.0, np.nan, np.nan], [70.0, 60.0, np.nan], [65.0, 55.0, 90.0]])
    assert format_matrix_table(["a", "b", "c"], short, width=80) == format_matrix_table(["a", "b", "c"], short)
    assert format_matrix_table(["a", "b", "c"], short).splitlines()[3].split() == ["2", "c", "65.0", "55.0", "90.0"]
