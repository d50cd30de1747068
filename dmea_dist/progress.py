"""What a run shows while it runs: a live bar per stage, and a summary of each finished task.

`StageProgress` is the `progress(label, done, total, **info)` callback the
kernels report to (in process directly; on Ray through the coordinator actor's
relay, which the driver polls: `distributed/coordinator.py`), plus the stage
boundaries the driver marks.
`task_summary` is what a finished task prints (a headline and indented details). Both write to stderr /
return text only; nothing here changes what a run computes.
"""

from __future__ import annotations

import sys
import time
from typing import Any

from dmea_dist.method.lifecycle import Stage


class StageProgress:
    """Live progress of a run: a bar per stage in a terminal, plain lines otherwise (logs, `ray job logs`).

    The driver calls `start(task_index, stage)` before each stage; kernels call
    the object itself as `progress(label, done, total, **info)` (label: search,
    generate, adapt, evaluate; info such as `loss=` is shown beside the rate).
    In a terminal (stderr is a tty): one tqdm bar, with the steps, the rate
    and the ETA, replaced stage by stage (a stage without steps shows its
    elapsed time). Not a terminal: one line when a stage starts, a progress
    line at most every `every_s` seconds (and at the end) with the same
    numbers, and one when it ends with its time.
    """

    UNITS = {"search": "candidate", "generate": "request", "adapt": "step", "evaluate": "task"}

    def __init__(self, tasks: list[str], *, enabled: bool = True, stream=None, interactive: bool | None = None,
                 every_s: float = 30.0):
        self.tasks = tasks
        self.enabled = enabled
        self.stream = stream or sys.stderr
        self.interactive = self.stream.isatty() if interactive is None else interactive
        self.every_s = every_s
        self.bar = None
        self.what = ""
        self.stage = ""  # "[k/n] task stage" of the stage in progress
        self.stage_start = self.what_start = self.last_line = 0.0

    def start(self, task_index: int, stage: Stage) -> None:
        self.close()
        self.stage = f"[{task_index + 1}/{len(self.tasks)}] {self.tasks[task_index]} {stage.value}"
        self.stage_start = time.monotonic()
        if not self.enabled:
            return
        if self.interactive:  # no steps yet: the elapsed time shows the stage is alive
            self.bar = self._tqdm(total=None, desc=self.stage, bar_format="{desc}  {elapsed}")
        else:
            print(self.stage, file=self.stream, flush=True)

    def __call__(self, what: str, done: int, total: int, **info: float) -> None:
        if not self.enabled or total <= 0:
            return
        if self.what != what or (self.interactive and (self.bar is None or self.bar.total is None)):
            self._close_bar()
            # the stage's first steps: rate and ETA count from the stage's start (set-up included), not from a
            # first report that comes only after the first step is done
            self.what_start = self.stage_start if not self.what else time.monotonic()
            self.what, self.last_line = what, 0.0
            if self.interactive:
                desc = self.stage if self.stage.endswith(f" {what}") else f"{self.stage}: {what}"
                self.bar = self._tqdm(total=total, desc=desc, unit=self.UNITS.get(what, "it"))
        if self.interactive:
            self.bar.set_postfix({k: f"{v:.4g}" for k, v in info.items()}, refresh=False)
            self.bar.update(done - self.bar.n)
        elif done > 0 and (time.monotonic() - self.last_line >= self.every_s or done >= total):
            self.last_line = time.monotonic()
            print(self.line(what, done, total, time.monotonic() - self.what_start, info), file=self.stream,
                  flush=True)

    def line(self, what: str, done: int, total: int, elapsed: float, info: dict[str, float]) -> str:
        """`  adapt 30/90 steps (33%), 2.10 step/s, ETA 0:28, loss 1.234`: what a log line says."""
        unit = self.UNITS.get(what, "it")
        rate = done / elapsed if elapsed > 0 else 0.0
        eta = _clock((total - done) / rate) if rate > 0 else "?"
        extra = "".join(f", {k} {v:.4g}" for k, v in info.items())
        return (f"  {what} {done}/{total} {unit}s ({done / total:.0%}), {rate:.2f} {unit}/s, elapsed "
                f"{_clock(elapsed)}, ETA {eta}{extra}")

    def close(self, *, ended: str = "done") -> None:
        """End the stage in progress (plain lines: say how it ended and how long it took)."""
        self._close_bar()
        if self.enabled and not self.interactive and self.stage:
            print(f"{self.stage} {ended} after {time.monotonic() - self.stage_start:.1f}s", file=self.stream,
                  flush=True)
        self.stage, self.what = "", ""

    def _close_bar(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None

    def _tqdm(self, **kwargs):
        from tqdm import tqdm

        return tqdm(leave=False, file=self.stream, dynamic_ncols=True, mininterval=0.2, **kwargs)


def _clock(seconds: float) -> str:
    seconds = int(round(seconds))
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}" if seconds >= 3600 else \
        f"{seconds // 60}:{seconds % 60:02d}"


def task_summary(record: dict[str, Any], history: list[dict[str, Any]], *, n_tasks: int) -> str:
    """What a finished task did: a headline (time, modules added, score), then one indented line each for its
    selection, its pseudo samples (yield and fidelity) and how often eta sat at its clamp, where it has them.

    One line held it all: 290 characters for the quick start's last task, wrapped into a block no one reads."""
    m, p, task = record["metrics"], record["params"], record["task_id"]
    head = [f"{sum(h.get('seconds', 0.0) for h in history):.1f}s"]
    if "new_modules" in m:
        head.append(f"{int(m['new_modules'])} new modules")
    if f"R.{task}" in m:
        head.append(f"score {m[f'R.{task}']:.1f}")
    details = []
    if p.get("selected"):
        details.append(f"selected {', '.join(p['selected'])}")
    yields = {k.removeprefix("pseudo.yield."): v for k, v in m.items() if k.startswith("pseudo.yield.")}
    if yields:
        kept = sum(v for k, v in m.items() if k.startswith("pseudo.kept."))
        asked = sum(v for k, v in m.items() if k.startswith("pseudo.requested."))
        line = f"pseudo samples {int(kept)}/{int(asked)}, yield {sum(yields.values()) / len(yields):.0%}"
        if len(yields) > 1:  # the mean, as fidelity's: the least well-formed task by name, not as "yield"
            worst = min(yields, key=lambda t: (yields[t], t))
            line += f" (lowest {worst} {yields[worst]:.0%})"
        details.append(line)
        fids = {k.removeprefix("pseudo.fidelity."): v for k, v in m.items() if k.startswith("pseudo.fidelity.")}
        real = {k.removeprefix("pseudo.real_fidelity."): v for k, v in m.items()
                if k.startswith("pseudo.real_fidelity.")}
        if fids:
            line = f"pseudo-sample fidelity {sum(fids.values()) / len(fids):.0%}"
            if real.keys() >= fids.keys():  # the same tasks' answers to real inputs: what the model can do
                line += f" (on real inputs {sum(real[t] for t in fids) / len(fids):.0%})"
            if len(fids) > 1:  # a mean hides which task is unfaithful, and whether its model is too
                low = min(fids, key=lambda t: (fids[t], t))
                line += f", lowest {low} {fids[low]:.0%}" + (f" (on real inputs {real[low]:.0%})" if low in real else "")
            details.append(line)
    if "eta_clamp_rate" in m:
        details.append(f"eta at clamp {m['eta_clamp_rate']:.0%} of replay steps")
    return "\n".join([f"[{record['task_index'] + 1}/{n_tasks}] {task} done: " + "; ".join(head)]
                     + [f"    {line}" for line in details])
