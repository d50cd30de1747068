"""`dmea report`: figure data from a run directory, the page and its images, checked in a real browser.

The run directories here are written from dicts (what a run leaves on disk),
so nothing trains; the browser test renders the page in headless Chromium
where one is installed and looks at the pixels of the heatmap, the path
diagram and the eta curves.
"""

from __future__ import annotations

import base64
import io
import json
import re
import shutil
import subprocess
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pytest
import yaml
from PIL import Image

from dmea_dist.cli import main
from dmea_dist.data.synthetic import task_relatedness
from dmea_dist.errors import DmeaError
from dmea_dist.evaluation import plots
from dmea_dist.evaluation.pages import (
    comparison_section,
    metrics_panel,
    paths_panel,
    similarity_panel,
    summary_lines,
    task_panel,
    tasks_done,
    write_report,
)
from dmea_dist.evaluation.run_data import (
    NEW,
    REUSED,
    ground_truth,
    load_run,
    params_added,
    path_grid,
    peak_memory,
    pseudo_samples,
    series,
    stage_seconds,
)
from tests.unit.disk_log import DiskLog

TASKS = ["synth.restaurant.00", "synth.listops.00", "synth.restaurant.01"]
PATHS = {TASKS[0]: [0, 0, 0, 0], TASKS[1]: [1, 0, 1, 1], TASKS[2]: [0, 2, 1, 0]}
R = [[85.9, None, None], [85.0, 36.4, None], [86.4, 30.0, 80.8]]


def make_run(root: Path, *, method: str = "dmea", finished: bool = True, R=R, tasks=TASKS) -> Path:
    """A run directory as `dmea run` leaves it (without the module weights, which the report never reads);
    `tasks`: other names for the three tasks."""
    paths = dict(zip(tasks, PATHS.values(), strict=True))
    run = root / f"quickstart-20260101-000000-{method}"
    run.mkdir(parents=True)
    (run / "config.yaml").write_text(yaml.safe_dump({
        "name": "quickstart", "method": {"name": method, "adaptation": {"eta_clamp": [0.1, 10.0]}},
        "eval": {"metric": "rouge"}, "data": {"tasks": tasks}}))
    history = [{"task": t, "task_index": i, "stage": s, "seconds": sec}
               for i, t in enumerate(tasks) for s, sec in (("expand", 2.0 * i), ("adapt", 5.0), ("evaluate", 1.0))]
    state = {"format": "dmea-run-state", "version": 1, "task_index": 2, "stage": "done" if finished else "adapt",
             "status": "finished" if finished else "failed", "R": R,
             "similarity": [[None] * 3, [0.55, None, None], [0.96, 0.32, None]], "history": history,
             "tasks": [{"task_id": t, "index": i, "path": paths[t], "selected": [tasks[0]] if i else []}
                       for i, t in enumerate(tasks)]}
    (run / "state.json").write_text(json.dumps(state))
    for i, task in enumerate(tasks):
        folder = run / "tasks" / f"{i:03d}-{task}"
        (folder / "modules").mkdir(parents=True)
        (folder / "modules" / "manifest.json").write_text(json.dumps({"d_model": 64, "bottleneck": 32}))
        rec = {"task_id": task, "task_index": i, "params": {"replay": [tasks[0]] if i == 2 else [],
                                                             "transfer": [tasks[0]] if i else []},
               "metrics": {}, "series": {"loss.new": list(np.linspace(2, 1, 30))}}
        if i:
            rec["params"]["token_similarity"] = {tasks[0]: 0.9 if i == 2 else 0.2}
            rec["metrics"].update({f"pseudo.yield.{tasks[0]}": 1.0, f"pseudo.fidelity.{tasks[0]}": 0.5 + 0.1 * i,
                                   f"pseudo.kept.{tasks[0]}": 32.0, f"pseudo.requested.{tasks[0]}": 32.0})
        if i == 2:
            rec["series"][f"eta.replay:{tasks[0]}"] = [10.0, 3.0, 1.5, 1.2, 1.0, 1.0]
            rec["metrics"][f"pseudo.real_fidelity.{tasks[0]}"] = 0.8
        (folder / "record.json").write_text(json.dumps(rec))
    if finished:
        (run / "metrics.json").write_text(json.dumps({"final_average": 65.7, "bwt": -2.7, "forgetting": 3.2}))
    return run


