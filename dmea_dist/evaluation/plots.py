"""The report's figures, drawn with matplotlib from plain values (no files, no pyplot state).

Each `*_figure` function takes lists, dicts and arrays and returns a
`matplotlib.figure.Figure`; `png(figure)` turns one into bytes, which the
report inlines (base64) and writes beside its Markdown.

Key decisions:
- `Figure` objects, not `pyplot`: nothing global, no display backend, safe in
  a driver that keeps running (matplotlib's Agg canvas draws them).
- Heatmaps use one perceptual colour map (viridis) with the value printed in
  every cell, grey for "not measured", so they read in greyscale too; scores
  scale over their own min..max, similarities over 0..1 so that panels side
  by side compare.
- Path diagram: layers bottom (0) to top, tasks left to right in sequence
  order; a new module is an orange cell, a reused one blue and names the task
  that added it; under each task, the modules and parameters it added.
- Figures grow with the number of tasks (long sequences stay readable) and
  are capped so the page stays light.
"""

from __future__ import annotations

import io
import math
from collections.abc import Sequence

import numpy as np
from matplotlib.figure import Figure

NEW_COLOUR, REUSED_COLOUR, NAN_COLOUR = "#f28e2b", "#a0c4e8", "#e6e6e6"
STAGE_COLOURS = {"expand": "#4e79a7", "select": "#bab0ac", "generate": "#59a14f", "adapt": "#e15759",
                 "evaluate": "#f28e2b", "record": "#9c755f"}
DPI = 100
SMALL_MULTIPLES = 12  # tasks up to which each gets its own panel of curves; a longer run's share one


def png(figure: Figure) -> bytes:
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=DPI, bbox_inches="tight")
    return buffer.getvalue()


def _short(name: str, width: int = 22) -> str:
    """A task, stream or run name cut to `width` characters, drawn as the literal text it is.

    Every user string reaches matplotlib through here: matplotlib reads text between two `$` as mathtext,
    which garbles a name like "from $5 to $10" and fails the whole figure (the report) on one that is no valid
    expression, so `$` is escaped; and a legend leaves out labels that start with `_`, so those get a space.
    """
    text = (name if len(name) <= width else name[: width - 1] + "…").replace("$", r"\$")
    return " " + text if text.startswith("_") else text


def _draw_heatmap(ax, matrix: np.ndarray, rows: Sequence[str], cols: Sequence[str], *, vmin: float, vmax: float,
                  precision: int):
    """One annotated heatmap on `ax`; returns the image (for a colour bar)."""
    from matplotlib import colormaps

    cmap = colormaps["viridis"].with_extremes(bad=NAN_COLOUR)
    image = ax.imshow(np.ma.masked_invalid(matrix), cmap=cmap, vmin=vmin, vmax=vmax, aspect="auto")
    if len(cols) > SMALL_MULTIPLES:  # names slanted under columns a fifth of an inch wide overlap: t<index>
        ax.set_xticks(range(len(cols)), [f"t{i}" for i in range(len(cols))], rotation=90, fontsize=7)
        ax.set_yticks(range(len(rows)), [f"t{j} {_short(r)}" for j, r in enumerate(rows)], fontsize=7)
    else:
        ax.set_xticks(range(len(cols)), [_short(c) for c in cols], rotation=35, ha="right", fontsize=8)
        ax.set_yticks(range(len(rows)), [_short(r) for r in rows], fontsize=8)
    if matrix.size <= 400:  # values in the cells while they fit
        span = (vmax - vmin) or 1.0
        for (j, i), value in np.ndenumerate(matrix):
            if math.isnan(value):
                ax.text(i, j, "-", ha="center", va="center", fontsize=8, color="#666")
            else:
                light = (value - vmin) / span > 0.6  # viridis is light at the top
                ax.text(i, j, f"{value:.{precision}f}", ha="center", va="center", fontsize=8,
                        color="#111" if light else "#fff")
    return image


