"""The report a person reads: one self-contained HTML page and its Markdown twin, for one run or several.

`write_report(run_dirs, out=...)` reads each run directory (`run_data.load_run`),
draws the figures (`plots`), and writes

    out/report.html          one page, images inline (base64 PNG), no script, no network
    out/report.md            the same sections, images linked from report_files/
    out/report_files/*.png   every figure (also logged to the parent MLflow run)

Sections, in the order a reader asks: what happened (sentences), the metrics
table, scores R, per task, task similarity (beside the generator's ground
truth for synthetic tasks), paths, eta curves and adaptation losses, pseudo
samples, time per stage. Several runs (e.g. dmea and acm on one sequence)
get a comparison first, then every section with the runs side by side.
Each figure says how to read it in one line under it.
"""

from __future__ import annotations

import base64
import html
import math
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from dmea_dist.evaluation import plots
from dmea_dist.evaluation.continual import why_no_bwt
from dmea_dist.evaluation.report import _fmt, _html_table, _md, _md_table
from dmea_dist.evaluation.run_data import (
    RunData,
    full_rows,
    ground_truth,
    last_evaluated,
    load_run,
    params_added,
    path_grid,
    peak_memory,
    pseudo_samples,
    series,
    stage_seconds,
)
from dmea_dist.files import make_dirs, write_bytes, write_text
from dmea_dist.method.policy import MethodPolicy, method_policy

METRIC_NOTES = {
    "final_average": "A_T: mean score over all tasks after the last one (the papers' number)",
    "bwt": "BWT: mean of R[T-1][i] - R[i][i]; negative means forgetting",
    "fwt": "FWT: mean of R[i-1][i] - untrained score; needs eval.all_tasks",
    "forgetting": "forgetting (Chaudhry et al. 2018): mean drop from each earlier task's best score before the last task to its final one (negative: it ended above them all)",
}
CSS = """
body { font-family: system-ui, sans-serif; margin: 2em auto; max-width: 1500px; color: #222; padding: 0 1em; }
table { border-collapse: collapse; margin: 0.5em 0 1em; font-size: 0.9em; }
th, td { border: 1px solid #ccc; padding: 3px 8px; text-align: right; }
th { background: #f4f4f4; } td.name, th.name { text-align: left; }
.runs { display: grid; gap: 1.5em; align-items: start; }
.runs > div { min-width: 0; } figure { margin: 0; } img { max-width: 100%; height: auto; }
figcaption, p.note { color: #555; font-size: 0.88em; } h3 { font-size: 1em; margin: 0.3em 0; }
"""


@dataclass
class Panel:
    """One run's content in one section: a figure (PNG), a table, or a note."""

    image: bytes | None = None
    table: tuple[list[str], list[list[str]]] | None = None
    note: str = ""


@dataclass
class Section:
    key: str
    title: str
    caption: str
    panels: list[Panel] = field(default_factory=list)


@dataclass
class ReportFiles:
    html: Path
    markdown: Path
    figures: Path
    images: list[Path]


