"""End-of-run reports: the R matrix, CL metrics, task similarity and paths.

Three renderers over plain values (task names, arrays, dicts), no I/O:
`format_matrix_table` for the terminal, `render_markdown`, and `render_html`
(one self-contained page: task-by-task heatmaps as table cells with inline
background colours, no JavaScript, no external assets, no matplotlib).

Key decisions:
- Heatmap colours scale linearly between the finite min and max of each
  matrix (stated under the table), so a run whose scores all sit in 30..40
  still shows structure; NaN cells are grey and print "-".
- In the paths table a module id shown in bold is new: no earlier task (in
  `task_names` order) uses it in that layer. Its count per task is how much
  the model grew for that task.
- Every user string (task names, notes, metric names) is escaped for the
  output format, so a note cannot break the table or inject markup.
"""

from __future__ import annotations

import html
import math
import re
from collections.abc import Mapping, Sequence

import numpy as np

from dmea_dist.evaluation.continual import as_matrix

_LIGHT = (247, 251, 255)  # low end of the colour scale (near white)
_DARK = (8, 48, 107)  # high end (dark blue)
_NAN_BG = "#e0e0e0"
_R_LEGEND = "Row j: after training task j; column i: score on task i."
_SIM_LEGEND = "Row n: new task; column i: similarity to task i."

_CSS = """
body { font-family: sans-serif; margin: 2em; color: #222; }
table { border-collapse: collapse; margin: 0.5em 0 1.5em; }
th, td { border: 1px solid #ccc; padding: 4px 8px; text-align: right; }
th { background: #f4f4f4; }
td.name, th.name { text-align: left; }
p.legend { color: #555; font-size: 0.9em; }
"""


# --------------------------------------------------------------------- inputs
def _check_names(task_names: Sequence[str]) -> list[str]:
    names = list(task_names)
    if not names or not all(isinstance(name, str) for name in names):
        raise ValueError(f"task_names must be a non-empty list of strings, got {task_names!r}")
    duplicates = sorted({name for name in names if names.count(name) > 1})
    if duplicates:
        raise ValueError(f"task_names must be unique; repeated: {', '.join(duplicates)}")
    return names


def _check_keys(mapping: Mapping | None, names: list[str], what: str) -> dict:
    if mapping is None:
        return {}
    unknown = [key for key in mapping if key not in names]
    if unknown:
        raise ValueError(
            f"{what} has unknown task names {unknown}; known tasks: {', '.join(names)}"
        )
    return dict(mapping)


def _check_paths(paths: Mapping | None, names: list[str]) -> dict[str, list[int]]:
    checked = {task: list(path) for task, path in _check_keys(paths, names, "paths").items()}
    lengths = {len(path) for path in checked.values()}
    if len(lengths) > 1:
        by_task = ", ".join(f"{task}: {len(path)}" for task, path in checked.items())
        raise ValueError(f"every path needs one module id per layer; lengths differ ({by_task})")
    for task, path in checked.items():
        if not all(isinstance(m, (int, np.integer)) and not isinstance(m, bool) for m in path):
            raise ValueError(f"path of task {task!r} must be a list of int module ids, got {path}")
    return checked


def _new_modules(paths: dict[str, list[int]], names: list[str]) -> dict[str, set[int]]:
    """Layers where each task's path uses a module no earlier task used: {task: {layer}}."""
    seen: dict[int, set[int]] = {}  # layer -> module ids used so far
    new: dict[str, set[int]] = {}
    for task in names:
        if task not in paths:
            continue
        new[task] = set()
        for layer, module in enumerate(paths[task]):
            if module not in seen.setdefault(layer, set()):
                new[task].add(layer)
                seen[layer].add(module)
    return new


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


def _heat_colour(value: float, lo: float, hi: float) -> tuple[str, str]:
    """(background, text colour) for `value` on a light-to-dark scale over [lo, hi]."""
    if math.isnan(value):
        return _NAN_BG, "#222"
    t = 0.5 if hi == lo else (value - lo) / (hi - lo)
    rgb = [round(a + t * (b - a)) for a, b in zip(_LIGHT, _DARK, strict=True)]
    return "#{:02x}{:02x}{:02x}".format(*rgb), ("#fff" if t > 0.55 else "#222")


def _finite_range(matrix: np.ndarray) -> tuple[float, float] | None:
    finite = matrix[np.isfinite(matrix)]
    return (float(finite.min()), float(finite.max())) if finite.size else None


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


# ------------------------------------------------------- rows and Markdown
def _task_rows(names, matrix, notes, new, precision, escape) -> list[list[str]]:
    """Per-task rows: own score (diagonal), final score (last row), change, new, note."""
    last = matrix.shape[0] - 1
    rows = []
    for i, task in enumerate(names):
        own, final = matrix[i, i], matrix[last, i]
        row = [escape(task), _fmt(own, precision), _fmt(final, precision),
               _fmt(final - own, precision)]
        if new:
            row.append(str(len(new[task])) if task in new else "-")
        rows.append(row + [escape(str(notes.get(task, "")))])
    return rows


def _path_rows(paths, names, bold, escape) -> tuple[list[str], list[list[str]]]:
    """Header and rows of the paths table; new module ids wrapped by `bold`."""
    new = _new_modules(paths, names)
    n_layers = len(next(iter(paths.values())))
    header = ["task"] + [f"L{layer}" for layer in range(n_layers)] + ["new"]
    rows = []
    for task in (name for name in names if name in paths):
        ids = [bold(str(m)) if layer in new[task] else str(m)
               for layer, m in enumerate(paths[task])]
        rows.append([escape(task)] + ids + [str(len(new[task]))])
    return header, rows


