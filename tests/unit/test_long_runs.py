"""What a long run (50 tasks, as configs/synth50_tiny.yaml) shows when it ends and in `dmea report`.

Run folders are written by `long_run.make_long_run` (no training). Visual checks are measured: a
figure's tick labels must not overlap, a figure must fit the page, the terminal table must fit its width.
"""

from __future__ import annotations

import numpy as np

from dmea_dist import driver
from dmea_dist.evaluation import plots
from dmea_dist.evaluation.pages import comparison_section, summary_lines
from dmea_dist.evaluation.report import format_matrix_table
from dmea_dist.evaluation.run_data import (
    ground_truth,
    load_run,
    params_added,
    path_grid,
    pseudo_samples,
    sequence_metrics,
    series,
)
from tests.unit.long_run import SYNTH50, long_r, make_long_run


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


# ------------------------------------------------------------------ figures


def _overlapping(figure, labels) -> list[tuple[str, str]]:
    """Pairs of visible, non-empty labels whose drawn boxes overlap (the figure drawn as the report draws it)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    renderer = FigureCanvasAgg(figure).get_renderer()
    figure.draw(renderer)
    shown = [(t.get_text(), t.get_window_extent(renderer)) for t in labels if t.get_visible() and t.get_text()]
    return [(a, b) for k, (a, box) in enumerate(shown) for b, other in shown[k + 1:] if box.overlaps(other)]


def _axes_shown(figure):
    return [ax for ax in figure.axes if ax.get_visible()]


def test_curves_of_a_long_run_are_one_panel_along_the_sequence(tmp_path):
    """One panel per task: 49 eta and 50 loss panels, 14 x 53 inch images that took ~8 s each to draw (a 50-task
    report took 18 s, 17 of them these two). A long run gets one panel with the tasks one after another."""
    run = load_run(make_long_run(tmp_path))
    for prefix, kinds in (("eta", ["replay"]), ("loss", ["new", "replay"])):
        figure = plots.curves_figure(series(run.records, prefix), title=prefix, ylabel=prefix, tasks=run.tasks,
                                     log=prefix == "eta")
        assert len(_axes_shown(figure)) == 1 and figure.get_size_inches()[1] <= 5
        ax = figure.axes[0]
        assert [t.get_text() for t in ax.get_legend().get_texts()] == kinds  # a colour per kind, not 98 entries
        labels = ax.get_xticklabels()
        assert [t.get_text() for t in labels] == [f"t{i}" for i in range(prefix == "eta", 50)]
        assert not _overlapping(figure, labels)
    short = plots.curves_figure({"a": {"new": [1.0, 0.5]}, "b": {"new": [1.0, 0.4]}}, title="x", ylabel="y")
    assert len(_axes_shown(short)) == 2  # a short run keeps a panel per task


def test_long_runs_figures_label_every_task_without_overlap(tmp_path):
    """50 tasks: the heatmaps' slanted names ran into each other, the path diagram's and the pseudo samples'
    labels were one smear, and the three similarity panels side by side made a 26-inch image the page shrank
    to 58% (its labels to 5 px). Every tick label is now apart, and the similarity fits the page's width."""
    run = load_run(make_long_run(tmp_path, every=5))
    added = params_added(run.paths, run.tasks, run.module_params)
    heat = plots.heatmap_figure(run.R, run.tasks, title="R", xlabel="task i", ylabel="after training task j")
    similarity = plots.similarity_figure([("a", run.similarity), ("b", run.token_similarity),
                                          ("c", ground_truth(run.tasks))], run.tasks)
    paths = plots.path_figure(path_grid(run.paths, run.tasks), run.tasks, [added[t] for t in run.tasks])
    rows = pseudo_samples(run.records, run.tasks)
    pseudo = plots.pseudo_figure(rows, run.tasks)
    for figure in (heat, similarity, paths, pseudo):
        for ax in _axes_shown(figure):
            for labels in (ax.get_xticklabels(), ax.get_yticklabels()):
                assert not _overlapping(figure, labels), (ax.get_title(), _overlapping(figure, labels)[:3])
    assert similarity.get_size_inches()[0] <= 15  # the page is 1500 px wide, at 100 dpi
    assert [t.get_text() for t in heat.axes[0].get_xticklabels()][:3] == ["t0", "t1", "t2"]
    assert heat.axes[0].get_yticklabels()[13].get_text() == "t13 synth.listops.01"
    new = sum(kind == "new" for _, kind, _ in path_grid(run.paths, run.tasks)[1])
    assert paths.axes[0].get_xticklabels()[1].get_text() == f"t1\n+{new}"
    assert pseudo.axes[0].get_xticklabels()[0].get_text() == f"t{run.tasks.index(rows[0]['of'])}→t1"


def test_a_comparison_of_long_runs_evaluated_every_fifth_task_is_drawn(tmp_path, monkeypatch):
    """Two 50-task runs with eval.every 5 (what a long run uses): the comparison had no figure at all, only a
    note, though the last row scores every task and every fifth row the average so far. It draws both, the
    average at the rows that scored every seen task; its labels do not overlap and it fits the page."""
    drawn = []
    real = plots.comparison_figure
    monkeypatch.setattr(plots, "comparison_figure", lambda *a, **kw: drawn.append(real(*a, **kw)) or drawn[-1])
    runs = [load_run(make_long_run(tmp_path / "a", every=5)),
            load_run(make_long_run(tmp_path / "b", every=5, method="acm", seed=1))]
    section = comparison_section(runs)
    assert section.panels[1].image and section.panels[2].table[0][0] == "final score"
    figure = drawn[0]
    assert figure.get_size_inches()[0] <= 15
    bars, lines = figure.axes
    points = lines.get_lines()[0].get_xdata()
    assert list(points) == [0, *range(4, 50, 5)]  # after t0 (it alone seen), t4, t9, ..., t49
    for ax in (bars, lines):
        assert not _overlapping(figure, ax.get_xticklabels())


def test_a_long_runs_summary_is_a_paragraph_not_every_name(tmp_path):
    """'What happened' named all 50 tasks and every task's selection: a 2,700-character wall before the first
    table. A long run names its first and last task and the most chosen ones; the per-task table has the rest."""
    run = load_run(make_long_run(tmp_path, every=5, done=33, resumed=True))
    lines = summary_lines(run)
    assert len(" ".join(lines)) < 800, lines
    assert lines[0].startswith("dmea on 50 tasks (synth.hotel.00, ..., synth.travel.07: each in the per-task table)")
    assert any(line.startswith("Selection: 32 tasks chose earlier ones") and "times)" in line for line in lines)