def write_report(run_dirs: Sequence[str | Path], *, out: str | Path | None = None) -> ReportFiles:
    """Write report.html, report.md and report_files/ for one run (default: in it) or a comparison."""
    if not run_dirs:
        raise ValueError("write_report needs at least one run directory")
    runs = [load_run(d) for d in run_dirs]
    for run, name in zip(runs, distinct_names(run_dirs), strict=True):
        run.name = name
    out = Path(out) if out else (Path(run_dirs[0]) if len(runs) == 1 else
                                 Path.cwd() / f"dmea-report-{time.strftime('%Y%m%d-%H%M%S')}")
    sections = ([comparison_section(runs)] if len(runs) > 1 else []) + run_sections(runs)
    figures = out / "report_files"
    make_dirs(figures)
    images: dict[tuple[str, int], Path] = {}
    for section in sections:
        for k, panel in enumerate(section.panels):
            if panel.image is not None:
                images[(section.key, k)] = figures / f"{section.key}-{k}.png"
                write_bytes(images[(section.key, k)], panel.image)
    title = "dmea-dist report: " + " vs ".join(f"{r.name} ({r.method})" for r in runs)
    summary = [summary_lines(r) for r in runs]
    # atomic, like the run's other files: a report rewritten over an older one (`dmea report` again, a resumed
    # run finishing) that is killed half-way leaves the older one whole, never a truncated page
    write_text(out / "report.md", render_markdown(title, runs, summary, sections, images, out))
    write_text(out / "report.html", render_html(title, runs, summary, sections))
    # a report written again into the same folder (`dmea report --out` reused, a comparison of fewer runs) with
    # fewer figures: the older ones would stay beside the page and go to MLflow with report_files/. Removed once
    # the new pages are written, so a report killed half-way leaves the old page's images
    for stale in set(figures.glob("*.png")) - set(images.values()):
        stale.unlink(missing_ok=True)
    return ReportFiles(html=out / "report.html", markdown=out / "report.md", figures=figures,
                       images=list(images.values()))


def distinct_names(run_dirs: Sequence[str | Path]) -> list[str]:
    """What the report calls each run: its folder's name, with as many parent folders as it takes to tell runs
    apart (two copies of one run, or runs of one name from two machines, compared side by side)."""
    parts = [Path(d).resolve().parts for d in run_dirs]
    for depth in range(1, max(len(p) for p in parts) + 1):
        names = ["/".join(p[-depth:]) for p in parts]
        if len(set(names)) == len(names):
            return names
    return names  # one folder given twice: the same name twice


# ------------------------------------------------------------------ sections


def run_sections(runs: list[RunData]) -> list[Section]:
    """Every section with one panel per run (a run that lacks a piece gets a note saying so)."""
    makers: list[tuple[str, str, str, Callable[[RunData], Panel]]] = [
        ("metrics", "Metrics", "Continual-learning metrics over the final R matrix, each with its definition.", metrics_panel),
        ("scores", "Scores R", "Row j: after training task j; column i: score on task i (colour over the "
         "run's own range; grey: not evaluated).", scores_panel),
        ("tasks", "Per task", "Own score right after training, final score, change, what the task added, "
         "what it selected, how long it took, and the run's largest process by then: its high-water resident "
         "memory and which it was (on Ray the training ranks and the model replicas are workers of their own).",
         task_panel),
        ("similarity", "Task similarity", "Row n: new task, column i: earlier task. Subspace similarity "
         "chose the selected tasks; token similarity initialised the expansion search; ground truth is the "
         "generator's relatedness (synthetic tasks only).", similarity_panel),
        ("paths", "Paths", "One column per task, one row per layer: orange = a new module the task added, "
         "blue = a module reused from the task named (← tN).", paths_panel),
        ("eta", "Gradient scale eta per replayed task", "eta_i multiplies replayed task i's gradient at "
         "each adaptation step; dashed: the clamp. Near 1: no rescaling; at a bound: saturated; flat at 1: the "
         "method does not scale gradients (acm, or method.adaptation.gradient_scaling=false).", eta_panel),
        ("loss", "Adaptation losses", "Loss of each stream during adaptation (new task, replay, transfer), "
         "moving average over 5 steps.", loss_panel),
        ("pseudo", "Pseudo samples", "For each new task, the samples generated of earlier tasks: share well "
         "formed (yield) and share whose answer realises its own input (fidelity); black marks: the share of real "
         "test inputs the model that wrote them realised, the most its pseudo samples can be expected to reach.",
         pseudo_panel),
        ("time", "Time per stage", "Seconds each task spent in each stage (from the run's state).", time_panel),
    ]
    return [Section(key, title, caption, [make(r) for r in runs]) for key, title, caption, make in makers]