def heatmap_figure(matrix: np.ndarray, tasks: Sequence[str], *, title: str, xlabel: str, ylabel: str,
                   precision: int = 1, vmin: float | None = None, vmax: float | None = None) -> Figure:
    """A (T, T) matrix as an annotated heatmap (NaN grey); colour over the finite min..max unless given."""
    finite = matrix[np.isfinite(matrix)]
    lo = float(finite.min()) if vmin is None and finite.size else (vmin or 0.0)
    hi = float(finite.max()) if vmax is None and finite.size else (vmax if vmax is not None else 1.0)
    side = min(12.0, 2.5 + 0.6 * len(tasks))
    figure = Figure(figsize=(side + 1.2, side))
    ax = figure.add_subplot()
    image = _draw_heatmap(ax, matrix, tasks, tasks, vmin=lo, vmax=hi if hi > lo else lo + 1e-9,
                          precision=precision)
    figure.colorbar(image, ax=ax, fraction=0.046, pad=0.04)
    ax.set(title=title, xlabel=xlabel, ylabel=ylabel)
    return figure


def similarity_figure(panels: Sequence[tuple[str, np.ndarray]], tasks: Sequence[str]) -> Figure:
    """Similarity matrices side by side, all on 0..1: what DMEA measured beside what the generator knows."""
    side = min(8.0, 2.5 + 0.45 * len(tasks))
    if len(tasks) > SMALL_MULTIPLES:  # side by side, a long run's panels were 26 inches wide, shrunk to the page
        side = min(10.0, 2.5 + 0.2 * len(tasks))
        figure = Figure(figsize=(side + 1.2, (side + 0.4) * len(panels)), layout="constrained")
        axes = figure.subplots(len(panels), 1, squeeze=False)[:, 0]
    else:
        figure = Figure(figsize=((side + 0.6) * len(panels), side + 0.4), layout="constrained")
        axes = figure.subplots(1, len(panels), squeeze=False)[0]
    image = None
    for ax, (title, matrix) in zip(axes, panels, strict=True):
        image = _draw_heatmap(ax, matrix, tasks, tasks, vmin=0.0, vmax=1.0, precision=2)
        ax.set(title=title, xlabel="earlier task i", ylabel="new task n")
    figure.colorbar(image, ax=list(axes), fraction=0.03, pad=0.02)
    return figure


def path_figure(grid: Sequence[Sequence[tuple[int, str, int]]], tasks: Sequence[str],
                added: Sequence[int | None]) -> Figure:
    """Each task's path: layers (rows, 0 at the bottom) by tasks (columns); new vs reused modules."""
    from matplotlib.patches import Patch, Rectangle

    n_tasks, n_layers = len(grid), len(grid[0])
    figure = Figure(figsize=(min(22.0, 2.0 + 1.35 * n_tasks), min(14.0, 1.6 + 0.62 * n_layers)))
    ax = figure.add_subplot()
    for x, column in enumerate(grid):
        for layer, (module, kind, owner) in enumerate(column):
            ax.add_patch(Rectangle((x - 0.45, layer - 0.42), 0.9, 0.84, linewidth=0.8, edgecolor="#555",
                                   facecolor=NEW_COLOUR if kind == "new" else REUSED_COLOUR))
            label = f"m{module}\nnew" if kind == "new" else f"m{module}\n← t{owner}"
            ax.text(x, layer, label, ha="center", va="center", fontsize=7 if n_tasks > 12 else 8)
    labels = []
    for x, task in enumerate(tasks):
        new = sum(kind == "new" for _, kind, _ in grid[x])
        if n_tasks > SMALL_MULTIPLES:  # columns under half an inch: names and counts overlapped into one smear;
            labels.append(f"t{x}\n+{new}")  # the per-task table beside names each task and its parameters
            continue
        grown = f"+{new} modules" + (f"\n+{added[x]:,} params" if added[x] is not None else "")
        labels.append(f"t{x} {_short(task, 20)}\n{grown}")
    ax.set_xticks(range(n_tasks), labels, fontsize=7 if n_tasks > 8 else 8)
    if n_tasks > SMALL_MULTIPLES:
        ax.set_xlabel("task t<index>, + the modules it added", fontsize=8)
    ax.set_yticks(range(n_layers), [f"layer {layer}" for layer in range(n_layers)], fontsize=8)
    ax.set_xlim(-0.6, n_tasks - 0.4)
    ax.set_ylim(-0.6, n_layers - 0.4)
    ax.tick_params(length=0)
    for side in ("top", "right", "left", "bottom"):
        ax.spines[side].set_visible(False)
    ax.legend(handles=[Patch(facecolor=NEW_COLOUR, edgecolor="#555", label="new module (added by this task)"),
                       Patch(facecolor=REUSED_COLOUR, edgecolor="#555", label="reused (← task that added it)")],
              loc="upper center", bbox_to_anchor=(0.5, -0.22 if n_tasks <= 8 else -0.3), ncol=2, fontsize=8,
              frameon=False)
    ax.set_title("Paths: the module each task uses in each layer")
    return figure


