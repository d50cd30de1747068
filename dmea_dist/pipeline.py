"""The in-process stage executor: one lifelong run in one Python process.

`dmea_dist.run.build_run(config)` resolves a `RunConfig` into plain parts
(tasks, tokenizer, model, formatter) and `InProcessExecutor` implements every lifecycle stage on
them by calling the method functions with explicit arguments:

    EXPAND   add modules / search candidates      (method.expansion)
    SELECT   subspace similarity, top-K           (method.selection)
    GENERATE pseudo samples -> Parquet            (method.generation)
    ADAPT    DeepSpeed step with gradient scaling (method.adaptation + engine)
    EVALUATE the R-matrix row                     (evaluation.metrics)
    RECORD   the task's modules + path manifest on disk; the driver logs to MLflow

Each stage's summary is JSON-able; the task's full record (everything MLflow
gets) accumulates in `executor.records[task_id]`. The Ray executor in
dmea_dist.distributed reuses these parts and farms the heavy stages out.
"""

from __future__ import annotations

import copy
import json
import math
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from dmea_dist.config import RunConfig, deepspeed_config
from dmea_dist.data.formatting import BatchStream, collate, encode_task
from dmea_dist.data.synthetic import fidelity
from dmea_dist.evaluation.metrics import score_task
from dmea_dist.method import expansion, selection
from dmea_dist.method.adaptation import AdaptJob, AdaptResult, run_adapt_job
from dmea_dist.method.generation import (
    PseudoSamples,
    generate_answers,
    generate_pseudo_samples,
    pseudo_sample_counts,
    write_pseudo_samples,
    yield_warnings,
)
from dmea_dist.method.lifecycle import Stage
from dmea_dist.method.policy import replay_tasks
from dmea_dist.modeling.io import save_backbone, save_path_modules
from dmea_dist.run import Run, Task, build_policy

EngineFactory = Callable[..., Any]  # (model, params) -> Engine (see method.adaptation)


def deepspeed_engine_factory(config: RunConfig) -> Callable[..., Any]:
    """(model, params) -> the DeepSpeed engine with the gradient-scaling step, as the config says.

    Full fine-tuning (lamol, finetune) trains at `train.full_finetune_lr`, adapters at `train.lr`.
    """
    t = config.train
    lr = t.full_finetune_lr if build_policy(config).full_finetune else t.lr
    ds_config = deepspeed_config(config.deepspeed, lr=lr, weight_decay=t.weight_decay, eps=t.adam_eps,
                                 grad_clip=t.grad_clip, micro_batch=t.batch_size)
    clamp = tuple(config.method.adaptation.eta_clamp)

    def factory(model, params):
        from dmea_dist.engine import build_engine  # DeepSpeed lives there only

        return build_engine(model, params, ds_config=ds_config, clamp=clamp)

    factory.partitions_model = ds_config["zero_optimization"].get("stage", 0) == 3
    return factory