def metrics_panel(run: RunData) -> Panel:
    rows = [[_html_safe(METRIC_NOTES.get(k, k)), _fmt(v, 2)] for k, v in run.metrics.items()]
    if rows and (partial := _partial(run)):  # "the last task" of every definition is the last one done
        rows.insert(0, ["measured", _html_safe(partial)])
    if rows and "bwt" not in run.metrics and run.status == "finished" and (why := why_no_bwt(run.R, method=run.method)):
        what, _, because = why.partition(": ")
        rows.append([_html_safe(what), _html_safe(because)])
    return Panel(table=(["metric", "value"], rows)) if rows else Panel(note="no metrics: no task finished")


def scores_panel(run: RunData) -> Panel:
    if np.isnan(run.R).all():
        return Panel(note="no task was evaluated yet")
    return Panel(image=plots.png(plots.heatmap_figure(
        run.R, run.tasks, title=f"R ({run.metric_name})", xlabel="task i", ylabel="after training task j")))


def task_panel(run: RunData) -> Panel:
    added = params_added(run.paths, run.tasks, run.module_params)
    grid = dict(zip([t for t in run.tasks if t in run.paths], path_grid(run.paths, run.tasks), strict=True))
    seconds = stage_seconds(run.history, run.tasks)
    memory = peak_memory(run.history, run.tasks)
    done = tasks_done(run)
    last = done - 1 if done else run.R.shape[0] - 1  # a stopped run: its latest scores, not the empty last row
    rows = []
    for i, task in enumerate(run.tasks):
        new = sum(kind == "new" for _, kind, _ in grid[task]) if task in grid else None
        rows.append([f"t{i} {_html_safe(task)}", _fmt(run.R[i, i], 1),
                     # a task past the row read (a stopped run) has there a score from before its training
                     _fmt(run.R[last, i] if i <= last else None, 1),
                     _fmt(run.R[last, i] - run.R[i, i] if i <= last else None, 1), "-" if new is None else str(new),
                     "-" if added.get(task) is None else f"{added[task]:,}",
                     _html_safe(", ".join(run.selected.get(task, [])) or "-"),
                     f"{sum(seconds[task].values()):.1f}s",
                     f"{memory[task][0]:,.0f} MiB ({memory[task][1]})" if task in memory else "-"])
    final = "final" if done == len(run.tasks) or not done else f"after t{last}"
    header = ["task", "own", final, "change", "new modules", "params added", "selected", "time", "peak memory"]
    return Panel(table=(header, rows))


def similarity_panel(run: RunData) -> Panel:
    panels = [(title, m) for title, m in (("subspace similarity (selection)", run.similarity),
                                          ("token similarity (expansion init)", run.token_similarity),
                                          ("ground truth (generator)", ground_truth(run.tasks)))
              if m is not None and not np.isnan(m).all()]
    if not panels:
        policy = _policy(run)
        if policy is None or policy.search or policy.selection != "none":  # it measures similarity: why not here
            why = ("the run has one task: nothing earlier to compare with" if len(run.tasks) < 2 else
                   f"the run has not expanded a second task yet; run {run.status}")
        else:
            why = f"{run.method} neither selects nor searches"
        return Panel(note=f"no similarity recorded ({why})")
    return Panel(image=plots.png(plots.similarity_figure(panels, run.tasks)))


def paths_panel(run: RunData) -> Panel:
    tasks = [t for t in run.tasks if t in run.paths]
    if not tasks:
        policy = _policy(run)
        if policy is not None and policy.full_finetune:
            return Panel(note=f"no paths: {run.method} fine-tunes the whole backbone")
        return Panel(note=f"no paths recorded yet: no task has chosen its modules (run {run.status})")
    added = params_added(run.paths, run.tasks, run.module_params)
    return Panel(image=plots.png(plots.path_figure(path_grid(run.paths, run.tasks), tasks,
                                                   [added[t] for t in tasks])))