# ------------------------------------------------------------------ figure data


@pytest.mark.parametrize("paths, expected", [
    # the first task adds every module; a later task reuses what it shares and adds the rest
    ({"a": [0, 0], "b": [0, 1]}, [[(0, NEW, 0), (0, NEW, 0)], [(0, REUSED, 0), (1, NEW, 1)]]),
    # a module is new only for the first task using it in that layer, whoever uses it later
    ({"a": [0, 0], "b": [1, 1], "c": [1, 0]},
     [[(0, NEW, 0), (0, NEW, 0)], [(1, NEW, 1), (1, NEW, 1)], [(1, REUSED, 1), (0, REUSED, 0)]]),
    # the same id in another layer is another module
    ({"a": [0, 1], "b": [1, 0]}, [[(0, NEW, 0), (1, NEW, 0)], [(1, NEW, 1), (0, NEW, 1)]]),
])
def test_path_grid_marks_new_and_reused_modules(paths, expected):
    assert path_grid(paths, list(paths)) == expected


def test_params_added_counts_new_modules_only():
    module = 2 * (2 * 64 * 32 + 32 + 64)  # two adapters: down (d*b + b) and up (b*d + d)
    assert params_added(PATHS, TASKS, module) == {TASKS[0]: 4 * module, TASKS[1]: 3 * module, TASKS[2]: module}
    assert params_added(PATHS, TASKS, None) == dict.fromkeys(TASKS)


def test_load_run_reads_everything_the_report_shows(tmp_path):
    run = load_run(make_run(tmp_path))
    assert run.tasks == TASKS and run.method == "dmea" and run.status == "finished"
    assert run.R[2, 1] == 30.0 and np.isnan(run.R[0, 1])
    assert run.metrics == {"final_average": 65.7, "bwt": -2.7, "forgetting": 3.2}
    assert run.paths == PATHS and run.selected[TASKS[2]] == [TASKS[0]]
    assert run.module_params == 2 * (2 * 64 * 32 + 32 + 64) and run.eta_clamp == (0.1, 10.0)
    assert run.token_similarity[2, 0] == 0.9 and np.isnan(run.token_similarity[2, 1])
    assert series(run.records, "eta") == {TASKS[2]: {f"replay:{TASKS[0]}": [10.0, 3.0, 1.5, 1.2, 1.0, 1.0]}}
    assert stage_seconds(run.history, TASKS)[TASKS[2]] == {
        "expand": 4.0, "select": 0.0, "generate": 0.0, "adapt": 5.0, "evaluate": 1.0, "record": 0.0}
    rows = pseudo_samples(run.records, TASKS)
    assert [(r["task"], r["of"], r["role"], r["fidelity"]) for r in rows] == [
        (TASKS[1], TASKS[0], "transfer", 0.6), (TASKS[2], TASKS[0], "transfer+replay", 0.7)]
    assert [r["real_fidelity"] for r in rows] == [None, 0.8]  # the generating model's, on real inputs


def test_peak_memory_is_the_largest_process_by_the_end_of_each_task(tmp_path):
    history = [{"task": TASKS[0], "stage": "adapt", "peak_rss_mib": 600.0},
               {"task": TASKS[0], "stage": "record", "peak_rss_mib": 610.0},  # in process: the coordinator alone
               {"task": TASKS[1], "stage": "record", "peak_rss_mib": 620.0,
                "worker_peak_rss_mib": {"training": 900.5, "replicas": 700.0}},  # on Ray: the training rank
               {"task": TASKS[2], "stage": "adapt"}]  # a run from before memory was recorded
    assert peak_memory(history, TASKS) == {TASKS[0]: (610.0, "coordinator"), TASKS[1]: (900.5, "training")}
    run_dir = make_run(tmp_path)
    state = json.loads((run_dir / "state.json").read_text())
    state["history"] = [dict(h, **({"peak_rss_mib": 500.0, "worker_peak_rss_mib": {"training": 1234.0}}
                                   if h["stage"] == "evaluate" else {})) for h in state["history"]]
    (run_dir / "state.json").write_text(json.dumps(state))
    header, rows = task_panel(load_run(run_dir)).table
    assert header[-1] == "peak memory" and [row[-1] for row in rows] == ["1,234 MiB (training)"] * 3


