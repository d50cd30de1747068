"""The six stages of a task, as functions of (context, task) that read and write the run's state.

    EXPAND   add modules / search candidates      (method.expansion; kernels.search)
    SELECT   subspace similarity, top-K           (method.selection)
    GENERATE pseudo samples -> Parquet            (kernels.generate)
    ADAPT    DeepSpeed step with gradient scaling (kernels.adapt)
    EVALUATE the R-matrix row                     (kernels.answer, evaluation.metrics)
    RECORD   the task's modules + path manifest, servable alone

`STAGES` maps each `Stage` to its function (explicit dispatch: "go to
definition" leads from a stage to its code). A stage reads what earlier
stages left in the state (`ctx.state`) and in the files it names, writes its
own files atomically and records what it did in the task's record; the
coordinator persists the state after it. So any stage can run in a fresh
process from the files alone: that is what `dmea resume` does.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from dmea_dist.config import (
    AdaptationConfig,
    EvalConfig,
    ExpansionConfig,
    RunConfig,
    SelectionConfig,
    TrainConfig,
)
from dmea_dist.data.formatting import BatchStream, collate, encode_task
from dmea_dist.data.synthetic import fidelity
from dmea_dist.evaluation.metrics import score_task
from dmea_dist.files import atomic_path
from dmea_dist.kernels import (
    AnswerRequest,
    GenerateRequest,
    Kernels,
    SearchData,
    SearchJob,
    mixed_seed,
)
from dmea_dist.method import expansion, selection
from dmea_dist.method.adaptation import AdaptJob
from dmea_dist.method.generation import (
    pseudo_sample_plan,
    read_pseudo_samples,
    stand_in_count,
    write_pseudo_samples,
    yield_warnings,
)
from dmea_dist.method.lifecycle import Stage
from dmea_dist.method.policy import replay_tasks
from dmea_dist.modeling.io import save_backbone, save_path_modules
from dmea_dist.run import Run, Task
from dmea_dist.state import RunState, TaskState, read_json, task_folder, write_json


@dataclass(frozen=True)
class StageSettings:
    """The config sections the stages read (resolved once, at the entry point)."""

    train: TrainConfig
    expansion: ExpansionConfig
    selection: SelectionConfig
    adaptation: AdaptationConfig
    eval: EvalConfig

    @classmethod
    def from_config(cls, config: RunConfig) -> StageSettings:
        m = config.method
        return cls(config.train, m.expansion, m.selection, m.adaptation, config.eval)


@dataclass
class RunContext:
    """What a stage works with: the run's parts, its state, the kernels and the settings."""

    run: Run
    state: RunState
    kernels: Kernels
    settings: StageSettings
    records: dict[str, dict[str, Any]] = field(default_factory=dict)  # loaded task records (cache of the files)

    @property
    def run_dir(self) -> Path:
        return self.run.run_dir

    @property
    def special(self):
        return self.run.formatter.special

    @property
    def token_weights(self) -> dict[int, float]:
        # the answer separator's loss weight (LAMOL/ACM): pseudo samples are unusable without it
        return {self.special.ans: self.settings.train.separator_weight}

    def path(self, task_id: str) -> list[int] | None:
        return None if self.run.policy.full_finetune else self.run.model.path_of(task_id)

    def scope(self, task_id: str) -> tuple[str, ...] | None:
        """The tasks whose token rows `task_id`'s samples see: those up to it, the rows it was trained with (a
        later task's trained rows would compete in its softmax through the tied head, whatever its path:
        `DMEAModel.only_rows_of`). None (every task's) where no rows train, and for multitask, whose one
        training claims every task's rows at once."""
        if not self.run.config.trains_token_rows or self.run.policy.joint:
            return None
        index = next(t.index for t in self.run.tasks if t.task_id == task_id)
        return tuple(t.task_id for t in self.run.tasks[: index + 1])

    def task_dir(self, task: Task) -> Path:
        return self.run_dir / "tasks" / task_folder(task.index, task.task_id)

    def task_state(self, task: Task) -> TaskState:
        return self.state.tasks[task.index]

    def record(self, task: Task) -> dict[str, Any]:
        """The task's record (params, metrics, series, artifacts), from its file once written."""
        if task.task_id not in self.records:
            file = self.task_state(task).record
            self.records[task.task_id] = read_json(self.run_dir / file) if file else {
                "task_id": task.task_id, "task_index": task.index, "params": {}, "metrics": {}, "series": {},
                "artifacts": {}}
        return self.records[task.task_id]

    def save_record(self, task: Task) -> None:
        file = self.task_dir(task) / "record.json"
        write_json(file, self.record(task))
        self.task_state(task).record = self.rel(file)

    def rel(self, path: Path) -> str:
        return str(Path(path).relative_to(self.run_dir))

    def earlier(self, task: Task) -> list[Task]:
        return self.run.tasks[: task.index]