def eta_panel(run: RunData) -> Panel:
    eta = series(run.records, "eta")
    if not eta:
        return Panel(note=f"no eta recorded: {run.method} does not scale gradients, or nothing was replayed")
    return Panel(image=plots.png(plots.curves_figure(eta, title="eta per replayed task", ylabel="eta (log)",
                                                     log=True, bounds=run.eta_clamp, tasks=run.tasks)))


def loss_panel(run: RunData) -> Panel:
    loss = series(run.records, "loss")
    if not loss:
        return Panel(note="no adaptation losses recorded")
    return Panel(image=plots.png(plots.curves_figure(loss, title="adaptation loss per stream", ylabel="loss",
                                                     smooth=5, tasks=run.tasks)))


def pseudo_panel(run: RunData) -> Panel:
    rows = pseudo_samples(run.records, run.tasks)
    if not rows:
        return Panel(note=f"no pseudo samples: {run.method} generates none, or the run has one task")
    return Panel(image=plots.png(plots.pseudo_figure(rows, run.tasks)))


def time_panel(run: RunData) -> Panel:
    seconds = stage_seconds(run.history, run.tasks)
    done = {t: s for t, s in seconds.items() if sum(s.values()) > 0}
    if not done:
        return Panel(note="no stage finished yet")
    return Panel(image=plots.png(plots.stage_figure(done)))


def comparison_section(runs: list[RunData]) -> Section:
    """The runs' metrics side by side, and their scores when they ran the same tasks."""
    keys = list(dict.fromkeys(k for r in runs for k in r.metrics))
    # how much of its sequence each run's numbers cover: a stopped run's are over the tasks it did
    rows = [["tasks done"] + [f"{tasks_done(r)} of {len(r.tasks)}" + ("" if tasks_done(r) == len(r.tasks) else
                                                                     f" (run {_html_safe(r.status)})") for r in runs]]
    scorers = list(dict.fromkeys(r.metric_name for r in runs))
    if len(scorers) > 1:  # eval.metric differs: rouge beside bleu
        rows.append(["scored by"] + [_html_safe(r.metric_name) for r in runs])
    rows += [[_html_safe(k)] + [_fmt(r.metrics.get(k), 2) for r in runs] for k in keys]
    panels = [Panel(table=(["metric"] + [_html_safe(f"{r.name} ({r.method})") for r in runs], rows))]
    if len(scorers) > 1:
        panels.append(Panel(note=f"the runs score with different metrics (eval.metric: {', '.join(scorers)}): "
                                 f"their numbers do not compare; no side-by-side figure"))
    elif all(r.tasks == runs[0].tasks for r in runs):
        partial = [r.name for r in runs if not full_rows(r.R).all()]
        if all(np.isfinite(r.R[-1]).all() for r in runs):  # eval.every > 1 still evaluates all after the last
            # the average so far where a run scored every seen task: each task, or each eval.every-th (a long
            # run's usual setting, which had no figure at all)
            panels.append(Panel(image=plots.png(plots.comparison_figure(
                [f"{r.name} ({r.method})" for r in runs], runs[0].tasks, [r.R[-1] for r in runs],
                [_trajectory(r.R) for r in runs], metric=runs[0].metric_name))))
            if partial:
                panels.append(Panel(table=(["final score", *(_html_safe(f"{r.name} ({r.method})") for r in runs)],
                                           [[f"t{i} {_html_safe(task)}", *(_fmt(r.R[-1, i], 1) for r in runs)]
                                            for i, task in enumerate(runs[0].tasks)])))
        else:
            short = [r.name for r in runs if not np.isfinite(r.R[-1]).all()]
            panels.append(Panel(note=f"no side-by-side figure: {', '.join(short)} did not score every task after "
                                     f"the last (a stopped run): compare their sections below"))
    else:
        panels.append(Panel(note="the runs trained different task sequences: compare their sections below"))
    return Section("compare", "Comparison", "Metrics of each run; final scores and the average over tasks seen "
                   "so far, run by run.", panels)