def _prepare(task_names, R, similarity, paths, notes):
    """Validate the renderers' inputs; returns names, R, similarity, paths, new, notes."""
    names = _check_names(task_names)
    matrix = as_matrix(R, n_tasks=len(names))
    sim = None if similarity is None else as_matrix(
        similarity, name="similarity", n_tasks=len(names))
    checked_paths = _check_paths(paths, names)
    new = _new_modules(checked_paths, names)
    return names, matrix, sim, checked_paths, new, _check_keys(notes, names, "notes")


def _task_header(new: dict) -> list[str]:
    return ["task", "after own training", "final", "change"] + (
        ["new modules"] if new else []) + ["note"]


def _md_matrix(names: list[str], matrix: np.ndarray, corner: str, precision: int) -> list[str]:
    rows = [[_md(name)] + [_fmt(v, precision) for v in row]
            for name, row in zip(names, matrix, strict=True)]
    return _md_table([corner] + [_md(name) for name in names], rows)


def render_markdown(
    task_names: Sequence[str],
    R,
    metrics: Mapping[str, object],
    *,
    similarity=None,
    paths: Mapping[str, Sequence[int]] | None = None,
    notes: Mapping[str, str] | None = None,
    title: str = "dmea-dist report",
    precision: int = 2,
) -> str:
    """A Markdown report: summary metrics, R, per-task scores, similarity, paths."""
    names, matrix, sim, checked_paths, new, notes = _prepare(
        task_names, R, similarity, paths, notes)
    lines = [f"# {_md(title)}", "", "## Summary", ""]
    lines += _md_table(["metric", "value"],
                       [[_md(k), _fmt(v, precision)] for k, v in metrics.items()])
    lines += ["", "## Scores R", "", _R_LEGEND, ""]
    lines += _md_matrix(names, matrix, "after \\ task", precision)
    lines += ["", "## Per task", ""]
    lines += _md_table(_task_header(new), _task_rows(names, matrix, notes, new, precision, _md))
    if sim is not None:
        lines += ["", "## Task similarity", "", _SIM_LEGEND, ""]
        lines += _md_matrix(names, sim, "task", 3)
    if checked_paths:
        lines += ["", "## Paths", "", "Module id per layer; **bold** = new module.", ""]
        lines += _md_table(*_path_rows(checked_paths, names, lambda m: f"**{m}**", _md))
    return "\n".join(lines) + "\n"


# ----------------------------------------------------------------------- HTML
def _html_heatmap(names, matrix, *, table_id, legend, corner, precision) -> list[str]:
    """A matrix as a table whose cells are coloured by value (inline styles)."""
    esc = html.escape
    span = _finite_range(matrix)
    lo, hi = span if span else (0.0, 0.0)
    out = [f'<table id="{table_id}">', "<tr><th class=\"name\">" + esc(corner) + "</th>"
           + "".join(f"<th>{esc(n)}</th>" for n in names) + "</tr>"]
    for j, row in enumerate(matrix):
        cells = []
        for i, value in enumerate(row):
            bg, fg = _heat_colour(value, lo, hi)
            cells.append(f'<td class="heat" style="background:{bg};color:{fg}" '
                         f'title="[{j}][{i}] {esc(names[j])} / {esc(names[i])}">'
                         f"{_fmt(value, precision)}</td>")
        out.append(f'<tr><th class="name">{esc(names[j])}</th>{"".join(cells)}</tr>')
    out.append("</table>")
    scale = (f"colour scale {_fmt(lo, precision)} (light) to {_fmt(hi, precision)} (dark)"
             if span else "no evaluated entries")
    out.append(f'<p class="legend">{esc(legend)} {esc(scale)}; grey: not evaluated.</p>')
    return out


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


def render_html(
    task_names: Sequence[str],
    R,
    metrics: Mapping[str, object],
    *,
    similarity=None,
    paths: Mapping[str, Sequence[int]] | None = None,
    notes: Mapping[str, str] | None = None,
    title: str = "dmea-dist report",
    precision: int = 2,
) -> str:
    """A self-contained HTML page: summary, heatmaps of R and similarity, paths."""
    names, matrix, sim, checked_paths, new, notes = _prepare(
        task_names, R, similarity, paths, notes)
    esc = html.escape
    body = [f"<h1>{esc(title)}</h1>", "<h2>Summary</h2>"]
    body += _html_table("metrics", ["metric", "value"],
                        [[esc(str(k)), esc(_fmt(v, precision))] for k, v in metrics.items()])
    body.append("<h2>Scores R</h2>")
    body += _html_heatmap(names, matrix, table_id="scores", legend=_R_LEGEND,
                          corner="after \\ task", precision=precision)
    body.append("<h2>Per task</h2>")
    body += _html_table("tasks", _task_header(new),
                        _task_rows(names, matrix, notes, new, precision, esc))
    if sim is not None:
        body.append("<h2>Task similarity</h2>")
        body += _html_heatmap(names, sim, table_id="similarity", legend=_SIM_LEGEND,
                              corner="task", precision=3)
    if checked_paths:
        body += ["<h2>Paths</h2>",
                 '<p class="legend">Module id per layer; bold = new module.</p>']
        body += _html_table("paths", *_path_rows(
            checked_paths, names, lambda m: f"<strong>{m}</strong>", esc))
    head = (f'<head><meta charset="utf-8"><title>{esc(title)}</title>'
            f"<style>{_CSS}</style></head>")
    return "<!DOCTYPE html>\n<html>" + head + "<body>\n" + "\n".join(body) + "\n</body></html>\n"