def _smoothed(values: list[float], smooth: int) -> tuple[np.ndarray, np.ndarray]:
    """(steps, values) with a moving average over `smooth` steps where there are enough: per-step values are
    noisy."""
    y = np.asarray(values, dtype=float)
    if smooth > 1 and len(y) > 2 * smooth:
        return np.arange(len(y) - smooth + 1) + smooth - 1, np.convolve(y, np.ones(smooth) / smooth, mode="valid")
    return np.arange(len(y)), y


def curves_figure(curves: dict[str, dict[str, list[float]]], *, title: str, ylabel: str, log: bool = False,
                  bounds: tuple[float, float] | None = None, smooth: int = 1,
                  tasks: Sequence[str] | None = None) -> Figure:
    """One panel per task, one line per stream (e.g. eta per replayed task); dashed `bounds` (the clamp).
    More than SMALL_MULTIPLES tasks: `sequence_curves_figure` (`tasks`: the run's, for the t<index> labels)."""
    if len(curves) > SMALL_MULTIPLES:
        return sequence_curves_figure(curves, title=title, ylabel=ylabel, log=log, bounds=bounds, smooth=smooth,
                                      tasks=tasks)
    tasks = list(curves)
    cols = min(3, len(tasks))
    rows = math.ceil(len(tasks) / cols)
    figure = Figure(figsize=(4.6 * cols, 3.1 * rows), layout="constrained")
    axes = figure.subplots(rows, cols, squeeze=False).ravel()
    for ax, task in zip(axes, tasks, strict=False):
        for stream, values in sorted(curves[task].items()):
            ax.plot(*_smoothed(values, smooth), label=_short(stream, 30), linewidth=1.2)
        if bounds:
            for bound in bounds:
                ax.axhline(bound, linestyle="--", linewidth=0.8, color="#888")
        if log:
            ax.set_yscale("log")
        ax.set_title(f"learning {_short(task, 30)}", fontsize=9)
        ax.set_xlabel("adaptation step", fontsize=8)
        ax.set_ylabel(ylabel, fontsize=8)
        ax.tick_params(labelsize=7)
        ax.legend(fontsize=7)
    for ax in axes[len(tasks):]:
        ax.set_visible(False)
    figure.suptitle(title, fontsize=10)
    return figure