# ------------------------------------------------------------------ EXPAND


def expand(ctx: RunContext, task: Task) -> dict[str, Any]:
    model, policy, ts = ctx.run.model, ctx.run.policy, ctx.task_state(task)
    rec = ctx.record(task)
    counts = expansion.token_distribution((ex.input_ids for ex in task.train[0]), exclude=_special_ids(ctx))
    file = write_json(ctx.task_dir(task) / "token_counts.json", {str(k): v for k, v in counts.items()})
    ts.token_counts = ctx.rel(file)
    if task.index == 0 and ctx.settings.eval.all_tasks:
        _evaluate_baseline(ctx)
    if policy.full_finetune:
        ctx.save_record(task)
        return {"path": None, "new_modules": 0}
    earlier = [t.task_id for t in ctx.earlier(task)]
    if policy.joint and earlier:
        path = model.path_of(earlier[0])  # multitask: one shared module set
    elif not earlier or not policy.search:
        path = model.add_modules(generator=torch.Generator().manual_seed(ctx.settings.train.seed + task.index))
    else:
        sims = {t.task_id: expansion.cosine_similarity(counts, _token_counts(ctx, t)) for t in ctx.earlier(task)}
        rec["params"]["token_similarity"] = sims
        path, candidates = _search(ctx, task, sims)
        rec["params"]["candidates"] = candidates
    model.set_path(task.task_id, path)
    new = sum(1 for layer, m in enumerate(path) if all(model.paths[t][layer] != m for t in earlier))
    ts.path, ts.new_modules = list(path), new
    rec["params"]["path"] = path
    rec["metrics"]["new_modules"] = float(new)
    ctx.save_record(task)
    return {"path": path, "new_modules": new}


def _search(ctx: RunContext, task: Task, sims: dict[str, float]) -> tuple[list[int], list[dict]]:
    model, exp, tr = ctx.run.model, ctx.settings.expansion, ctx.settings.train
    old = [model.module_ids(layer) for layer in range(model.n_layers)]
    jobs = []
    for i, overrides in enumerate(exp.candidates):
        beta = float(overrides.get("beta", exp.beta))
        init = expansion.initial_logits(old_modules=old, paths=model.paths, similarities=sims, beta=beta,
                                        init=ctx.run.policy.init, mix_ini=exp.mix_ini)
        # seeded by what the candidate is (run seed, task, its own seed): the new modules of every task and
        # candidate start apart, and a candidate's {seed: 1} cannot meet candidate 0's seed under train.seed=1
        jobs.append(SearchJob(candidate=i, seed=mixed_seed(tr.seed, task.index, int(overrides.get("seed", i))),
                              entropy_weight=float(overrides.get("entropy_weight", exp.entropy_weight)),
                              init=[x.tolist() for x in init], params={"beta": beta, **overrides}))
    seed = f"{tr.seed}:{task.index}"
    data = SearchData(train=_stream(ctx, task.train, seed=f"{seed}:search"),
                      val_batches=_stream(ctx, task.val, seed=f"{seed}:val").epoch(0), epochs=exp.epochs,
                      warmup_epochs=exp.warmup_epochs, lr=tr.lr, coefficient_lr=exp.coefficient_lr,
                      lm_lambda=tr.lm_lambda, token_weights=ctx.token_weights, weight_decay=tr.weight_decay,
                      adam_eps=tr.adam_eps, grad_clip=tr.grad_clip)
    results = ctx.kernels.search(model, jobs, data)
    best = expansion.pick_best(results)
    path = expansion.install_candidate(model, best)
    table = [{"candidate": r.candidate, "val_loss": r.val_loss, "new_modules": r.n_new, "path": r.path,
              "winner": r.candidate == best.candidate, **r.params} for r in results]
    return path, table