def _trajectory(R: np.ndarray) -> np.ndarray:
    """(T,) the average over tasks seen after each task, NaN after a task whose row did not score them all."""
    full = full_rows(R)
    return np.array([R[j, : j + 1].mean() if full[j] else np.nan for j in range(R.shape[0])])


def summary_lines(run: RunData) -> list[str]:
    """What happened, in sentences a reader understands without the code."""
    m = run.metrics
    long = len(run.tasks) > plots.SMALL_MULTIPLES  # 50 names, and 49 selections below, were a 2,700-character wall
    named = f"{run.tasks[0]}, ..., {run.tasks[-1]}: each in the per-task table" if long else ", ".join(run.tasks)
    lines = [f"{run.method} on {len(run.tasks)} tasks ({named}); run status: {run.status}."]
    if run.unreadable:  # damaged, not missing: what they hold is absent below, not never made
        lines.append(f"Could not read {'; '.join(run.unreadable)}: what "
                     f"{'it holds' if len(run.unreadable) == 1 else 'they hold'} is missing from this report.")
    if "final_average" in m:
        partial = _partial(run)
        lines.append(("Average" if partial else "Final average") + f" {run.metric_name} {m['final_average']:.1f}"
                     + (f" {partial}" if partial else "")
                     + (f"; BWT {m['bwt']:+.2f} (negative = forgetting)" if _ok(m.get("bwt")) else "")
                     + (f"; forgetting {m['forgetting']:.2f}" if _ok(m.get("forgetting")) else "") + ".")
    if run.paths:
        added = params_added(run.paths, run.tasks, run.module_params)
        grid = path_grid(run.paths, run.tasks)
        new = sum(kind == "new" for row in grid for _, kind, _ in row)
        full = [f"t{run.tasks.index(t)}" for t, row in zip([t for t in run.tasks if t in run.paths], grid,
                                                          strict=True) if all(k == "reused" for _, k, _ in row)]
        params = sum(v for v in added.values() if v) if run.module_params else None
        lines.append(f"The model grew by {new} modules" + (f" ({params:,} parameters)" if params else "")
                     + (f"; {', '.join(full)} reused earlier modules in every layer." if full else "."))
    picks = [f"t{i} chose {', '.join(run.selected[t])}" for i, t in enumerate(run.tasks) if run.selected.get(t)]
    if picks and long:
        chosen = Counter(old for t in run.tasks for old in run.selected.get(t, []))
        lines.append(f"Selection: {len(picks)} tasks chose earlier ones (the per-task table's \"selected\"); most "
                     "chosen: " + ", ".join(f"{old} ({k} times)" for old, k in chosen.most_common(3)) + ".")
    elif picks:
        lines.append("Selection: " + "; ".join(picks) + ".")
    seconds = stage_seconds(run.history, run.tasks)
    total = sum(sum(s.values()) for s in seconds.values())
    if total > 0:
        by_stage = {st: sum(s[st] for s in seconds.values()) for st in plots.STAGE_COLOURS}
        slowest = max(by_stage, key=by_stage.get)
        lines.append(f"{total:.0f}s of stage time; {slowest} took {by_stage[slowest] / total:.0%}.")
    return lines


def _policy(run: RunData) -> MethodPolicy | None:
    """What the run's method does (None for a method this checkout does not know), to tell a missing piece the
    method never makes from one the run stopped before making."""
    try:
        return method_policy(run.method)
    except ValueError:
        return None


def tasks_done(run: RunData) -> int:
    """How many tasks the run's scores and metrics cover: all for a finished run; for a stopped one those up
    to the last task after which every seen task was scored (run_data.last_evaluated), where its metrics are
    computed (run_data.sequence_metrics)."""
    if run.status == "finished":
        return len(run.tasks)
    last = last_evaluated(run.R)
    return 0 if last is None else last + 1