def test_a_stopped_run_gets_metrics_over_the_tasks_it_finished(tmp_path):
    run = load_run(make_run(tmp_path, finished=False, R=[[80.0, None, None], [70.0, 40.0, None], [None] * 3]))
    assert run.status == "failed"
    assert run.metrics["final_average"] == pytest.approx(55.0) and run.metrics["bwt"] == pytest.approx(-10.0)


def test_a_stopped_run_that_scored_untrained_tasks_reports_fwt_over_the_tasks_it_finished(tmp_path):
    """eval.all_tasks: R[j][j+1] is task j+1 before its training, state.json's baseline the untrained scores.
    A finished run has FWT in metrics.json; a stopped one's report computed none (the driver's did)."""
    R = [[80.0, 30.0, 9.0], [70.0, 40.0, 20.0], [None] * 3]
    run_dir = make_run(tmp_path, finished=False, R=R)
    state = json.loads((run_dir / "state.json").read_text())
    (run_dir / "state.json").write_text(json.dumps({**state, "baseline": [None, 10.0, 5.0]}))
    run = load_run(run_dir)
    assert run.metrics["fwt"] == pytest.approx(30.0 - 10.0)  # over task 1 only: task 2 was never trained
    assert run.metrics["bwt"] == pytest.approx(-10.0)
    for damaged in ([None, 10.0], [None, "ten", 5.0]):  # a hand-edited state.json: no FWT, the rest stands
        (run_dir / "state.json").write_text(json.dumps({**state, "baseline": damaged}))
        assert load_run(run_dir).metrics == {"final_average": pytest.approx(55.0), "bwt": pytest.approx(-10.0),
                                             "forgetting": pytest.approx(10.0)}


def test_a_stopped_run_evaluated_every_other_task_gets_metrics_after_its_last_evaluation(tmp_path):
    """eval.every=2: rows 0 and 2 stay empty; a run stopped after task 1 has A over R[1][0..1], not nothing."""
    run = load_run(make_run(tmp_path, finished=False, R=[[None] * 3, [70.0, 40.0, None], [None] * 3]))
    assert run.metrics == {"final_average": pytest.approx(55.0)}  # BWT needs R[0][0], never measured
    from dmea_dist.evaluation.run_data import sequence_metrics

    n = float("nan")  # 4 tasks, stopped after task 3: A is over R[3][0..3], not the stale row 1
    R4 = np.array([[n] * 4, [70.0, 40.0, n, n], [n] * 4, [60.0, 30.0, 50.0, 80.0]])
    assert sequence_metrics(R4) == {"final_average": pytest.approx(55.0)}


def test_a_stopped_run_evaluated_every_other_task_reads_its_last_full_row(tmp_path):
    """eval.every=2 scores task 2 alone after its training (R[2][2]); a run stopped there has its numbers from
    row 1, the last that scored every seen task, not from row 2's one score."""
    run = load_run(make_run(tmp_path, finished=False, R=[[70.0, None, None], [60.0, 40.0, None], [None, None, 50.0]]))
    assert tasks_done(run) == 2
    assert run.metrics == {"final_average": pytest.approx(50.0), "bwt": pytest.approx(-10.0),
                           "forgetting": pytest.approx(10.0)}


@pytest.mark.parametrize("name", ["cost $\\frac$ z", "from $5 to $10", "$x^2$"])
def test_figures_draw_a_name_with_dollar_signs_as_its_text(name):
    """matplotlib reads text between two `$` as mathtext: a user task named so garbled the labels or, where it is
    no valid expression, failed every figure and so the whole report (and the finished run's report)."""
    names = [name, "e2e"]
    figures = [plots.heatmap_figure(np.array([[1.0, np.nan], [2.0, 3.0]]), names, title="R", xlabel="i", ylabel="j"),
               plots.curves_figure({name: {f"replay:{name}": [1.0, 2.0]}}, title="eta", ylabel="eta"),
               plots.comparison_figure([f"{name} (dmea)"], names, [np.array([1.0, 2.0])], [np.array([1.0, 1.5])])]
    for figure in figures:
        assert plots.png(figure).startswith(b"\x89PNG")  # drawn, not a mathtext ValueError
    texts = [t.get_text() for t in figures[0].axes[0].get_xticklabels()]
    texts += [t.get_text() for t in figures[1].axes[0].get_legend().get_texts()]
    texts += [t.get_text() for t in figures[2].axes[0].get_legend().get_texts()]
    # every `$` escaped (matplotlib draws `\$` as a plain `$`), so the label reads as the name
    assert all(not re.search(r"(?<!\\)\$", text) for text in texts), texts
    assert texts[0].replace("\\$", "$") == name


