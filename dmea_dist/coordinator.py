"""The coordinator: owns one run (its parts, its state on disk, its kernels) and steps its stages.

    coordinator = Coordinator(config, run_dir)              # a new run: builds it, writes state.json
    coordinator = Coordinator(config, run_dir, resume=True)  # a run on disk: continues where it stopped
    while not coordinator.step()["done"]: ...

`step` runs the current stage (`stages.STAGES`), snapshots the model if the
stage changed it, advances the lifecycle and writes the state atomically. A
run killed at any instant therefore resumes from its last finished stage,
with nothing lost or redone (dmea_dist.state).

No Ray here. On a cluster the same class runs inside a Ray actor
(`dmea_dist.distributed.coordinator.CoordinatorActor`) with `RayKernels`; the
driver steps it and is the only process that talks to MLflow.
"""

from __future__ import annotations

import shutil
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from dmea_dist.config import RunConfig
from dmea_dist.kernels import InProcessKernels, Kernels, Progress, process_memory
from dmea_dist.method.lifecycle import Stage
from dmea_dist.modeling.io import save_backbone, save_modules
from dmea_dist.run import Run, build_policy, build_run, reopen_run
from dmea_dist.settings import decoding_settings, engine_settings
from dmea_dist.stages import STAGES, RunContext, StageSettings, matrix
from dmea_dist.state import RunState, StateError, load_state, save_state

KernelsFactory = Callable[[Run, "Progress | None"], Kernels]


def _footprint(model, stage: Stage, kernels: Kernels) -> dict[str, Any]:
    """This process's memory after a stage (peak so far, MiB); after RECORD also the model's size and the
    worker processes' peak memory (on Ray the model's replicas and the training live there, not here)."""
    out = process_memory()
    if stage is Stage.RECORD:
        out["pool_sizes"] = model.pool_sizes()
        out["module_parameters"] = sum(p.numel() for pool in model.pools for p in pool.parameters())
        out["token_row_parameters"] = sum(p.numel() for p in model.token_rows.parameters())
        workers = kernels.worker_memory()
        if workers:
            out["worker_peak_rss_mib"] = workers
    return out


def _check_token_row_scopes(state: RunState, config: RunConfig, run_dir: Path) -> None:
    """A run whose state predates token-row scopes (RunState.token_row_scopes) resumes only where its R rows are
    the same either way: before any task trained rows after the first's. Later, its earlier tasks were scored
    and replayed with every task's rows, and finishing it with scopes would mix the two in one R matrix."""
    if state.token_row_scopes:
        return
    if (config.trains_token_rows and not build_policy(config).joint and len(state.tasks) > 1
            and state.completed(1, Stage.ADAPT)):
        raise StateError(
            f"{run_dir}: this run started before each earlier task was generated, replayed and scored with only "
            f"the token rows of the tasks up to it; its R rows so far scored earlier tasks with every task's rows, "
            f"and finishing it now would mix the two. Finish it with the dmea-dist checkout that started it (one "
            f"before the commit 'Token rows are scoped'), or start it again")
    state.token_row_scopes = True  # nothing scored yet differs: from here on it is a run with scopes


def in_process_kernels(run: Run, progress: Progress | None = None) -> Kernels:
    return InProcessKernels(run.formatter, engine=engine_settings(run.config), decoding=decoding_settings(run.config),
                            progress=progress)