def _partial(run: RunData) -> str:
    """'' when the run's numbers cover its whole sequence, else which part, e.g. "after t1 (2 of 3 tasks; run failed)"."""
    done = tasks_done(run)
    if done == len(run.tasks) or not done:
        return ""
    return f"after t{done - 1} ({done} of {len(run.tasks)} tasks; run {run.status})"


def _ok(value) -> bool:
    return value is not None and not (isinstance(value, float) and math.isnan(value))


def _html_safe(text: str) -> str:
    return html.escape(str(text))


# ------------------------------------------------------------------ renderers


def render_html(title: str, runs: list[RunData], summary: list[list[str]], sections: list[Section]) -> str:
    """One self-contained page: no script, no external asset; images as data: URIs."""
    esc = html.escape
    body = [f"<h1>{esc(title)}</h1>", "<h2>What happened</h2>", _grid(len(runs))]
    for run, lines in zip(runs, summary, strict=True):
        body.append(f"<div><h3>{esc(run.name)} ({esc(run.method)})</h3>"
                    + "".join(f"<p>{esc(line)}</p>" for line in lines) + "</div>")
    body.append("</div>")
    for section in sections:
        body += [f'<h2 id="{section.key}">{esc(section.title)}</h2>', f'<p class="note">{esc(section.caption)}</p>']
        panels = section.panels
        one = section.key == "compare"  # the comparison's panels are its parts, not runs
        body.append(_grid(1 if one else len(runs)))
        for k, panel in enumerate(panels):
            head = "" if one or len(runs) == 1 else f"<h3>{esc(runs[k].name)} ({esc(runs[k].method)})</h3>"
            body.append(f"<div>{head}{_html_panel(panel, f'fig-{section.key}-{k}', section.title)}</div>")
        body.append("</div>")
    head = f'<head><meta charset="utf-8"><title>{esc(title)}</title><style>{CSS}</style></head>'
    return "<!DOCTYPE html>\n<html>" + head + "<body>\n" + "\n".join(body) + "\n</body></html>\n"


def _grid(columns: int) -> str:
    return f'<div class="runs" style="grid-template-columns: repeat({columns}, minmax(0, 1fr))">'


def _html_panel(panel: Panel, element_id: str, alt: str) -> str:
    if panel.image is not None:
        data = base64.b64encode(panel.image).decode("ascii")
        return f'<figure><img id="{element_id}" alt="{html.escape(alt)}" src="data:image/png;base64,{data}"></figure>'
    if panel.table is not None:
        header, rows = panel.table
        return "\n".join(_html_table(element_id, header, rows))
    return f'<p class="note">{html.escape(panel.note)}</p>'


def render_markdown(title: str, runs: list[RunData], summary: list[list[str]], sections: list[Section],
                    images: dict[tuple[str, int], Path], out: Path) -> str:
    lines = [f"# {_md(title)}", "", "## What happened", ""]
    for run, said in zip(runs, summary, strict=True):
        lines += [f"**{_md(run.name)} ({_md(run.method)})**: " + " ".join(_md(line) for line in said), ""]
    for section in sections:
        lines += [f"## {section.title}", "", f"_{section.caption}_", ""]
        for k, panel in enumerate(section.panels):
            if len(runs) > 1 and section.key != "compare":
                lines += [f"### {_md(runs[k].name)} ({_md(runs[k].method)})", ""]
            if (section.key, k) in images:
                lines += [f"![{section.title}]({images[(section.key, k)].relative_to(out).as_posix()})", ""]
            elif panel.table is not None:
                header, rows = panel.table
                lines += _md_table([_md(html.unescape(h)) for h in header],
                                   [[_md(html.unescape(c)) for c in row] for row in rows]) + [""]
            else:
                lines += [_md(panel.note), ""]
    return "\n".join(lines)