def sequence_curves_figure(curves: dict[str, dict[str, list[float]]], *, title: str, ylabel: str,
                           log: bool = False, bounds: tuple[float, float] | None = None, smooth: int = 1,
                           tasks: Sequence[str] | None = None) -> Figure:
    """A long run's curves in one panel: the tasks' adaptations one after another along x (a grey line between
    tasks, `t<index>` under each), a colour per kind of stream (new, replay, transfer), not per stream.

    One panel per task made 50 panels, a 14 x 53 inch image that took ~8 s to draw; this one takes a fraction
    of a second and shows what a long run asks of it: whether the curves settle task after task."""
    from matplotlib.lines import Line2D

    order = list(tasks) if tasks is not None else list(curves)
    figure = Figure(figsize=(14.0, 4.2), layout="constrained")
    ax = figure.add_subplot()
    kinds: dict[str, str] = {}
    colours = ["#4e79a7", "#f28e2b", "#59a14f", "#e15759", "#76b7b2", "#b07aa1"]
    start, centres, labels = 0, [], []
    for task, streams in curves.items():
        length = max(len(values) for values in streams.values())
        for stream, values in sorted(streams.items()):
            kind = stream.split(":", 1)[0]
            colour = kinds.setdefault(kind, colours[len(kinds) % len(colours)])
            steps, y = _smoothed(values, smooth)
            ax.plot(start + steps, y, color=colour, linewidth=0.9, alpha=0.85)
        if start:
            ax.axvline(start - 0.5, color="#ccc", linewidth=0.6)
        centres.append(start + length / 2)
        labels.append(f"t{order.index(task)}" if task in order else _short(task, 8))
        start += length
    if bounds:
        for bound in bounds:
            ax.axhline(bound, linestyle="--", linewidth=0.8, color="#888")
    if log:
        ax.set_yscale("log")
    ax.set_xlim(-0.5, start - 0.5)
    ax.set_xticks(centres, labels, rotation=90, fontsize=7)
    ax.tick_params(axis="x", length=0)
    ax.tick_params(axis="y", labelsize=7)
    ax.set_xlabel("adaptation steps, task after task (t<index>: the task learnt)", fontsize=8)
    ax.set_ylabel(ylabel, fontsize=8)
    ax.legend(handles=[Line2D([], [], color=c, label=_short(kind, 30)) for kind, c in kinds.items()], fontsize=7,
              loc="lower right", bbox_to_anchor=(1.0, 1.0), ncol=len(kinds), frameon=False)  # above: off the data
    ax.set_title(title, fontsize=10)
    return figure


def pseudo_figure(rows: Sequence[dict], tasks: Sequence[str] | None = None) -> Figure:
    """Yield and fidelity of every pseudo-sample batch (0..1), with kept/requested above the bars.

    More than 2 * SMALL_MULTIPLES batches (a long run: two per task) and the run's `tasks`: each batch is
    labelled `t<earlier>→t<new>` upright, and only a batch kept short of its request says so (98 batches in
    20 inches overlapped every name and every "32/32 kept" into one smear)."""
    many = len(rows) > 2 * SMALL_MULTIPLES and tasks is not None
    if many:
        labels = [f"t{tasks.index(r['of'])}→t{tasks.index(r['task'])}" for r in rows]
    else:
        labels = [f"{_short(r['of'], 24)}\nfor {_short(r['task'], 24)}" + (f"\n({r['role']})" if r["role"] else "")
                  for r in rows]
    x = np.arange(len(rows))
    figure = Figure(figsize=(min(20.0, 3.0 + 1.6 * len(rows)), 3.8))
    ax = figure.add_subplot()
    ax.bar(x - 0.2, [r["yield"] for r in rows], width=0.4, label="yield: well formed / generated", color="#4e79a7")
    # no fidelity measure (RNNLG, E2E, a user's tasks): no bar, not a bar of height 0 that reads as fidelity 0,
    # and where no task has one, no fidelity in the legend either
    if any(r["fidelity"] is not None for r in rows):
        ax.bar(x + 0.2, [r["fidelity"] if r["fidelity"] is not None else np.nan for r in rows], width=0.4,
               label="fidelity: answer realises its own input", color="#59a14f")
    real = [(i, r["real_fidelity"]) for i, r in enumerate(rows) if r.get("real_fidelity") is not None]
    if real:  # what the model that wrote them answers on real inputs: the ceiling of the green bar
        ax.scatter([x[i] + 0.2 for i, _ in real], [v for _, v in real], marker="_", s=300, color="black", zorder=3,
                   label="fidelity of its answers to real inputs")
    for i, r in enumerate(rows):
        if r["kept"] is not None and r["requested"] is not None and not (many and r["kept"] >= r["requested"]):
            ax.text(i, 1.03, f"{int(r['kept'])}/{int(r['requested'])} kept", ha="center", fontsize=7,
                    rotation=90 if many else 0, va="bottom" if many else "baseline")
    if many:
        ax.set_xticks(x, labels, fontsize=7, rotation=90)
        ax.set_xlim(-0.6, len(rows) - 0.4)
        ax.set_xlabel("earlier task → new task it was generated for; kept/requested shown where short", fontsize=8)
    else:
        ax.set_xticks(x, labels, fontsize=7)
    ax.set_ylim(0, 1.15)
    ax.set_ylabel("share", fontsize=8)
    ax.legend(fontsize=7, ncol=2, loc="upper center", bbox_to_anchor=(0.5, -0.38 if many else -0.3), frameon=False)
    ax.set_title("Pseudo samples of earlier tasks", fontsize=10)
    return figure


