"""Live progress: bars with rate and ETA in a terminal, throttled plain lines in a log, the task summary line."""

from __future__ import annotations

import io
import re
import time

from dmea_dist.method.lifecycle import Stage
from dmea_dist.progress import StageProgress, task_summary

TASKS = ["synth.restaurant.00", "synth.listops.00"]


class FakeClock:
    def __init__(self):
        self.now = 100.0

    def __call__(self):
        return self.now


def test_plain_lines_say_steps_rate_eta_and_loss_and_are_throttled(monkeypatch):
    clock = FakeClock()
    monkeypatch.setattr("dmea_dist.progress.time.monotonic", clock)
    out = io.StringIO()
    bar = StageProgress(TASKS, stream=out, interactive=False, every_s=30.0)
    bar.start(1, Stage.ADAPT)
    for step in range(1, 91):
        clock.now += 0.5  # 2 steps/s
        bar("adapt", step, 90, loss=1.25)
    bar.close()
    lines = out.getvalue().splitlines()
    assert lines[0] == "[2/2] synth.listops.00 adapt"
    progress = [line for line in lines if line.startswith("  adapt ")]
    # the first step, then at most one line per 30 s of a 45 s stage, then the last step
    assert progress[0].startswith("  adapt 1/90 steps (1%)") and progress[-1].startswith("  adapt 90/90 steps (100%)")
    assert len(progress) == 3
    middle = progress[1]
    assert "61/90 steps (68%)" in middle and "2.00 step/s" in middle and "ETA 0:14" in middle
    assert "loss 1.25" in middle
    assert lines[-1] == "[2/2] synth.listops.00 adapt done after 45.0s"


def test_a_stopped_stage_says_so_and_steps_of_zero_print_nothing():
    out = io.StringIO()
    bar = StageProgress(TASKS, stream=out, interactive=False)
    bar.start(0, Stage.EVALUATE)
    bar("evaluate", 0, 3)
    bar.close(ended="failed")
    lines = out.getvalue().splitlines()
    assert lines[0] == "[1/2] synth.restaurant.00 evaluate"
    assert len(lines) == 2 and re.fullmatch(r"\[1/2\] synth\.restaurant\.00 evaluate failed after [\d.]+s", lines[1])


def test_terminal_bar_shows_steps_rate_and_eta():
    out = io.StringIO()
    bar = StageProgress(TASKS, stream=out, interactive=True)
    bar.start(0, Stage.EXPAND)
    bar("search", 1, 4)
    time.sleep(0.3)  # tqdm redraws at most every 0.2 s
    bar("search", 2, 4)
    text = out.getvalue()
    bar.close()
    assert "[1/2] synth.restaurant.00 expand: search" in text
    assert "2/4" in text and "candidate" in text
    assert re.search(r"\[\d\d:\d\d<\d\d:\d\d", text), "elapsed<remaining (the ETA) is shown"
    bar.start(0, Stage.ADAPT)
    bar("adapt", 1, 10, loss=0.5)
    time.sleep(0.3)
    bar("adapt", 3, 10, loss=0.5)
    assert "[1/2] synth.restaurant.00 adapt:" in out.getvalue() and "adapt: adapt" not in out.getvalue()
    assert "loss=0.5" in out.getvalue()
    bar.close()


def test_disabled_progress_prints_nothing():
    out = io.StringIO()
    bar = StageProgress(TASKS, enabled=False, stream=out, interactive=False)
    bar.start(0, Stage.ADAPT)
    bar("adapt", 5, 10)
    bar.close()
    assert out.getvalue() == ""


def test_task_summary_line():
    record = {"task_id": "synth.listops.00", "task_index": 1, "params": {"selected": ["synth.restaurant.00"]},
              "metrics": {"new_modules": 4.0, "pseudo.yield.synth.restaurant.00": 1.0,
                          "pseudo.kept.synth.restaurant.00": 32.0, "pseudo.requested.synth.restaurant.00": 32.0,
                          "pseudo.fidelity.synth.restaurant.00": 0.5, "R.synth.listops.00": 36.4}}
    history = [{"seconds": 10.0}, {"seconds": 2.3}]
    assert task_summary(record, history, n_tasks=2).splitlines() == [
        "[2/2] synth.listops.00 done: 12.3s; 4 new modules; score 36.4",
        "    selected synth.restaurant.00",
        "    pseudo samples 32/32, yield 100%",
        "    pseudo-sample fidelity 50%"]


def test_task_summary_of_a_first_task_is_its_headline_alone():
    record = {"task_id": "synth.restaurant.00", "task_index": 0, "params": {},
              "metrics": {"new_modules": 4.0, "R.synth.restaurant.00": 85.8}}
    assert task_summary(record, [{"seconds": 12.0}], n_tasks=3) == \
        "[1/3] synth.restaurant.00 done: 12.0s; 4 new modules; score 85.8"


def test_task_summary_line_reads_pseudo_fidelity_against_real_inputs():
    record = {"task_id": "synth.hotel.01", "task_index": 2, "params": {},
              "metrics": {f"pseudo.{k}.{t}": v for t in ("synth.hotel.00", "synth.listops.00")
                          for k, v in (("yield", 1.0), ("kept", 8.0), ("requested", 8.0))}}
    record["metrics"].update({"pseudo.fidelity.synth.hotel.00": 0.5, "pseudo.fidelity.synth.listops.00": 0.0,
                              "pseudo.real_fidelity.synth.hotel.00": 0.75, "pseudo.real_fidelity.synth.listops.00": 0.05})
    assert task_summary(record, [], n_tasks=3).endswith(
        "    pseudo-sample fidelity 25% (on real inputs 40%), lowest synth.listops.00 0% (on real inputs 5%)")
    del record["metrics"]["pseudo.real_fidelity.synth.listops.00"]  # not all evaluated: no mean of a part
    assert task_summary(record, [], n_tasks=3).endswith("\n    pseudo-sample fidelity 25%, lowest synth.listops.00 0%")


def test_task_summary_line_names_the_least_faithful_task():
    record = {"task_id": "synth.hotel.02", "task_index": 3, "params": {},
              "metrics": {f"pseudo.{k}.{t}": v for t in ("synth.hotel.00", "synth.hotel.01", "synth.listops.00")
                          for k, v in (("yield", 1.0), ("kept", 8.0), ("requested", 8.0))}}
    record["metrics"].update({"pseudo.fidelity.synth.hotel.00": 0.9, "pseudo.fidelity.synth.hotel.01": 0.3,
                              "pseudo.fidelity.synth.listops.00": 0.6})
    assert task_summary(record, [], n_tasks=4).endswith("\n    pseudo-sample fidelity 60%, lowest synth.hotel.01 30%")


def test_task_summary_line_says_how_often_eta_sat_at_its_clamp():
    record = {"task_id": "synth.hotel.01", "task_index": 1, "params": {},
              "metrics": {"eta_clamp_rate": 0.25, "R.synth.hotel.01": 50.0}}
    assert task_summary(record, [], n_tasks=2).splitlines() == [
        "[2/2] synth.hotel.01 done: 0.0s; score 50.0", "    eta at clamp 25% of replay steps"]
