"""Drive one lifelong run: lifecycle + executor + tracking + the final report.

`run_sequence` is what `dmea run` and the Ray job entry point call. It builds
the run, opens the MLflow parent run, steps the lifecycle (progress per stage
and task), records every finished task in a nested MLflow run (the driver is
the only process that talks to MLflow), and ends with the R matrix, the
continual-learning metrics and a Markdown/HTML report in the run directory.
"""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from dmea_dist.config import RunConfig
from dmea_dist.evaluation import continual, report
from dmea_dist.method.lifecycle import Lifecycle, LifecycleState, Stage


@dataclass
class SequenceResult:
    run_dir: Path
    tasks: list[str]
    R: np.ndarray
    metrics: dict[str, float]
    parent_run_id: str | None
    history: list[dict[str, Any]]


class StageProgress:
    """A progress bar per stage of each task (tqdm to stderr; plain lines when not a terminal)."""

    def __init__(self, tasks: list[str], *, enabled: bool = True):
        self.tasks = tasks
        self.enabled = enabled
        self.bar = None
        self.what = ""

    def start(self, task_index: int, stage: Stage) -> None:
        self.close()
        if self.enabled:
            print(f"[{task_index + 1}/{len(self.tasks)}] {self.tasks[task_index]} {stage.value}",
                  file=sys.stderr, flush=True)

    def __call__(self, what: str, done: int, total: int) -> None:
        if not self.enabled or total <= 0:
            return
        if self.bar is None or self.what != what:
            self.close()
            from tqdm import tqdm

            self.what = what
            self.bar = tqdm(total=total, desc=f"  {what}", leave=False, file=sys.stderr,
                            disable=not sys.stderr.isatty())
        self.bar.n = done
        self.bar.refresh()

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None


class Coordinator:
    """Owns one run's lifecycle: builds the run, steps its stages, hands out finished records.

    No Ray here: the Ray actor in dmea_dist.distributed.coordinator holds one of
    these (with distributed kernels) and forwards `step` and `results`.
    """

    def __init__(self, config: RunConfig, run_dir: str | Path, *,
                 kernels: Callable[[Any], dict[str, Any]] | None = None,
                 progress: Callable[[str, int, int], None] | None = None):
        """`kernels(run)` returns executor kernels (search_fn, generate_fn, answer_fn, adapt_fn) to use."""
        from dmea_dist.pipeline import InProcessExecutor
        from dmea_dist.run import build_run

        self.run = build_run(config, run_dir=run_dir)
        self.executor = InProcessExecutor(self.run, progress=progress, **(kernels(self.run) if kernels else {}))
        self.lifecycle = Lifecycle(LifecycleState(tasks=list(config.data.tasks)), self.executor,
                                   on_transition=self._persist)

    def _persist(self, state: LifecycleState) -> None:
        (self.run.run_dir / "lifecycle.json").write_text(json.dumps(state.to_dict(), indent=1, default=str))

    def step(self) -> dict[str, Any]:
        """Run the current stage; returns what finished, what comes next, and a finished task's record."""
        self.lifecycle.step()
        state = self.lifecycle.state
        finished = state.history[-1]
        record = self.executor.records[finished["task"]] if finished["stage"] == Stage.RECORD.value else None
        return {"finished": finished, "record": record, "done": state.done,
                "history": state.history if record is not None else [],
                "next": None if state.done else (state.task_index, state.stage.value)}

    def results(self) -> dict[str, Any]:
        full_ft = self.run.policy.full_finetune
        return {"R": self.executor.R, "similarity": self.executor.similarity, "baseline": self.executor.baseline,
                "paths": None if full_ft else self.run.model.paths, "history": self.lifecycle.state.history}