def test_comparison_legend_names_a_run_whose_name_starts_with_an_underscore():
    """matplotlib leaves legend labels starting with `_` out: such a run's bars had no entry."""
    figure = plots.comparison_figure(["_scratch (dmea)", "base (acm)"], ["a", "b"],
                                     [np.array([1.0, 2.0])] * 2, [np.array([1.0, 1.5])] * 2)
    assert [t.get_text().strip() for t in figure.axes[0].get_legend().get_texts()] == ["_scratch (dmea)",
                                                                                        "base (acm)"]


def test_a_stopped_runs_report_says_what_its_numbers_cover(tmp_path):
    """Its metrics are over the tasks it did (A over R[1][0..1] here), but the summary called them "Final", the
    per-task table's "final" column read R's empty last row ("-" everywhere) and the comparison put them beside a
    finished run's with nothing to tell them apart."""
    stopped = load_run(make_run(tmp_path / "a", finished=False, R=[[80.0, None, None], [70.0, 40.0, None],
                                                                   [None] * 3]))
    finished = load_run(make_run(tmp_path / "b"))
    said = " ".join(summary_lines(stopped))
    assert "Final average" not in said and "Average rouge 55.0 after t1 (2 of 3 tasks; run failed)" in said
    assert "Final average rouge 65.7" in " ".join(summary_lines(finished))
    header, rows = task_panel(stopped).table
    assert header[2] == "after t1" and task_panel(finished).table[0][2] == "final"
    assert [row[1:4] for row in rows] == [["80.0", "70.0", "-10.0"], ["40.0", "40.0", "0.0"], ["-", "-", "-"]]
    assert metrics_panel(stopped).table[1][0] == ["measured", "after t1 (2 of 3 tasks; run failed)"]
    assert metrics_panel(finished).table[1][0][0] != "measured"
    header, rows = comparison_section([stopped, finished]).panels[0].table
    assert rows[0] == ["tasks done", "2 of 3 (run failed)", "3 of 3"]
    assert rows[1] == ["final_average", "55.00", "65.70"]


def test_a_multitask_runs_report_says_why_it_has_no_bwt(tmp_path):
    """multitask is evaluated once, after training on every task at the end: its report blamed eval.every > 1."""
    run_dir = make_run(tmp_path, method="multitask", R=[[None] * 3, [None] * 3, [86.4, 30.0, 80.8]])
    (run_dir / "metrics.json").write_text(json.dumps({"final_average": 65.7}))
    rows = metrics_panel(load_run(run_dir)).table[1]
    assert rows[-1][0] == "bwt and forgetting not measured" and "multitask trains once" in rows[-1][1]
    assert "eval.every" not in rows[-1][1]


def test_a_run_stopped_early_is_not_said_to_use_a_method_that_makes_no_paths(tmp_path):
    """dmea stopped in its first task has no paths and no similarity yet: the notes said "dmea fine-tunes the
    whole backbone" and "dmea neither selects nor searches", which is what finetune and adapter do."""
    tasks = ["e2e", "rnnlg.hotel", "rnnlg.tv"]  # not synthetic: no ground truth to show instead
    run_dir = make_run(tmp_path, finished=False, R=[[None] * 3] * 3, tasks=tasks)
    state = json.loads((run_dir / "state.json").read_text())
    state.update(status="stopped", similarity=[], tasks=[{"task_id": t, "index": i} for i, t in enumerate(tasks)])
    (run_dir / "state.json").write_text(json.dumps(state))
    for record in run_dir.glob("tasks/*/record.json"):
        record.unlink()
    run = load_run(run_dir)
    assert paths_panel(run).note == "no paths recorded yet: no task has chosen its modules (run stopped)"
    assert similarity_panel(run).note == "no similarity recorded (the run has not expanded a second task yet; " \
                                         "run stopped)"
    run.method = "finetune"  # the method is why: said so
    assert paths_panel(run).note == "no paths: finetune fine-tunes the whole backbone"
    assert similarity_panel(run).note == "no similarity recorded (finetune neither selects nor searches)"
    run.method, run.tasks, run.status = "dmea", tasks[:1], "finished"
    assert similarity_panel(run).note == "no similarity recorded (the run has one task: nothing earlier to " \
                                         "compare with)"