class Coordinator:
    """Steps one run's lifecycle (module docstring)."""

    def __init__(self, config: RunConfig, run_dir: str | Path, *, resume: bool = False,
                 kernels_factory: KernelsFactory | None = None, progress: Progress | None = None,
                 run: Run | None = None):
        """`run`: parts already built (tests, notebooks); by default they are built (or reopened) here."""
        run_dir = Path(run_dir)
        if resume:
            state = load_state(run_dir)
            if list(config.data.tasks) != state.task_ids:
                raise StateError(f"{run_dir}: the config's tasks {list(config.data.tasks)} are not the run's "
                                 f"{state.task_ids}")
            _check_token_row_scopes(state, config, run_dir)
            run = run or reopen_run(config, run_dir, backbone=state.backbone, modules=state.modules)
        else:
            run = run or build_run(config, run_dir=run_dir)
            state = RunState.new(list(config.data.tasks))
            save_state(state, run_dir)
        kernels = (kernels_factory or in_process_kernels)(run, progress)
        self.ctx = RunContext(run=run, state=state, kernels=kernels, settings=StageSettings.from_config(config))
        if resume:
            for path in self._stale():
                shutil.rmtree(path, ignore_errors=True)
        # state.json is written by step, set_tracking and mark; on Ray `mark` may come while a step runs
        self._saving = threading.Lock()

    @property
    def state(self) -> RunState:
        return self.ctx.state

    def step(self) -> dict[str, Any]:
        """Run the current stage; returns what finished, what comes next, and a finished task's record."""
        state, ctx = self.ctx.state, self.ctx
        if state.done:
            raise RuntimeError("step() called on a finished run")
        task, stage = ctx.run.tasks[state.task_index], state.stage
        state.status = "running"
        started = time.perf_counter()
        summary = STAGES[stage](ctx, task)
        garbage = self._snapshot(stage)
        summary = {**summary, **_footprint(ctx.run.model, stage, ctx.kernels)}
        with self._saving:
            state.advance(summary, seconds=time.perf_counter() - started)  # keeps a stop `mark` made meanwhile
            save_state(state, ctx.run_dir)
        for path in garbage:  # superseded snapshots and checkpoints, only once the state no longer needs them
            shutil.rmtree(ctx.run_dir / path, ignore_errors=True)
        finished = state.history[-1]
        record = ctx.record(task) if stage is Stage.RECORD else None
        return {"finished": finished, "record": record, "done": state.done,
                "next": None if state.done else (state.task_index, state.stage.value)}

    def _snapshot(self, stage: Stage) -> list[str]:
        """Save what `stage` changed in the model; returns the snapshots this one supersedes."""
        ctx, state = self.ctx, self.ctx.state
        k = state.stage_count
        if ctx.run.policy.full_finetune:
            if stage is not Stage.ADAPT:
                return []
            old, state.backbone = state.backbone, ctx.rel(save_backbone(ctx.run.model, ctx.run_dir / f"state/backbone-{k}"))
        else:
            if stage not in (Stage.EXPAND, Stage.ADAPT):
                return []
            old, state.modules = state.modules, ctx.rel(save_modules(ctx.run.model, ctx.run_dir / f"state/modules-{k}"))
        garbage = [old] if old else []
        if stage is Stage.ADAPT:  # its checkpoint is superseded by the snapshot, once the state names that
            garbage.append(ctx.rel(ctx.task_dir(ctx.run.tasks[state.task_index]) / "adapt_checkpoint"))
        return garbage

    def _stale(self) -> list[Path]:
        """Snapshots the state does not name and checkpoints of finished adaptations: what a run killed between
        saving its state and removing them (`step`) left behind. A full-fine-tuning snapshot is a whole backbone."""
        ctx, state = self.ctx, self.ctx.state
        named = {p for p in (state.modules, state.backbone) if p}
        stale = [p for pattern in ("state/modules-*", "state/backbone-*") for p in sorted(ctx.run_dir.glob(pattern))
                 if ctx.rel(p) not in named]
        return stale + [ctx.task_dir(t) / "adapt_checkpoint" for t in ctx.run.tasks
                        if state.completed(t.index, Stage.ADAPT) and (ctx.task_dir(t) / "adapt_checkpoint").exists()]

    # ----------------------------------------------------------- what the driver asks

    def state_position(self) -> dict[str, Any]:
        state = self.ctx.state
        return {"done": state.done, "next": None if state.done else (state.task_index, state.stage.value)}

    def placement(self) -> dict[str, Any]:
        """Where kernels ran (node ids by kind) and how many generation actors and training ranks served,
        for kernels that know it (Ray); else empty."""
        placement = getattr(self.ctx.kernels, "placement", None)
        return placement.as_dict() if placement is not None else {}

    def results(self) -> dict[str, Any]:
        state, run = self.ctx.state, self.ctx.run
        return {"R": matrix(state.R), "similarity": matrix(state.similarity),
                "baseline": matrix([state.baseline])[0],
                "paths": None if run.policy.full_finetune else run.model.paths, "history": list(state.history)}

    def records(self) -> list[dict[str, Any]]:
        """The record of every task whose RECORD stage has finished, in order."""
        return [self.ctx.record(t) for t in self.ctx.run.tasks if self.ctx.state.completed(t.index, Stage.RECORD)]

    def tracking(self) -> dict[str, Any]:
        state = self.ctx.state
        return {"parent": state.mlflow_parent_run_id, "tasks": {t.task_id: t.mlflow_run_id for t in state.tasks}}

    def set_tracking(self, *, parent: str | None = None, task_id: str | None = None, run_id: str | None = None) -> None:
        """Remember MLflow run ids in the state (the parent run, or one task's nested run)."""
        state = self.ctx.state
        if parent is not None:
            state.mlflow_parent_run_id = parent
        if task_id is not None:
            state.task(task_id).mlflow_run_id = run_id
        with self._saving:
            save_state(state, self.ctx.run_dir)

    def mark(self, status: str, message: str = "") -> None:
        """Record why the run stopped (stopped, failed); the position stays at the last finished stage.

        Written onto the last *saved* state, not the one in memory: a stop mid-stage (a second Ctrl-C, or
        on Ray a mark while the step still runs) may find the state half way through the stage (a new
        snapshot named, the stage not yet advanced), which a resume must never see.
        """
        with self._saving:
            state = self.ctx.state
            if state.done:
                return
            saved = load_state(self.ctx.run_dir)  # behind the state in memory, never ahead: not done either
            saved.status, saved.message = status, message
            save_state(saved, self.ctx.run_dir)
            state.status, state.message = status, message

    def close(self) -> None:
        self.ctx.kernels.close()