def run_sequence(config: RunConfig, *, run_dir: str | Path | None = None, coordinator_factory: Callable | None = None,
                 progress: bool = True, echo: Callable[[str], None] = print) -> SequenceResult:
    """Run the whole task sequence of `config`; returns the R matrix and final metrics.

    `coordinator_factory(config, run_dir, progress)` makes what steps the
    lifecycle: by default an in-process `Coordinator`; `dmea run` on Ray passes
    one that starts the coordinator actor. This process alone talks to MLflow.
    """
    from dmea_dist.tracking import Tracker

    run_dir = Path(run_dir or Path(config.output_dir) / f"{config.name}-{time.strftime('%Y%m%d-%H%M%S')}")
    bar = StageProgress(config.data.tasks, enabled=progress)
    make = coordinator_factory or (lambda cfg, rd, prog: Coordinator(cfg, rd, progress=prog))
    coordinator = make(config, run_dir, bar)
    tracker = Tracker(uri=config.tracking.uri, experiment=config.tracking.experiment, enabled=config.tracking.enabled)
    parent = tracker.start_sequence(run_name=run_dir.name, config=config.to_dict(), tasks=config.data.tasks,
                                    tags={"method": config.method.name})
    tracker.log_sequence_metrics({}, artifacts={name: run_dir / name for name in ("tokenizer", "backbone")
                                                 if (run_dir / name).exists()})
    bar.start(0, Stage.EXPAND)
    try:
        while True:
            out = coordinator.step()
            for warning in out["finished"].get("warnings", []):
                bar.close()
                echo(f"WARNING: {warning}")
            rec = out["record"]
            if rec is not None:
                bar.close()
                echo(task_summary(rec, [h for h in out.get("history", []) if h["task_index"] == rec["task_index"]],
                                  n_tasks=len(config.data.tasks)))
                tracker.record_task(task_index=rec["task_index"], task_id=rec["task_id"], params=rec["params"],
                                    metrics=rec["metrics"], series=rec["series"], artifacts=rec["artifacts"],
                                    model_dir=rec.get("model_dir"),
                                    registered_model=f"{config.name}-{config.method.name}")
            if out["done"]:
                break
            bar.start(out["next"][0], Stage(out["next"][1]))
        results = coordinator.results()
    except BaseException:
        bar.close()
        tracker.finish_sequence(status="FAILED")
        raise
    finally:
        if hasattr(coordinator, "close"):
            coordinator.close()
    bar.close()
    R, names = results["R"], config.data.tasks
    metrics = sequence_metrics(R, baseline=results.get("baseline"))
    write_reports(run_dir, config, R, metrics, similarity=results["similarity"], paths=results["paths"])
    tracker.log_sequence_metrics(metrics, artifacts={"report": run_dir / "report.md", "report_html": run_dir / "report.html",
                                                     "R": run_dir / "R.npy"})
    tracker.finish_sequence(status="FINISHED")

    echo(f"\nR matrix ({config.eval.metric}, row j = after training task j):")
    echo(report.format_matrix_table(names, R))
    echo("\n" + "  ".join(f"{k}={v:.2f}" for k, v in metrics.items()))
    echo(f"\nrun directory: {run_dir}   report: {run_dir / 'report.html'}   tracking: {config.tracking.uri}")
    return SequenceResult(run_dir=run_dir, tasks=names, R=R, metrics=metrics, parent_run_id=parent,
                          history=results["history"])


def task_summary(record: dict[str, Any], history: list[dict[str, Any]], *, n_tasks: int) -> str:
    """One line per finished task: time, modules, selection, pseudo-sample yield and fidelity, clamp rate, score."""
    m, p, task = record["metrics"], record["params"], record["task_id"]
    parts = [f"{sum(h.get('seconds', 0.0) for h in history):.1f}s"]
    if "new_modules" in m:
        parts.append(f"{int(m['new_modules'])} new modules")
    if p.get("selected"):
        parts.append(f"selected {', '.join(p['selected'])}")
    yields = {k.removeprefix("pseudo.yield."): v for k, v in m.items() if k.startswith("pseudo.yield.")}
    if yields:
        kept = sum(v for k, v in m.items() if k.startswith("pseudo.kept."))
        asked = sum(v for k, v in m.items() if k.startswith("pseudo.requested."))
        line = f"pseudo samples {int(kept)}/{int(asked)}, yield {min(yields.values()):.0%}"
        fids = [v for k, v in m.items() if k.startswith("pseudo.fidelity.")]
        if fids:
            line += f", fidelity {sum(fids) / len(fids):.0%}"
        parts.append(line)
    if "eta_clamp_rate" in m:
        parts.append(f"eta at clamp {m['eta_clamp_rate']:.0%}")
    if f"R.{task}" in m:
        parts.append(f"score {m[f'R.{task}']:.1f}")
    return f"[{record['task_index'] + 1}/{n_tasks}] {task} done: " + "; ".join(parts)


def write_reports(run_dir: Path, config: RunConfig, R: np.ndarray, metrics: dict[str, float], *,
                  similarity: np.ndarray, paths: dict[str, list[int]] | None) -> None:
    names = config.data.tasks
    title = f"dmea-dist: {config.name} ({config.method.name})"
    (run_dir / "report.md").write_text(report.render_markdown(names, R, metrics, similarity=similarity,
                                                              paths=paths, title=title))
    (run_dir / "report.html").write_text(report.render_html(names, R, metrics, similarity=similarity,
                                                            paths=paths, title=title))
    np.save(run_dir / "R.npy", R)
    (run_dir / "metrics.json").write_text(json.dumps(metrics, indent=1))


def sequence_metrics(R: np.ndarray, *, baseline: np.ndarray | None = None) -> dict[str, float]:
    """Final average, BWT and forgetting where the R matrix has what they need; FWT when tasks were
    also evaluated before they were trained (`eval.all_tasks`) against the untrained `baseline`."""
    out = {"final_average": continual.final_average(R)}
    if not np.isnan(np.diag(R)).any():
        out["bwt"] = continual.backward_transfer(R)
        out["forgetting"] = continual.forgetting(R)
    n = R.shape[0]
    above = [R[i - 1, i] for i in range(1, n)]
    if n > 1 and baseline is not None and not np.isnan(above).any() and not np.isnan(baseline[1:]).any():
        out["fwt"] = continual.forward_transfer(R, baseline)
    return out