def test_comparison_figure_names_the_metric_on_its_axes(tmp_path, monkeypatch):
    """The side-by-side bars and lines had no y label: a reader could not tell rouge from bleu or a share."""
    drawn = []
    real = plots.comparison_figure
    monkeypatch.setattr(plots, "comparison_figure", lambda *a, **kw: drawn.append(real(*a, **kw)) or drawn[-1])
    runs = [load_run(make_run(tmp_path / "a")), load_run(make_run(tmp_path / "b", method="acm"))]
    for run in runs:
        run.metric_name = "bleu"
    assert comparison_section(runs).panels[1].image
    assert [ax.get_ylabel() for ax in drawn[0].axes] == ["bleu", "bleu"]


def test_a_damaged_state_file_is_reported_not_taken_for_a_run_that_never_started(tmp_path):
    """state.json cut short (a copy interrupted, a full disk): read as missing, the report said "run status: ?"
    and "no task was evaluated yet" for a run that did everything; it now says which file it could not read."""
    run_dir = make_run(tmp_path)
    (run_dir / "state.json").write_text('{"format": "dmea-run-state", "R": [[85.9')
    (run_dir / "tasks" / f"001-{TASKS[1]}" / "record.json").write_text("[]")
    run = load_run(run_dir)
    said = " ".join(summary_lines(run))
    assert "Could not read state.json (Expecting" in said and "is missing from this report" in said
    assert f"tasks/001-{TASKS[1]}/record.json (a JSON list, not an object)" in said
    assert "Could not read" not in " ".join(summary_lines(load_run(make_run(tmp_path / "ok"))))
    (run_dir / "config.yaml").unlink()
    with pytest.raises(DmeaError, match="no state.json; could not read state.json: Expecting"):
        load_run(run_dir)


def test_ground_truth_is_the_generators_relatedness_for_synthetic_tasks_only():
    truth = ground_truth(TASKS)
    assert truth[2, 0] == task_relatedness(TASKS[0], TASKS[2]) > truth[2, 1] == 0.0
    assert np.isnan(truth[0, 2]) and np.isnan(truth[1, 1])
    assert ground_truth(["e2e", "rnnlg.hotel"]) is None


# ------------------------------------------------------------------ the page


def _images(page: str) -> dict[str, Image.Image]:
    found = re.findall(r'<img id="([\w-]+)" alt="[^"]*" src="data:image/png;base64,([^"]+)"', page)
    return {key: Image.open(io.BytesIO(base64.b64decode(data))) for key, data in found}


def test_report_is_self_contained_with_every_figure(tmp_path):
    run_dir = make_run(tmp_path)
    written = write_report([run_dir])
    page = written.html.read_text()
    images = _images(page)
    assert {"fig-scores-0", "fig-similarity-0", "fig-paths-0", "fig-eta-0", "fig-loss-0", "fig-pseudo-0",
            "fig-time-0"} <= set(images)
    assert all(min(image.size) > 100 for image in images.values())
    assert "<script" not in page and not re.search(r'(src|href)="(https?:)?//', page), "no network, no script"
    for term in ("A_T", "BWT", "forgetting", "The model grew by 8 modules (67,072 parameters)",
                 "t1 chose synth.restaurant.00"):
        assert term in page, term
    markdown = written.markdown.read_text()
    links = re.findall(r"!\[[^]]*\]\(([^)]+)\)", markdown)
    assert len(links) == len(images) and all((run_dir / link).is_file() for link in links)


