"""Text blocks for the terminal and the run's report pages, over plain values (no I/O).

`format_matrix_table` is the R matrix as the end of a run prints it (one line per task instead where the
matrix is wider than the terminal, `format_task_scores`); `_md`, `_md_table`, `_html_table` and `_fmt`
are the escaping and table helpers `pages.py` builds `report.md` and `report.html` with. Every user string
is escaped for its format, so a task name cannot break a table or inject markup.
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence

import numpy as np

from dmea_dist.evaluation.continual import as_matrix


# --------------------------------------------------------------------- inputs
def _check_names(task_names: Sequence[str]) -> list[str]:
    names = list(task_names)
    if not names or not all(isinstance(name, str) for name in names):
        raise ValueError(f"task_names must be a non-empty list of strings, got {task_names!r}")
    duplicates = sorted({name for name in names if names.count(name) > 1})
    if duplicates:
        raise ValueError(f"task_names must be unique; repeated: {', '.join(duplicates)}")
    return names


# ----------------------------------------------------------------- formatting
def _fmt(value, precision: int) -> str:
    if value is None:
        return "-"
    if isinstance(value, (int, float, np.integer, np.floating)) and not isinstance(value, bool):
        return "-" if math.isnan(value) else f"{float(value):.{precision}f}"
    return str(value)


_MD_SPECIAL = re.compile(r"([\\`*\[\]<>|&~$])")
_MD_EDGE_UNDERSCORE = re.compile(r"(?<![A-Za-z0-9])_|_(?![A-Za-z0-9])")


def _md(text: str) -> str:
    """Escape a string for Markdown text or a table cell: it shows as written, on one line.

    Backslash-escapes what would otherwise start markup (emphasis, code, links, strikethrough, GitHub's `$`
    math), raw HTML or an entity (`<`, `&`), or end a table cell (`|`); line breaks become spaces. `_` only at a word's edge,
    where it can open emphasis, so snake_case names stay readable in the raw file.
    """
    text = _MD_SPECIAL.sub(r"\\\1", re.sub(r"\s*[\r\n]+\s*", " ", str(text)))
    return _MD_EDGE_UNDERSCORE.sub(r"\\_", text)


def _md_table(header: list[str], rows: list[list[str]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return lines


def format_matrix_table(task_names: Sequence[str], R, *, precision: int = 1, width: int | None = None) -> str:
    """R as aligned terminal text: rows `j name`, columns task indices, '-' for NaN.

    `width`: the terminal's columns. A table wider than that (a long sequence: 50 tasks take ~320 columns,
    wrapped into an unreadable block) is summarised as one line per task instead: its score right after its
    training (R[j][j]), its final score (R's last row) and the change (`format_task_scores`)."""
    names = _check_names(task_names)
    matrix = as_matrix(R, n_tasks=len(names))
    labels = [f"{j} {name}" for j, name in enumerate(names)]
    cells = [[_fmt(v, precision) for v in row] for row in matrix]
    cell = max(len(str(len(names) - 1)), *(len(c) for row in cells for c in row))
    label_width = max(len("after \\ task"), *(len(label) for label in labels))
    if width is not None and label_width + (cell + 2) * len(names) > width:
        return format_task_scores(names, matrix, precision=precision)
    lines = ["after \\ task".ljust(label_width) + "".join(
        f"  {i:>{cell}}" for i in range(len(names)))]
    for label, row in zip(labels, cells, strict=True):
        lines.append(label.ljust(label_width) + "".join(f"  {c:>{cell}}" for c in row))
    return "\n".join(lines)


def format_task_scores(task_names: Sequence[str], R, *, precision: int = 1) -> str:
    """One aligned line per task: `j name  own  final  change` (own: R[j][j]; final: R's last row), the
    (T, T) matrix's diagonal and last row, which a long sequence's terminal can show."""
    names = _check_names(task_names)
    matrix = as_matrix(R, n_tasks=len(names))
    labels = [f"{j} {name}" for j, name in enumerate(names)]
    rows = [[_fmt(matrix[i, i], precision), _fmt(matrix[-1, i], precision),
             _fmt(matrix[-1, i] - matrix[i, i], precision)] for i in range(len(names))]
    header = ["own", "final", "change"]
    cell = max(len("change"), *(len(c) for row in rows for c in row))
    label_width = max(len("task"), *(len(label) for label in labels))
    lines = [f"{len(names)} tasks, one line each (own: after its training; final: after the last task);",
             "the full matrix is in the run's report.html and R.npy.",
             "task".ljust(label_width) + "".join(f"  {h:>{cell}}" for h in header)]
    lines += [label.ljust(label_width) + "".join(f"  {c:>{cell}}" for c in row) for label, row in zip(labels, rows,
                                                                                                   strict=True)]
    return "\n".join(lines)


def _html_table(table_id: str, header: list[str], rows: list[list[str]]) -> list[str]:
    """A plain table; `header` and `rows` must already be escaped HTML."""
    out = [f'<table id="{table_id}">', "<tr>" + "".join(
        f'<th class="name">{h}</th>' if k == 0 else f"<th>{h}</th>"
        for k, h in enumerate(header)) + "</tr>"]
    for row in rows:
        out.append("<tr>" + "".join(
            f'<td class="name">{c}</td>' if k == 0 else f"<td>{c}</td>"
            for k, c in enumerate(row)) + "</tr>")
    out.append("</table>")
    return out