class InProcessExecutor:
    """Runs every stage of the lifecycle in this process (see module docstring)."""

    def __init__(self, run: Run, *, engine_factory: EngineFactory | None = None, search_fn: Callable | None = None,
                 generate_fn: Callable | None = None, answer_fn: Callable | None = None,
                 adapt_fn: Callable | None = None, progress: Callable[[str, int, int], None] | None = None):
        # the heavy kernels are injectable: the Ray executor passes distributed ones
        self.run = run
        self.engine_factory = engine_factory or deepspeed_engine_factory(run.config)
        self.search_fn = search_fn or self._search_in_process
        self.generate_fn = generate_fn or self._generate_in_process
        self.answer_fn = answer_fn or self._answer_in_process
        self.adapt_fn = adapt_fn or self._adapt_in_process
        self.progress = progress or (lambda label, done, total: None)
        n = len(run.tasks)
        self.R = np.full((n, n), np.nan)
        self.token_counts = {}
        self.bases: dict[str, list[torch.Tensor]] = {}
        self.similarity = np.full((n, n), np.nan)  # [new, earlier]: subspace similarity
        self.selected: dict[str, list[str]] = {}
        self.pseudo: dict[str, dict[str, list[dict]]] = {}  # new task -> earlier task -> rows
        self.baseline = np.full(n, np.nan)  # scores before any training (forward transfer), eval.all_tasks
        self.records: dict[str, dict[str, Any]] = {}
        special = run.formatter.special
        self.special_ids = {special.ans, special.eos, special.pad, *special.tasks}
        # the answer separator's loss weight (LAMOL/ACM): pseudo samples are unusable without it
        self.token_weights = {special.ans: self.cfg.train.separator_weight}

    # ------------------------------------------------------------------ helpers

    @property
    def cfg(self) -> RunConfig:
        return self.run.config

    def _stream(self, examples, *, seed: str) -> BatchStream:
        qa, lm = examples
        return BatchStream(qa, lm, batch_size=self.cfg.train.batch_size, pad_id=self.run.formatter.special.pad,
                           seed=seed)

    def _path(self, task_id: str) -> list[int] | None:
        return None if self.run.policy.full_finetune else self.run.model.path_of(task_id)

    def _record(self, task: Task) -> dict[str, Any]:
        return self.records.setdefault(task.task_id, {"task_id": task.task_id, "task_index": task.index,
                                                      "params": {}, "metrics": {}, "series": {}, "artifacts": {}})

    def task_dir(self, task: Task) -> Path:
        return self.run.run_dir / "tasks" / f"{task.index:03d}-{task.task_id}"

    def run_stage(self, stage: Stage, task_index: int) -> dict[str, Any]:
        task = self.run.tasks[task_index]
        return getattr(self, stage.value)(task)

    # ------------------------------------------------------------------ EXPAND

    def expand(self, task: Task) -> dict[str, Any]:
        model, policy = self.run.model, self.run.policy
        rec = self._record(task)
        self.token_counts[task.task_id] = expansion.token_distribution((ex.input_ids for ex in task.train[0]),
                                                                       exclude=self.special_ids)
        if task.index == 0 and self.cfg.eval.all_tasks:
            self._evaluate_baseline()
        if policy.full_finetune:
            return {"path": None, "new_modules": 0}
        earlier = [t.task_id for t in self.run.tasks[: task.index]]
        if policy.joint and earlier:
            path = model.path_of(earlier[0])  # multitask: one shared module set
        elif not earlier or not policy.search:
            path = model.add_module(generator=torch.Generator().manual_seed(self.cfg.train.seed + task.index))
        else:
            sims = {t: expansion.cosine_similarity(self.token_counts[task.task_id], self.token_counts[t]) for t in earlier}
            rec["params"]["token_similarity"] = sims
            path, candidates = self._search(task, sims)
            rec["params"]["candidates"] = candidates
        model.set_path(task.task_id, path)
        new = sum(1 for layer, m in enumerate(path) if all(model.paths[t][layer] != m for t in earlier))
        rec["params"]["path"] = path
        rec["metrics"]["new_modules"] = float(new)
        return {"path": path, "new_modules": new}

    def _search(self, task: Task, sims: dict[str, float]) -> tuple[list[int], list[dict]]:
        model, exp = self.run.model, self.cfg.method.expansion
        old = [model.module_ids(layer) for layer in range(model.n_layers)]
        jobs = []
        for i, overrides in enumerate(exp.candidates):
            beta = float(overrides.get("beta", exp.beta))
            jobs.append({
                "candidate": i, "seed": int(overrides.get("seed", self.cfg.train.seed + i)),
                "entropy_weight": float(overrides.get("entropy_weight", exp.entropy_weight)),
                "init": expansion.initial_logits(old_modules=old, paths=model.paths, similarities=sims, beta=beta,
                                                 init=self.run.policy.init, mix_ini=exp.mix_ini),
                "params": {"beta": beta, **overrides},
            })
        seed = f"{self.cfg.train.seed}:{task.index}"
        common = dict(train=self._stream(task.train, seed=f"{seed}:search"),
                      val_batches=self._stream(task.val, seed=f"{seed}:val").epoch(0), epochs=exp.epochs,
                      warmup_epochs=exp.warmup_epochs, lr=self.cfg.train.lr, coefficient_lr=exp.coefficient_lr,
                      lm_lambda=self.cfg.train.lm_lambda, token_weights=self.token_weights,
                      weight_decay=self.cfg.train.weight_decay, adam_eps=self.cfg.train.adam_eps,
                      grad_clip=self.cfg.train.grad_clip)
        results = self.search_fn(model, jobs, common)
        best = expansion.pick_best(results)
        path = expansion.install_candidate(model, best)
        table = [{"candidate": r.candidate, "val_loss": r.val_loss, "new_modules": r.n_new, "path": r.path,
                  "winner": r.candidate == best.candidate, **r.params} for r in results]
        return path, table

    def _search_in_process(self, model, jobs, common) -> list[expansion.CandidateResult]:
        results = []
        for k, job in enumerate(jobs):
            self.progress("search", k, len(jobs))
            results.append(expansion.search_candidate(copy.deepcopy(model), **job, **common))
        self.progress("search", len(jobs), len(jobs))
        return results

    # ------------------------------------------------------------------ SELECT

    def select(self, task: Task) -> dict[str, Any]:
        policy = self.run.policy
        earlier = [t.task_id for t in self.run.tasks[: task.index]]
        if policy.selection == "none" or not earlier:
            self.selected[task.task_id] = []
            return {"selected": []}
        sims = {}
        if policy.selection == "subspace":
            reps = self._representations(task)
            for t in self.run.tasks[: task.index]:
                sims[t.task_id] = selection.task_similarity(self.bases[t.task_id], reps)
                self.similarity[task.index, t.index] = sims[t.task_id]
        else:
            sims = dict.fromkeys(earlier, 0.0)
        chosen = selection.select_tasks(sims, top_k=policy.top_k, mode=policy.selection,
                                        seed=self.cfg.train.seed + task.index)
        self.selected[task.task_id] = chosen
        rec = self._record(task)
        rec["params"].update(subspace_similarity=sims, selected=chosen)
        return {"selected": chosen, "similarity": sims}

    def _representations(self, task: Task) -> list[torch.Tensor]:
        n = self.cfg.method.selection.n_samples
        qa = task.train[0][:n]
        batches = [collate(qa[i:i + 32], pad_id=self.run.formatter.special.pad) for i in range(0, len(qa), 32)]
        return selection.collect_representations(self.run.model, batches, path=self._path(task.task_id), n_samples=n)

    # ---------------------------------------------------------------- GENERATE

    def generate(self, task: Task) -> dict[str, Any]:
        policy, model, ad = self.run.policy, self.run.model, self.cfg.method.adaptation
        earlier = [t.task_id for t in self.run.tasks[: task.index]]
        transfer = self.selected.get(task.task_id, []) if policy.transfer else []
        replay = replay_tasks(policy=policy, new_path=self._path(task.task_id),
                              paths=model.paths, earlier=earlier)
        wanted = sorted(set(transfer) | set(replay), key=earlier.index)
        n = pseudo_sample_counts(ad.gamma, len(task.rows["train"]), len(wanted), budget=ad.pseudo_budget)
        self.pseudo[task.task_id] = {}
        summary = {"transfer": transfer, "replay": replay, "pseudo_samples": {}, "yield": {}, "fidelity": {},
                   "warnings": []}
        requests = [{"task_id": old_id, "task_index": earlier.index(old_id), "path": self._path(old_id), "n": n,
                     "seed": self.cfg.train.seed + task.index} for old_id in wanted]
        rec = self._record(task)
        for out in self.generate_fn(model, requests) if requests and n else []:
            self.pseudo[task.task_id][out.task_id] = out.rows
            counts = {"requested": out.requested, "generated": out.generated, "well_formed": out.well_formed,
                      "kept": len(out.rows), "truncated": out.truncated}
            summary["pseudo_samples"][out.task_id] = counts
            summary["yield"][out.task_id] = out.yield_rate
            faithful = fidelity(out.task_id, out.rows)
            summary["fidelity"][out.task_id] = faithful
            summary["warnings"] += yield_warnings(out, min_yield=ad.min_yield, new_task=task.task_id)
            rec["metrics"].update({f"pseudo.{k}.{out.task_id}": float(v) for k, v in counts.items()})
            rec["metrics"][f"pseudo.yield.{out.task_id}"] = out.yield_rate
            if faithful is not None:
                rec["metrics"][f"pseudo.fidelity.{out.task_id}"] = faithful
            if out.rows:
                file = write_pseudo_samples(out.rows, self.task_dir(task) / "pseudo_samples" / f"{out.task_id}.parquet")
                rec["artifacts"][f"pseudo_samples/{out.task_id}.parquet"] = str(file)
        rec["params"].update(transfer=transfer, replay=replay)
        if summary["warnings"]:
            rec["params"]["warnings"] = rec["params"].get("warnings", []) + summary["warnings"]
        return summary

    def _generate_in_process(self, model, requests: list[dict]) -> list[PseudoSamples]:
        out = []
        for k, req in enumerate(requests):
            self.progress("generate", k, len(requests))
            out.append(generate_pseudo_samples(model, self.run.formatter, top_k=self.cfg.method.adaptation.top_k_sampling,
                                               batch_size=self.cfg.eval.batch_size, **req))
        return out

    # ------------------------------------------------------------------- ADAPT

    def adapt(self, task: Task) -> dict[str, Any]:
        cfg, policy = self.cfg, self.run.policy
        if policy.joint and task.index != len(self.run.tasks) - 1:
            return {"skipped": "multitask trains once, on every task, at the last task"}
        # a fresh module set (first task, or multitask's joint training) trains longer
        epochs = cfg.train.first_task_epochs if task.index == 0 or policy.joint else cfg.method.adaptation.epochs
        job = AdaptJob(sources=self._sources(task), trainable=self._path(task.task_id), epochs=epochs,
                       lm_lambda=cfg.train.lm_lambda, scale=policy.scaling, progress=cfg.method.adaptation.progress,
                       batch_size=cfg.train.batch_size, pad_id=self.run.formatter.special.pad,
                       seed=cfg.train.seed + task.index, autocast=cfg.train.autocast,
                       mixing="all" if policy.joint else cfg.method.adaptation.mixing,
                       token_weights=self.token_weights)
        result = self.adapt_fn(self.run.model, job)
        if self.run.policy.selection == "subspace":  # only subspace selection reads the bases
            reps = self._representations(task)
            self.bases[task.task_id] = [selection.subspace_basis(r, epsilon=cfg.method.selection.epsilon) for r in reps]
        rec = self._record(task)
        rec["series"].update({f"loss.{k}": v for k, v in result.losses.items()})
        rec["series"].update({f"eta.{k}": v for k, v in result.etas.items()})
        rec["metrics"]["adapt_steps"] = float(result.steps)
        clamp_rate = result.clamp_rate()
        if clamp_rate is not None:
            rec["metrics"]["eta_clamp_rate"] = clamp_rate
        final = {k: v[-1] for k, v in result.losses.items() if v}
        return {"steps": result.steps, "final_losses": final,
                "mean_eta": {k: float(np.mean(v)) for k, v in result.etas.items()},
                "clamp_rate": clamp_rate}

    def _adapt_in_process(self, model, job: AdaptJob) -> AdaptResult:
        return run_adapt_job(model, job, engine_factory=self.engine_factory,
                             on_step=lambda done, total: self.progress("adapt", done, total))

    def _sources(self, task: Task) -> list:
        """(key, (qa, lm) examples, path) of every sub-batch stream of the new task's adaptation."""
        if self.run.policy.joint:  # multitask: every task's real data through the shared path
            return [(t.task_id, t.train, self._path(t.task_id)) for t in self.run.tasks]
        sources = [("new", task.train, self._path(task.task_id))]
        pseudo = self.pseudo.get(task.task_id, {})
        earlier = {t.task_id: t for t in self.run.tasks[: task.index]}
        encode = lambda old_id: encode_task(self.run.formatter, pseudo[old_id], task_index=earlier[old_id].index)  # noqa: E731
        new_path = self._path(task.task_id)
        replay = replay_tasks(policy=self.run.policy, new_path=new_path, paths=self.run.model.paths,
                              earlier=list(earlier))
        for old_id in self.selected.get(task.task_id, []) if self.run.policy.transfer else []:
            # a replayed task whose own path is the new path already trains exactly what transfer would
            if pseudo.get(old_id) and not (old_id in replay and self._path(old_id) == new_path):
                sources.append((f"transfer:{old_id}", encode(old_id), new_path))
        for old_id in replay:
            if pseudo.get(old_id):
                sources.append((f"replay:{old_id}", encode(old_id), self._path(old_id)))
        return sources

    # ---------------------------------------------------------------- EVALUATE

    def evaluate(self, task: Task) -> dict[str, Any]:
        ev = self.cfg.eval
        if self.run.policy.joint and task.index != len(self.run.tasks) - 1:
            return {"skipped": "multitask is evaluated once, after joint training"}
        targets = self.run.tasks if ev.all_tasks else self.run.tasks[: task.index + 1]
        requests = []
        for target in targets:
            seen = target.index <= task.index  # unseen tasks (forward transfer) run along the newest path
            rows = target.rows["test"][: ev.max_samples] if ev.max_samples else target.rows["test"]
            requests.append({"task_id": target.task_id, "rows": rows,
                             "path": self._path(target.task_id if seen else task.task_id)})
        row = {}
        for target, req, answers in zip(targets, requests, self.answer_fn(self.run.model, requests), strict=True):
            scores = score_task(ev.metric, answers, [r["answer"] for r in req["rows"]])
            self.R[task.index, target.index] = scores["primary"]
            row[target.task_id] = scores
        rec = self._record(task)
        rec["metrics"].update({f"R.{t}": s["primary"] for t, s in row.items()})
        rec["metrics"].update({f"{k}.{t}": v for t, s in row.items() for k, v in s.items() if k != "primary"})
        return {"scores": {t: s["primary"] for t, s in row.items()}}

    def _evaluate_baseline(self) -> None:
        """Every task's score before any training (the frozen backbone alone): FWT's reference b_i."""
        ev = self.cfg.eval
        requests = [{"task_id": t.task_id, "rows": t.rows["test"][: ev.max_samples] if ev.max_samples
                     else t.rows["test"], "path": None} for t in self.run.tasks]
        for target, req, answers in zip(self.run.tasks, requests, self.answer_fn(self.run.model, requests),
                                        strict=True):
            self.baseline[target.index] = score_task(ev.metric, answers, [r["answer"] for r in req["rows"]])["primary"]
        self._record(self.run.tasks[0])["params"]["baseline_scores"] = {
            t.task_id: float(self.baseline[t.index]) for t in self.run.tasks}

    def _answer_in_process(self, model, requests: list[dict]) -> list[list[str]]:
        ev, out = self.cfg.eval, []
        for k, req in enumerate(requests):
            self.progress("evaluate", k, len(requests))
            out.append(generate_answers(model, self.run.formatter, req["rows"], path=req["path"],
                                        batch_size=ev.batch_size, max_new_tokens=ev.max_new_tokens,
                                        decoding=ev.decoding, top_k=ev.top_k, seed=self.cfg.train.seed))
        return out

    # ------------------------------------------------------------------ RECORD

    def record(self, task: Task) -> dict[str, Any]:
        out = self.task_dir(task)
        rec = self._record(task)
        if self.run.policy.full_finetune:
            model_dir = save_backbone(self.run.model, out / "modules")
        else:
            model_dir = save_path_modules(self.run.model, task.task_id, out / "modules")
        if (self.run.run_dir / "tokenizer").is_dir():
            rec["artifacts"]["tokenizer"] = str(self.run.run_dir / "tokenizer")
        rec["model_dir"] = str(model_dir)
        (out / "record.json").write_text(json.dumps(_jsonable(rec), indent=1))
        return {"model_dir": str(model_dir)}


def _jsonable(value):
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_jsonable(v) for v in value]
    if isinstance(value, float | np.floating) and not math.isfinite(float(value)):
        return None
    if isinstance(value, np.generic):
        return value.item()
    return value


def configure_threads(cpus: float | None = None) -> None:
    """Threads = the CPU share of this process (no oversubscription under Ray)."""
    n = max(1, int(cpus or os.cpu_count() or 1))
    torch.set_num_threads(n)