def stage_figure(seconds: dict[str, dict[str, float]]) -> Figure:
    """Where each task's time went: one horizontal bar per task, stacked by stage."""
    tasks = list(seconds)
    figure = Figure(figsize=(8.0, min(14.0, 1.4 + 0.42 * len(tasks))))
    ax = figure.add_subplot()
    left = np.zeros(len(tasks))
    for stage, colour in STAGE_COLOURS.items():
        widths = np.array([seconds[t].get(stage, 0.0) for t in tasks])
        ax.barh(range(len(tasks)), widths, left=left, color=colour, label=stage)
        left += widths
    for y, total in enumerate(left):
        ax.text(total, y, f" {total:.1f}s", va="center", fontsize=7)
    ax.set_yticks(range(len(tasks)), [f"t{i} {_short(t)}" for i, t in enumerate(tasks)], fontsize=8)
    ax.invert_yaxis()
    ax.set_xlabel("seconds", fontsize=8)
    ax.set_xlim(0, max(1.0, float(left.max(initial=0.0))) * 1.15)
    ax.legend(fontsize=7, ncol=6, loc="upper center", bbox_to_anchor=(0.5, -0.18), frameon=False)
    ax.set_title("Time per task, by stage", fontsize=10)
    return figure


def comparison_figure(runs: Sequence[str], tasks: Sequence[str], finals: Sequence[np.ndarray],
                      trajectories: Sequence[np.ndarray], *, metric: str = "score") -> Figure:
    """Runs side by side: the final score of every task (bars) and the average so far after each task (lines;
    NaN where a run did not score every seen task, eval.every > 1: its points only); both y axes name the
    `metric` the scores are. More than SMALL_MULTIPLES tasks: the lines under the bars, t<index> labels (side
    by side, 50 tasks made a 20-inch image the page shrank and labels that overlapped)."""
    long = len(tasks) > SMALL_MULTIPLES
    if long:
        figure = Figure(figsize=(15.0, 7.6), layout="constrained")
        bars, lines = figure.subplots(2, 1)
    else:
        figure = Figure(figsize=(min(20.0, 5.0 + 0.9 * len(tasks) * max(1, len(runs) / 2)), 3.8),
                        layout="constrained")
        bars, lines = figure.subplots(1, 2, width_ratios=[2, 1])
    width = 0.8 / len(runs)
    x = np.arange(len(tasks))
    for k, (run, final, trajectory) in enumerate(zip(runs, finals, trajectories, strict=True)):
        bars.bar(x - 0.4 + width * (k + 0.5), final, width=width, label=_short(run, 40))
        scored = np.flatnonzero(np.isfinite(trajectory))
        lines.plot(scored, np.asarray(trajectory)[scored], marker="o", markersize=4 if long else 6,
                   label=_short(run, 40))
    if long:
        bars.set_xticks(x, [f"t{i}" for i in x], rotation=90, fontsize=7)
        bars.set_xlim(-0.6, len(tasks) - 0.4)
        lines.set_xticks(x, [f"t{i}" for i in x], rotation=90, fontsize=7)
        lines.set_xlim(-0.6, len(tasks) - 0.4)
    else:
        bars.set_xticks(x, [f"t{i} {_short(t, 24)}" for i, t in enumerate(tasks)], rotation=30, ha="right",
                        fontsize=7)
        lines.set_xticks(range(len(tasks)), [f"t{i}" for i in range(len(tasks))], fontsize=7)
    bars.set_title("Final score per task (last row of R)", fontsize=10)
    bars.set_ylabel(_short(metric), fontsize=8)
    lines.set_ylabel(_short(metric), fontsize=8)
    bars.legend(fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.12 if long else -0.3),
                ncol=min(2, len(runs)), frameon=False)
    lines.set_title("Average over tasks seen, after each task", fontsize=10)
    lines.set_xlabel("after training task", fontsize=8)
    return figure