# ------------------------------------------------------------------ SELECT


def select(ctx: RunContext, task: Task) -> dict[str, Any]:
    policy, ts = ctx.run.policy, ctx.task_state(task)
    earlier = ctx.earlier(task)
    if policy.selection == "none" or not earlier:
        ts.selected = []
        return {"selected": []}
    if policy.selection == "subspace":
        sims = {t.task_id: selection.task_similarity(_basis(ctx, t), reps)
                for t, reps in _representations_for(ctx, task, earlier)}
        for t in earlier:
            ctx.state.similarity[task.index][t.index] = sims[t.task_id]
    else:
        sims = {t.task_id: 0.0 for t in earlier}
    chosen = selection.select_tasks(sims, top_k=policy.top_k, mode=policy.selection,
                                    seed=ctx.settings.train.seed + task.index)
    ts.selected = chosen
    if policy.selection == "subspace":  # random selection has no similarities to record
        ctx.record(task)["params"]["subspace_similarity"] = sims
    ctx.record(task)["params"]["selected"] = chosen
    ctx.save_record(task)
    return {"selected": chosen, "similarity": sims}


def _representations(ctx: RunContext, task: Task, path: list[int] | None = None,
                     scope: tuple[str, ...] | None = None) -> list[torch.Tensor]:
    """`task`'s per-layer representations along `path` (default: its own), seeing the token rows of the tasks in
    `scope` (None: every task's)."""
    n = ctx.settings.selection.n_samples
    qa = task.train[0][:n]
    batches = [collate(qa[i:i + 32], pad_id=ctx.special.pad) for i in range(0, len(qa), 32)]
    path = ctx.path(task.task_id) if path is None else path
    return selection.collect_representations(ctx.run.model, batches, path=path, n_samples=n, scope=scope)


def _representations_for(ctx: RunContext, task: Task, earlier: list[Task]) -> Iterator[tuple[Task, list]]:
    """(earlier task, the new task's representations to compare with its basis), by `selection.route`:
    along the new task's own path (every row), or in the network each earlier task's basis was read from:
    its path, with the token rows of the tasks up to it (computed once per distinct path and set of those
    tasks that own tokens of the new task's inputs: the other rows in scope cannot move them)."""
    if ctx.settings.selection.route == "own":
        reps = _representations(ctx, task)
        yield from ((t, reps) for t in earlier)
        return
    # the rows a scope shows matter only where the new task's inputs hold their tokens: key by those owners
    tokens = {int(tok) for example in task.train[0][:ctx.settings.selection.n_samples] for tok in example.input_ids}
    holders = {owner for owner, ids in ctx.run.model.token_rows.owners.items() if tokens.intersection(ids)}
    seen: dict[tuple, list[torch.Tensor]] = {}
    for t in earlier:
        path, scope = ctx.path(t.task_id), ctx.scope(t.task_id)
        key = (None if path is None else tuple(path),
               None if scope is None else frozenset(holders.intersection(scope)))
        if key not in seen:
            seen[key] = _representations(ctx, task, path, scope)
        yield t, seen[key]


def _basis(ctx: RunContext, task: Task) -> list[torch.Tensor]:
    tensors = load_file(str(ctx.run_dir / ctx.task_state(task).basis))
    return [tensors[f"layer{layer}"] for layer in range(len(tensors))]


# ---------------------------------------------------------------- GENERATE