def test_report_files_are_written_atomically_and_durably(tmp_path, monkeypatch):
    """`dmea report` rewrites report.html over the previous one: a plain write truncated it first, so a report
    killed half-way (or a machine crash after it) left a cut page; now each file is renamed into place."""
    run_dir = make_run(tmp_path)
    disk = DiskLog(monkeypatch)
    written = write_report([run_dir])
    assert written.images
    for file in [written.html, written.markdown, *written.images]:
        assert disk.why_not_durable(file) is None
    assert disk.directory_synced(run_dir)  # report_files/ itself is in the run folder once the call returns


def test_comparison_of_two_runs_side_by_side(tmp_path, capsys):
    dmea, acm = make_run(tmp_path / "a"), make_run(tmp_path / "b", method="acm")
    assert main(["report", str(dmea), str(acm), "--out", str(tmp_path / "cmp")]) == 0
    assert "report.html" in capsys.readouterr().out
    page = (tmp_path / "cmp" / "report.html").read_text()
    images = _images(page)
    assert "fig-compare-1" in images  # final scores and trajectories of both runs
    assert {"fig-scores-0", "fig-scores-1", "fig-paths-0", "fig-paths-1"} <= set(images)
    assert page.count("(dmea)") >= 2 and page.count("(acm)") >= 2
    assert 'id="fig-compare-0"' in page  # the metrics table, one column per run


def test_a_report_written_again_into_its_folder_keeps_only_its_own_figures(tmp_path):
    """`--out` reused for a comparison of fewer runs: the first comparison's extra figures stayed beside the new
    page (and a run's report_files/ goes to MLflow whole)."""
    runs = [make_run(tmp_path / name) for name in ("a", "b", "c")]
    out = tmp_path / "cmp"
    first = write_report(runs, out=out)
    second = write_report(runs[:2], out=out)
    assert len(second.images) < len(first.images)
    assert sorted((out / "report_files").glob("*.png")) == sorted(second.images)


def test_a_report_that_fails_to_rewrite_its_page_keeps_the_old_pages_images(tmp_path, monkeypatch):
    """The stale figures go once the new pages are written: a full disk at report.html left the old page whole
    but its extra images already deleted."""
    import dmea_dist.evaluation.pages as pages

    runs = [make_run(tmp_path / name) for name in ("a", "b", "c")]
    out = tmp_path / "cmp"
    first = write_report(runs, out=out)
    real = pages.write_text

    def full_disk(path, text):
        if path.name == "report.html":
            raise OSError(28, "No space left on device")
        return real(path, text)

    monkeypatch.setattr(pages, "write_text", full_disk)
    with pytest.raises(OSError):
        write_report(runs[:2], out=out)
    assert all(image.is_file() for image in first.images)


def test_runs_of_one_folder_name_are_told_apart(tmp_path):
    """Two runs whose folders share a name (copies from two machines, `runs/old/x` vs `runs/new/x`): every
    heading and column named both the same, so a reader could not tell which numbers were whose."""
    first, second = make_run(tmp_path / "old"), make_run(tmp_path / "new")
    assert first.name == second.name
    page = write_report([first, second], out=tmp_path / "cmp").html.read_text()
    assert f"old/{first.name} (dmea) vs new/{first.name} (dmea)" in page
    assert page.count(f"<h3>old/{first.name} (dmea)</h3>") == page.count(f"<h3>new/{first.name} (dmea)</h3>") > 5
    assert f"<h3>{first.name} (dmea)</h3>" not in page
    assert write_report([first]).html.read_text().count(f"<h3>{first.name} (dmea)</h3>") == 1  # alone: its name


def test_runs_scored_by_different_metrics_are_not_drawn_side_by_side(tmp_path):
    """eval.metric rouge beside bleu: the comparison put their numbers in one table and one bar chart, unlabelled."""
    rouge, bleu = load_run(make_run(tmp_path / "a")), load_run(make_run(tmp_path / "b", method="acm"))
    bleu.metric_name = "bleu"
    section = comparison_section([rouge, bleu])
    header, rows = section.panels[0].table
    assert ["scored by", "rouge", "bleu"] in rows
    assert [p.image for p in section.panels] == [None, None]
    assert "different metrics (eval.metric: rouge, bleu)" in section.panels[1].note
    assert comparison_section([rouge, load_run(make_run(tmp_path / "c", method="acm"))]).panels[1].image