def generate(ctx: RunContext, task: Task) -> dict[str, Any]:
    policy, ad, ts = ctx.run.policy, ctx.settings.adaptation, ctx.task_state(task)
    earlier = [t.task_id for t in ctx.earlier(task)]
    transfer = ts.selected if policy.transfer else []
    replay = replay_tasks(policy=policy, new_path=ctx.path(task.task_id), paths=ctx.run.model.paths, earlier=earlier)
    n_train = len(task.rows["train"])
    sizes = pseudo_sample_plan(ad.gamma, n_train, replay=replay, transfer=transfer, budget=ad.pseudo_budget,
                               split=ad.pseudo_split)
    wanted = sorted(sizes, key=earlier.index)
    stand_in = stand_in_count(sizes, ad.gamma, n_train, transfer=transfer, budget=ad.pseudo_budget,
                              split=ad.pseudo_split)
    summary = {"transfer": transfer, "replay": replay, "pseudo_samples": {}, "yield": {}, "fidelity": {},
               "warnings": []}
    rec = ctx.record(task)

    def draw(tasks: list[str], n: int | None = None) -> None:
        """Generate pseudo samples of each of `tasks` along its own path (n each, default its planned count);
        record and store them."""
        requests = [GenerateRequest(task_id=old, task_index=earlier.index(old), path=ctx.path(old),
                                    n=sizes[old] if n is None else n, seed=ctx.settings.train.seed + task.index,
                                    scope=ctx.scope(old))
                    for old in tasks if (sizes[old] if n is None else n)]
        for out in ctx.kernels.generate(ctx.run.model, requests) if requests else []:
            counts = {"requested": out.requested, "generated": out.generated, "well_formed": out.well_formed,
                      "kept": len(out.rows), "truncated": out.truncated,
                      **{f"dropped_{why}": k for why, k in out.reasons.items()}}  # why the others were dropped
            faithful = fidelity(out.task_id, out.rows)
            summary["pseudo_samples"][out.task_id] = counts
            summary["yield"][out.task_id] = out.yield_rate
            summary["fidelity"][out.task_id] = faithful
            real = _real_fidelity(ctx, task, out.task_id)
            if real is not None:
                rec["metrics"][f"pseudo.real_fidelity.{out.task_id}"] = real
            summary["warnings"] += yield_warnings(out, min_yield=ad.min_yield, new_task=task.task_id)
            rec["metrics"].update({f"pseudo.{k}.{out.task_id}": float(v) for k, v in counts.items()})
            rec["metrics"][f"pseudo.yield.{out.task_id}"] = out.yield_rate
            if faithful is not None:
                rec["metrics"][f"pseudo.fidelity.{out.task_id}"] = faithful
            if out.rows:
                file = write_pseudo_samples(out.rows, ctx.task_dir(task) / "pseudo_samples" / f"{out.task_id}.parquet")
                ts.pseudo[out.task_id] = ctx.rel(file)
                rec["artifacts"][f"pseudo_samples/{out.task_id}.parquet"] = str(file)

    draw(wanted)
    # transfer gate: a selected task whose pseudo samples mostly failed to parse teaches the new path noise
    gate = policy.transfer_min_yield

    def usable(t: str) -> bool:
        return t in ts.pseudo and summary["yield"].get(t, 0.0) >= gate

    ts.transfer, tried = [t for t in transfer if usable(t)], list(transfer)
    if policy.transfer_next and transfer:  # transfer=usable: the next tasks in selection's order stand in
        row = ctx.state.similarity[task.index]  # subspace similarities (None where selection computed none)
        sims = {t.task_id: 0.0 if row[t.index] is None else row[t.index] for t in ctx.earlier(task)}
        waiting = selection.rank_tasks(sims, selected=transfer, mode=policy.selection,
                                       seed=ctx.settings.train.seed + task.index)[len(transfer):]
        while len(ts.transfer) < len(transfer) and waiting:
            short = len(transfer) - len(ts.transfer)
            batch, waiting = waiting[:short], waiting[short:]
            # a replayed task's samples exist already: drawn again only where a selected task's count is larger
            draw([t for t in batch if t not in summary["yield"] or sizes.get(t, 0) < stand_in], n=stand_in)
            ts.transfer += [t for t in batch if usable(t)]
            tried += batch
    for t in tried:
        if t not in ts.transfer and t in ts.pseudo:
            summary["warnings"].append(
                f"pseudo samples of {t} (learning {task.task_id}): yield {summary['yield'][t]:.1%} is below "
                f"method.adaptation.min_yield={gate:.0%}: not transferred (method.adaptation.transfer={ad.transfer})")
    summary["transfer"] = ts.transfer
    rec["params"].update(transfer=ts.transfer, replay=replay)
    # this stage's own: redone after a kill before the state moved on, the record file already holds them
    rec["params"].pop("warnings", None)
    if summary["warnings"]:
        rec["params"]["warnings"] = list(summary["warnings"])
    ctx.save_record(task)
    return summary