def test_report_of_a_folder_that_is_no_run(tmp_path, capsys):
    assert main(["report", str(tmp_path)]) == 2
    assert "is not a run directory" in capsys.readouterr().err


ODD_NAMES = ["a|b <b>x & y", "cost [link](x) *z* `c` $x$", "line\nbreak _u_ ~~s~~ &amp;"]  # no `/`: task names can't


class _Markup(HTMLParser):
    """Tags, and the text of each table cell, of HTML that a Markdown renderer made."""

    def __init__(self):
        super().__init__()
        self.tags, self.cells, self.text, self._cell = [], [], [], None

    def handle_starttag(self, tag, attrs):
        self.tags.append(tag)
        if tag in ("td", "th"):
            self._cell = []

    def handle_endtag(self, tag):
        if tag in ("td", "th"):
            self.cells.append("".join(self._cell))
            self._cell = None

    def handle_data(self, data):
        self.text.append(data)
        if self._cell is not None:
            self._cell.append(data)


def test_markdown_report_shows_task_and_run_names_as_written(tmp_path):
    """A user task or run folder named with Markdown or HTML in it: the summary paragraph, the comparison's
    header and the notes passed it through raw (a `<b>` bolded, a `[..](..)` linked, a `|` split the header);
    checked by rendering the file with a CommonMark + GFM-tables renderer."""
    markdown_it = pytest.importorskip("markdown_it")
    first = make_run(tmp_path / "a", tasks=ODD_NAMES)
    second = make_run(tmp_path / "b", tasks=ODD_NAMES, method="acm").rename(tmp_path / "b" / "<i>old | run")
    out = write_report([first, second], out=tmp_path / "cmp").markdown
    page = _Markup()
    page.feed(markdown_it.MarkdownIt("commonmark").enable(["table", "strikethrough"]).render(out.read_text()))
    shown = [name.replace("\n", " ") for name in ODD_NAMES]
    assert not {"b", "i", "a", "code", "s", "del"} & set(page.tags), set(page.tags)
    text = "".join(page.text)
    assert f"on 3 tasks ({', '.join(shown)})" in text  # the summary sentence, as written
    assert f"t1 chose {shown[0]}" in text
    assert "<i>old | run (acm)" in page.cells  # a column of the comparison table, not two
    assert not re.search(r"(?<!\\)\$", out.read_text())  # GitHub reads $..$ as math: escaped as \$
    assert [f"t{i} {name}" for i, name in enumerate(shown)] == [c for c in page.cells if c.startswith("t") and c[1:2].isdigit()][:3]


def test_html_report_shows_task_and_run_names_as_written(tmp_path):
    """The same names in report.html: escaped wherever they go (summary, tables, headings), so none adds a tag."""
    first = make_run(tmp_path / "a", tasks=ODD_NAMES)
    second = make_run(tmp_path / "b", tasks=ODD_NAMES, method="acm").rename(tmp_path / "b" / "<i>old | run")
    page = _Markup()
    page.feed(write_report([first, second], out=tmp_path / "cmp").html.read_text())
    assert not {"b", "i", "a", "code", "s", "del"} & set(page.tags), set(page.tags)
    text = "".join(page.text)
    assert "<i>old | run (acm)" in text
    for name in ODD_NAMES:
        assert name.replace("\n", " ") in text.replace("\n", " "), name


def test_report_that_cannot_be_written_names_where_and_the_way_out(tmp_path, capsys):
    """--out naming a file (or a read-only run folder, a full disk): an OSError traceback, not a message."""
    run_dir = make_run(tmp_path)
    blocked = tmp_path / "notes.txt"
    blocked.write_text("mine")
    assert main(["report", str(run_dir), "--out", str(blocked)]) == 2
    err = capsys.readouterr().err
    assert "could not write the report" in err and str(blocked) in err and "--out DIR" in err
    assert "Traceback" not in err and blocked.read_text() == "mine"


@pytest.mark.parametrize("what", ["missing", "file"])
def test_report_of_a_path_that_is_no_folder_says_so(tmp_path, capsys, what):
    path = tmp_path / "run"
    if what == "file":
        path.write_text("x")
    assert main(["report", str(path)]) == 2
    assert f"{path} is not a run directory ({'a file' if what == 'file' else 'no such folder'})" in \
        capsys.readouterr().err