def _real_fidelity(ctx: RunContext, task: Task, old: str) -> float | None:
    """Fidelity on real inputs of the model that wrote `task`'s pseudo samples of `old`: the previous task's
    evaluation of `old` (None where it was not evaluated, or `old` has no generator to check answers)."""
    if task.index == 0:
        return None
    value = ctx.record(ctx.run.tasks[task.index - 1])["metrics"].get(f"fidelity.{old}")
    return None if value is None else float(value)


# ------------------------------------------------------------------- ADAPT


def adapt(ctx: RunContext, task: Task) -> dict[str, Any]:
    tr, policy = ctx.settings.train, ctx.run.policy
    if policy.joint and task.index != len(ctx.run.tasks) - 1:
        return {"skipped": "multitask trains once, on every task, at the last task"}
    # a fresh module set (first task, or multitask's joint training) trains longer
    epochs = tr.first_task_epochs if task.index == 0 or policy.joint else ctx.settings.adaptation.epochs
    rows = _claim_token_rows(ctx, task)
    sources = _sources(ctx, task)
    # a replayed task trains in its own scope; the new task and transfer (an earlier task's pseudo samples
    # along the new path, which serves only the new task) in the new task's: every row
    scopes = {key: scope for key, _, _ in sources
              if key.startswith("replay:") and (scope := ctx.scope(key.split(":", 1)[1])) is not None}
    job = AdaptJob(sources=sources, trainable=ctx.path(task.task_id), epochs=epochs, scopes=scopes,
                   lm_lambda=tr.lm_lambda, scale=policy.scaling, progress=ctx.settings.adaptation.progress,
                   batch_size=tr.batch_size, pad_id=ctx.special.pad, seed=tr.seed + task.index,
                   autocast=tr.autocast, mixing="all" if policy.joint else ctx.settings.adaptation.mixing,
                   token_weights=ctx.token_weights, virtual_shards=tr.virtual_shards,
                   rows=task.task_id if rows else None)
    result = ctx.kernels.adapt(ctx.run.model, job, checkpoint_dir=ctx.task_dir(task) / "adapt_checkpoint")
    if policy.selection == "subspace":  # only subspace selection reads the bases
        bases = [selection.subspace_basis(r, epsilon=ctx.settings.selection.epsilon)
                 for r in _representations(ctx, task, scope=ctx.scope(task.task_id))]
        file = ctx.task_dir(task) / "basis.safetensors"
        with atomic_path(file) as partial:
            save_file({f"layer{layer}": b.contiguous() for layer, b in enumerate(bases)}, str(partial))
        ctx.task_state(task).basis = ctx.rel(file)
    rec = ctx.record(task)
    rec["series"].update({f"loss.{k}": v for k, v in result.losses.items()})
    rec["series"].update({f"eta.{k}": v for k, v in result.etas.items()})
    rec["metrics"]["adapt_steps"] = float(result.steps)
    if ctx.run.config.trains_token_rows:
        rec["metrics"]["token_rows"] = float(len(rows))
    clamp_rate = result.clamp_rate()
    if clamp_rate is not None:
        rec["metrics"]["eta_clamp_rate"] = clamp_rate
    ctx.save_record(task)
    final = {k: v[-1] for k, v in result.losses.items() if v}
    return {"steps": result.steps, "final_losses": final, "resumed_from": result.resumed_from,
            "mean_eta": {k: float(np.mean(v)) for k, v in result.etas.items()}, "clamp_rate": clamp_rate}


def _claim_token_rows(ctx: RunContext, task: Task) -> list[int]:
    """The untrained tokens of the real data this adaptation trains on that no earlier task claimed become the
    task's rows (every task's for multitask, which trains once): all of them with model.token_rows "trained", the
    words among them with "words" (what "auto", the default, means for a module method), none with "frozen"."""
    mode = ctx.run.config.token_rows_mode
    if mode == "frozen":
        return []
    tasks = ctx.run.tasks if ctx.run.policy.joint else [task]
    tokens = {t for real in tasks for example in real.train[1] for t in example.input_ids}
    if mode == "words":  # the text's own tokens, not the separator, end or generation tokens
        tokens -= {ctx.special.ans, ctx.special.eos, ctx.special.pad, *ctx.special.tasks}
    return ctx.run.model.claim_token_rows(task.task_id, tokens)


def _sources(ctx: RunContext, task: Task) -> list:
    """(key, (qa, lm) examples, path) of every sub-batch stream of the new task's adaptation."""
    if ctx.run.policy.joint:  # multitask: every task's real data through the shared path; the epochs count
        # passes over the largest task (the first stream, the anchor), so every example is seen that often
        tasks = sorted(ctx.run.tasks, key=lambda t: -len(t.train[0]))
        return [(t.task_id, t.train, ctx.path(t.task_id)) for t in tasks]
    ts, new_path = ctx.task_state(task), ctx.path(task.task_id)
    sources = [("new", task.train, new_path)]
    earlier = {t.task_id: t for t in ctx.earlier(task)}

    def encode(old_id: str):
        rows = read_pseudo_samples(ctx.run_dir / ts.pseudo[old_id])
        return encode_task(ctx.run.formatter, rows, task_index=earlier[old_id].index)

    replay = replay_tasks(policy=ctx.run.policy, new_path=new_path, paths=ctx.run.model.paths, earlier=list(earlier))
    transfer = ts.transfer if ts.transfer is not None else ts.selected  # see TaskState.transfer
    for old_id in transfer if ctx.run.policy.transfer else []:
        # a replayed task whose own path is the new path already trains what transfer would (in its own scope)
        if old_id in ts.pseudo and not (old_id in replay and ctx.path(old_id) == new_path):
            sources.append((f"transfer:{old_id}", encode(old_id), new_path))
    for old_id in replay:
        if old_id in ts.pseudo:
            sources.append((f"replay:{old_id}", encode(old_id), ctx.path(old_id)))
    return sources


# ---------------------------------------------------------------- EVALUATE


def evaluate(ctx: RunContext, task: Task) -> dict[str, Any]:
    ev, last = ctx.settings.eval, task.index == len(ctx.run.tasks) - 1
    if ctx.run.policy.joint and not last:
        return {"skipped": "multitask is evaluated once, after joint training"}
    targets = ctx.run.tasks if ev.all_tasks else ctx.run.tasks[: task.index + 1]
    if (task.index + 1) % ev.every and not last:
        # between eval.every's full rows: the task just trained (R[j][j], which BWT and forgetting read) and, with
        # all_tasks, the next one (R[j][j+1], which FWT reads): the cost of one or two tasks, not of the row
        targets = [t for t in targets if t.index in (task.index, task.index + 1)]
    # every target's test rows in one request, each row along its task's path (unseen tasks, for forward
    # transfer, along the newest path): batches fill across tasks, and the pool shards one request
    # and in its scope: the token rows of the tasks up to it (an unseen task sees every row, as the newest)
    rows = [_test_rows(ctx, t) for t in targets]
    paths = [ctx.path(t.task_id if t.index <= task.index else task.task_id) for t in targets]
    scopes = [ctx.scope(t.task_id) if t.index <= task.index else None for t in targets]
    request = AnswerRequest(task_id="*", rows=[r for part in rows for r in part], path=None,
                            paths=[p for part, p in zip(rows, paths, strict=True) for _ in part],
                            scopes=None if all(s is None for s in scopes) else
                            [s for part, s in zip(rows, scopes, strict=True) for _ in part])
    (answers,) = ctx.kernels.answer(ctx.run.model, [request])
    row, start = {}, 0
    for target, part in zip(targets, rows, strict=True):
        said = answers[start:start + len(part)]
        scores = score_task(ev.metric, said, [r["answer"] for r in part])
        # synthetic tasks: the share of real test inputs the model's answers realise, the ceiling that the
        # fidelity of pseudo samples this model writes next is read against
        realised = fidelity(target.task_id, [{"context": r["context"], "answer": [a]}
                                             for r, a in zip(part, said, strict=True)])
        if realised is not None:
            scores["fidelity"] = realised
        start += len(part)
        ctx.state.R[task.index][target.index] = scores["primary"]
        row[target.task_id] = scores
    rec = ctx.record(task)
    rec["metrics"].update({f"R.{t}": s["primary"] for t, s in row.items()})
    rec["metrics"].update({f"{k}.{t}": v for t, s in row.items() for k, v in s.items() if k != "primary"})
    ctx.save_record(task)
    return {"scores": {t: s["primary"] for t, s in row.items()}}