# ------------------------------------------------------------------ a real browser

BROWSER = next((shutil.which(name) for name in ("chromium", "chromium-browser", "google-chrome", "chrome")
                if shutil.which(name)), None)


def _screenshot(page: Path, element_id: str, out: Path) -> Image.Image:
    """Headless Chromium's screenshot of the page with only `element_id` shown, at the top left."""
    only = (f"<style>body * {{ visibility: hidden !important; }} #{element_id} {{ visibility: visible !important;"
            f" position: fixed; left: 0; top: 0; width: 700px !important; }}</style></head>")
    isolated = out.with_suffix(".html")
    isolated.write_text(page.read_text().replace("</head>", only, 1))
    subprocess.run([BROWSER, "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars",
                    "--window-size=800,800", f"--screenshot={out}", isolated.as_uri()],
                   check=True, capture_output=True, timeout=120)
    return Image.open(out).convert("RGB")


def _share(image: Image.Image, test) -> float:
    pixels = np.asarray(image, dtype=int).reshape(-1, 3)
    return float(np.mean([test(*p) for p in pixels[::7]]))


@pytest.mark.skipif(BROWSER is None, reason="no headless Chromium installed (apt-get install chromium)")
def test_browser_draws_the_heatmap_the_paths_and_the_eta_curves(tmp_path):
    written = write_report([make_run(tmp_path)])
    blank = _screenshot(written.html, "nothing-has-this-id", tmp_path / "blank.png")
    assert _share(blank, lambda r, g, b: r + g + b < 700) == 0.0, "the isolation leaves a white page"
    heat = _screenshot(written.html, "fig-scores-0", tmp_path / "heat.png")
    # viridis: the high scores yellow, the low ones dark purple, unevaluated cells grey
    assert _share(heat, lambda r, g, b: r > 200 and g > 200 and b < 90) > 0.02
    assert _share(heat, lambda r, g, b: r < 90 and g < 40 and b > 60) > 0.01
    paths = _screenshot(written.html, "fig-paths-0", tmp_path / "paths.png")
    assert _share(paths, lambda r, g, b: r > 220 and 120 < g < 160 and b < 70) > 0.02  # new modules, orange
    assert _share(paths, lambda r, g, b: 140 < r < 180 and 180 < g < 215 and b > 220) > 0.01  # reused, blue
    eta = _screenshot(written.html, "fig-eta-0", tmp_path / "eta.png")
    assert _share(eta, lambda r, g, b: b > 150 and r < 80 and 90 < g < 140) > 0.0002  # the curve (matplotlib blue)
    assert _share(eta, lambda r, g, b: r + g + b < 600) > 0.01  # axes, ticks, labels


def test_a_run_from_before_state_json_reads_its_lifecycle_file_records_and_r_npy(tmp_path):
    run_dir = make_run(tmp_path)
    state = json.loads((run_dir / "state.json").read_text())
    (run_dir / "state.json").unlink()
    (run_dir / "lifecycle.json").write_text(json.dumps({"tasks": TASKS, "task_index": 2, "stage": "done",
                                                        "history": state["history"]}))
    np.save(run_dir / "R.npy", np.array([[np.nan if v is None else v for v in row] for row in R]))
    for i, task in enumerate(TASKS):  # older records carried the path, the selection and the similarity
        file = run_dir / "tasks" / f"{i:03d}-{task}" / "record.json"
        rec = json.loads(file.read_text())
        rec["params"].update(path=PATHS[task], selected=[TASKS[0]] if i else [],
                             subspace_similarity={TASKS[0]: 0.5} if i else {})
        file.write_text(json.dumps(rec))
    run = load_run(run_dir)
    assert run.status == "finished" and run.paths == PATHS and run.selected[TASKS[1]] == [TASKS[0]]
    assert run.R[2, 1] == 30.0 and run.similarity[1, 0] == 0.5
    assert sum(stage_seconds(run.history, TASKS)[TASKS[1]].values()) == 8.0
    assert {"fig-scores-0", "fig-paths-0", "fig-time-0"} <= set(_images(write_report([run_dir]).html.read_text()))