def _evaluate_baseline(ctx: RunContext) -> None:
    """Every task's score before any training (the frozen backbone alone): FWT's reference b_i."""
    ev, tasks = ctx.settings.eval, ctx.run.tasks
    requests = [AnswerRequest(task_id=t.task_id, rows=_test_rows(ctx, t), path=None) for t in tasks]
    for target, req, answers in zip(tasks, requests, ctx.kernels.answer(ctx.run.model, requests), strict=True):
        ctx.state.baseline[target.index] = score_task(ev.metric, answers, [r["answer"] for r in req.rows])["primary"]
    ctx.record(tasks[0])["params"]["baseline_scores"] = {t.task_id: ctx.state.baseline[t.index] for t in tasks}


def _test_rows(ctx: RunContext, task: Task) -> list[dict]:
    cap = ctx.settings.eval.max_samples
    return task.rows["test"][:cap] if cap else task.rows["test"]


# ------------------------------------------------------------------ RECORD


def record(ctx: RunContext, task: Task) -> dict[str, Any]:
    out, rec = ctx.task_dir(task), ctx.record(task)
    if ctx.run.policy.full_finetune:
        model_dir = save_backbone(ctx.run.model, out / "modules")
    else:
        model_dir = save_path_modules(ctx.run.model, task.task_id, out / "modules")
    if (ctx.run_dir / "tokenizer").is_dir():
        rec["artifacts"]["tokenizer"] = str(ctx.run_dir / "tokenizer")
    rec["model_dir"] = str(model_dir)
    ctx.task_state(task).modules = ctx.rel(model_dir)
    ctx.save_record(task)
    return {"model_dir": str(model_dir)}


STAGES: dict[Stage, Callable[[RunContext, Task], dict[str, Any]]] = {
    Stage.EXPAND: expand,
    Stage.SELECT: select,
    Stage.GENERATE: generate,
    Stage.ADAPT: adapt,
    Stage.EVALUATE: evaluate,
    Stage.RECORD: record,
}


# ------------------------------------------------------------------ helpers


def _stream(ctx: RunContext, examples, *, seed: str) -> BatchStream:
    qa, lm = examples
    return BatchStream(qa, lm, batch_size=ctx.settings.train.batch_size, pad_id=ctx.special.pad, seed=seed,
                       token_weights=ctx.token_weights)


def _special_ids(ctx: RunContext) -> set[int]:
    special = ctx.special
    return {special.ans, special.eos, special.pad, *special.tasks}


def _token_counts(ctx: RunContext, task: Task) -> dict[int, float]:
    return {int(k): v for k, v in read_json(ctx.run_dir / ctx.task_state(task).token_counts).items()}


def finite_or_nan(value) -> float:
    return float("nan") if value is None else float(value)


def matrix(rows: list[list[float | None]]) -> np.ndarray:
    """A state matrix (None: not evaluated) as a float array with NaN."""
    return np.array([[finite_or_nan(v) for v in row] for row in rows], dtype=np.float64)

