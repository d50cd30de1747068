"""Every method through every stage with fake kernels (no DeepSpeed, no Ray), and resume from disk.

The coordinator steps the real stage functions on a tiny model; the kernels
(search, generate, answer, adapt) are fakes that return well-formed results
at once, so what is tested is the lifecycle's bookkeeping: which stage runs
when, what lands in the state and on disk, and that a coordinator built from
the files alone continues the run where it stopped, redoing nothing.
"""

from __future__ import annotations

import dataclasses
import json
import time

import numpy as np
import pytest
import torch
from transformers import GPT2Config, GPT2LMHeadModel

from dmea_dist.config import config_from_dict
from dmea_dist.coordinator import Coordinator
from dmea_dist.data.formatting import Formatter, encode_task
from dmea_dist.data.tokenizer import train_bpe_tokenizer
from dmea_dist.method.adaptation import AdaptResult
from dmea_dist.method.expansion import CandidateResult
from dmea_dist.method.generation import PseudoSamples
from dmea_dist.method.lifecycle import ORDER, Stage
from dmea_dist.modeling.adapters import LayerModule
from dmea_dist.modeling.io import module_key
from dmea_dist.modeling.model import DMEAModel
from dmea_dist.run import Run, build_policy, load_tasks
from dmea_dist.state import StateError, load_state

METHODS = ["dmea", "acm", "adapter", "finetune", "lamol", "multitask"]
TASKS = ["synth.hotel.00", "synth.listops.00", "synth.hotel.01"]


class FakeKernels:
    """Instant kernels: search picks a new module in layer 0, generation returns true rows, answers are right."""

    def __init__(self, run: Run):
        self.run = run
        self.calls: list[str] = []
        self.adapt_jobs = []
        self.search_jobs = []
        self.generate_requests = []
        self.answer_requests = []

    def search(self, model, jobs, data):
        self.calls.append("search")
        self.search_jobs.append(list(jobs))
        earlier = next(iter(model.paths.values()))
        return [self.candidate(model, job, earlier) for job in jobs]

    def candidate(self, model, job, earlier: list[int]) -> CandidateResult:
        new_id = model.next_ids[0]  # what search_candidate would add to layer 0
        state = LayerModule(model.d_model, model.bottleneck).state_dict()
        return CandidateResult(candidate=job.candidate, path=[new_id, *earlier[1:]], new_layers=[0],
                               val_loss=1.0 + job.candidate, logits=job.init, params=job.params,
                               new_modules={module_key(0, new_id, k): v for k, v in state.items()})

    def generate(self, model, requests):
        self.calls.append("generate")
        self.generate_requests += requests
        rows = {t.task_id: t.rows["train"] for t in self.run.tasks}
        return [PseudoSamples(r.task_id, rows=[{"task_id": r.task_id, "context": x["context"], "question": "",
                                                "answer": x["answer"][:1]} for x in rows[r.task_id][: r.n]],
                              malformed=0, generated=r.n, requested=r.n) for r in requests]

    def answer(self, model, requests):
        self.calls.append("answer")
        self.answer_requests += requests
        return [[row["answer"][0] for row in r.rows] for r in requests]

    def adapt(self, model, job, *, checkpoint_dir=None):
        self.calls.append("adapt")
        self.adapt_jobs.append(job)
        if checkpoint_dir is not None:  # what a real adaptation leaves behind: its mid-task checkpoint
            checkpoint_dir.mkdir(parents=True, exist_ok=True)
            (checkpoint_dir / "adapt_progress.json").write_text("{}")
        replay = [key for key, _, _ in job.sources if key.startswith("replay:")]
        return AdaptResult(steps=2, losses={key: [2.0, 1.0] for key, _, _ in job.sources},
                           etas={key: [1.5, 1.0] for key in replay} if job.scale else {},
                           clamp_hits=dict.fromkeys(replay, 0) if job.scale else {})

    def worker_memory(self):
        return {}  # as in process: no workers

    def close(self):
        self.calls.append("close")


class WorkerKernels(FakeKernels):
    """Kernels whose work runs in worker processes that report their peak memory, as `RayKernels` does."""

    def worker_memory(self):
        self.calls.append("worker_memory")
        return {"training": 512.0, "replicas": 300.5}


def test_each_task_records_its_workers_peak_memory(tmp_path):
    """On Ray the model's replicas and the training live in worker processes: a task's RECORD entry holds their
    peak memory beside the coordinator's own (issue 9: peak memory per task); asked once per task."""
    config = _config(tmp_path, "dmea")
    run_dir = tmp_path / "dmea"
    coordinator = Coordinator(config, run_dir, kernels_factory=lambda run, progress: WorkerKernels(run),
                              run=_run(config, run_dir))
    while not coordinator.step()["done"]:
        pass
    history = load_state(run_dir).history
    records = [h for h in history if h["stage"] == "record"]
    assert [h["worker_peak_rss_mib"] for h in records] == [{"training": 512.0, "replicas": 300.5}] * len(TASKS)
    assert all("worker_peak_rss_mib" not in h for h in history if h["stage"] != "record")
    assert all(h["peak_rss_mib"] > 0 for h in history)
    assert coordinator.ctx.kernels.calls.count("worker_memory") == len(TASKS)


def test_in_process_records_no_worker_memory(tmp_path):
    coordinator, _ = _coordinator(tmp_path, "dmea")
    while not coordinator.step()["done"]:
        pass
    assert all("worker_peak_rss_mib" not in h for h in load_state(tmp_path / "dmea").history)


def _config(tmp_path, method, adaptation=None, seed=0):
    return config_from_dict({
        "name": "fake", "output_dir": str(tmp_path / "runs"), "train": {"seed": seed},
        "data": {"tasks": TASKS, "synth_sizes": [12, 4, 4]},
        "model": {"tiny": {"n_layer": 2, "n_embd": 16, "n_head": 2, "n_positions": 96, "vocab_size": 300},
                  "bottleneck": 4, "max_length": 80},
        "method": {"name": method, "selection": {"top_k": 1, "n_samples": 4},
                   "expansion": {"candidates": [{}, {"seed": 1}]}, "adaptation": adaptation or {}},
        "eval": {"max_samples": 3},
        "tracking": {"enabled": False},
    })


def _run(config, run_dir) -> Run:
    """The parts `build_run` would make, without pretraining; saved so that a resume can reopen them."""
    tasks = load_tasks(config)
    texts = [f"{r['context']} {a}" for t in tasks for r in t.rows["train"] for a in r["answer"]]
    tokenizer = train_bpe_tokenizer(texts, vocab_size=300, max_tasks=8)
    torch.manual_seed(0)
    backbone = GPT2LMHeadModel(GPT2Config(vocab_size=len(tokenizer), n_positions=96, n_embd=16, n_layer=2, n_head=2))
    run_dir.mkdir(parents=True, exist_ok=True)
    tokenizer.save_pretrained(run_dir / "tokenizer")
    backbone.save_pretrained(run_dir / "backbone")
    (run_dir / "config.yaml").write_text(json.dumps(config.to_dict()))
    formatter = Formatter(tokenizer, max_length=80)
    for task in tasks:
        task.train = encode_task(formatter, task.rows["train"], task_index=task.index)
        task.val = encode_task(formatter, task.rows["validation"], task_index=task.index)
    return Run(config=config, tasks=tasks, tokenizer=tokenizer, model=DMEAModel(backbone, bottleneck=4),
               formatter=formatter, policy=build_policy(config), run_dir=run_dir)


def _coordinator(tmp_path, method, *, resume=False, run=None, seed=0):
    config = _config(tmp_path, method, seed=seed)
    run_dir = tmp_path / method
    made = []

    def kernels(run, progress):
        made.append(FakeKernels(run))
        return made[-1]

    coordinator = Coordinator(config, run_dir, resume=resume, kernels_factory=kernels,
                              run=run if run is not None or resume else _run(config, run_dir))
    return coordinator, made[0]


@pytest.mark.parametrize("method", METHODS)
def test_every_method_steps_through_every_stage(tmp_path, method):
    started = time.perf_counter()
    coordinator, kernels = _coordinator(tmp_path, method)
    outs = []
    while not coordinator.state.done:
        outs.append(coordinator.step())
    state = coordinator.state
    assert [(h["task_index"], h["stage"]) for h in state.history] == \
        [(i, s.value) for i in range(len(TASKS)) for s in ORDER]
    R = coordinator.results()["R"]
    joint = method == "multitask"
    for j in range(len(TASKS)):  # fake answers are the references: seen entries score 100
        expected = [100.0] * (j + 1) if not joint or j == len(TASKS) - 1 else []
        assert [round(x, 6) for x in R[j, : j + 1] if x == x] == expected
    records = [o["record"] for o in outs if o["record"] is not None]
    assert [r["task_id"] for r in records] == TASKS
    assert (kernels.calls.count("search") > 0) == (method in ("dmea", "acm"))
    assert (kernels.calls.count("adapt")) == (1 if joint else len(TASKS))
    if method in ("dmea", "acm", "lamol"):
        last = kernels.adapt_jobs[-1]
        assert any(key.startswith("replay:") for key, _, _ in last.sources)
    if method == "dmea":
        assert any(key.startswith("transfer:") for key, _, _ in kernels.adapt_jobs[-1].sources) or \
            all(not t.selected for t in state.tasks)
        assert state.tasks[2].basis is None or (tmp_path / method / state.tasks[1].basis).is_file()
    # the state on disk is the state in memory
    again = load_state(tmp_path / method)
    assert again.to_dict() == state.to_dict() and again.done
    assert time.perf_counter() - started < 10


@pytest.mark.parametrize("seed", [0, 1])
def test_search_candidates_are_seeded_by_task_and_candidate(tmp_path, seed):
    """Candidates {} and {seed: 1}: every (task, candidate) starts its new modules from its own draw, none
    from the first task's (train.seed + 0), also under train.seed=1 where the override meets seed + 0."""
    coordinator, kernels = _coordinator(tmp_path, "dmea", seed=seed)
    while not coordinator.state.done:
        coordinator.step()
    seeds = [job.seed for jobs in kernels.search_jobs for job in jobs]
    assert len(kernels.search_jobs) == 2 and len(seeds) == 4
    assert len(set(seeds)) == 4 and seed not in seeds


def test_multitask_counts_its_epochs_over_the_largest_task(tmp_path):
    """Joint training steps `epochs` passes of its anchor stream (one batch of every task a step): the
    anchor must be the largest task, or the larger tasks are seen for a fraction of the epochs."""
    run = _run(_config(tmp_path, "multitask"), tmp_path / "multitask")
    first = run.tasks[0]
    first.train = tuple(examples[:4] for examples in first.train)  # 4 examples: the other two have 12
    coordinator, kernels = _coordinator(tmp_path, "multitask", run=run)
    while not coordinator.state.done:
        coordinator.step()
    (job,) = kernels.adapt_jobs
    sizes = {key: len(qa) for key, (qa, _), _ in job.sources}
    assert job.sources[0][0] == TASKS[1] and sizes[TASKS[1]] == max(sizes.values()) > sizes[TASKS[0]]


def _killed_in_step(coordinator, monkeypatch, module, name: str) -> None:
    """One step killed where it calls `module.name` (a KeyboardInterrupt there), then the coordinator closed."""

    def killed(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(module, name, killed)
    with pytest.raises(KeyboardInterrupt):
        coordinator.step()
    monkeypatch.undo()
    coordinator.close()


def test_an_adaptation_checkpoint_outlives_a_kill_before_the_state_moves_on(tmp_path, monkeypatch):
    """The ADAPT stage's checkpoint goes only once the saved state names the snapshot that supersedes it:
    killed in between, a resume redoes the stage from the checkpoint, not from step 0."""
    import dmea_dist.coordinator as coordinator_module

    coordinator, _ = _coordinator(tmp_path, "dmea")
    checkpoint = coordinator.ctx.task_dir(coordinator.ctx.run.tasks[0]) / "adapt_checkpoint"
    while coordinator.state.stage is not Stage.ADAPT:
        coordinator.step()

    _killed_in_step(coordinator, monkeypatch, coordinator_module, "save_state")
    assert (checkpoint / "adapt_progress.json").is_file()
    resumed, kernels = _coordinator(tmp_path, "dmea", resume=True)  # the state on disk: task 0's ADAPT
    assert resumed.state.stage is Stage.ADAPT
    resumed.step()  # saved this time: now the checkpoint goes
    assert kernels.calls == ["adapt"] and not checkpoint.exists()


def test_a_resume_removes_what_a_kill_after_the_save_left_behind(tmp_path, monkeypatch):
    """Killed after the state names the new snapshot but before the superseded one and the adaptation's
    checkpoint are removed: the resume removes them (a full-fine-tuning snapshot is a whole backbone)."""
    import dmea_dist.coordinator as coordinator_module

    coordinator, _ = _coordinator(tmp_path, "dmea")
    while (coordinator.state.task_index, coordinator.state.stage) != (1, Stage.ADAPT):
        coordinator.step()

    _killed_in_step(coordinator, monkeypatch, coordinator_module.shutil, "rmtree")
    run_dir = tmp_path / "dmea"
    checkpoint = coordinator.ctx.task_dir(coordinator.ctx.run.tasks[1]) / "adapt_checkpoint"
    assert len(list(run_dir.glob("state/modules-*"))) == 2 and checkpoint.exists()
    resumed, _ = _coordinator(tmp_path, "dmea", resume=True)
    assert [p.relative_to(run_dir).as_posix() for p in run_dir.glob("state/modules-*")] == [resumed.state.modules]
    assert not checkpoint.exists()
    while not resumed.state.done:
        resumed.step()


def test_a_stop_mid_stage_marks_the_last_saved_state_not_the_half_done_one(tmp_path, monkeypatch):
    """A second Ctrl-C between the EXPAND snapshot and the state's advance: the state in memory names the
    new snapshot at the old position. mark() must leave state.json at the last finished stage (a resume
    would otherwise expand the expanded pools once more)."""
    coordinator, _ = _coordinator(tmp_path, "dmea")
    while (coordinator.state.task_index, coordinator.state.stage) != (1, Stage.EXPAND):
        coordinator.step()
    before = json.loads((tmp_path / "dmea" / "state.json").read_text())

    def interrupted(summary, *, seconds):
        raise KeyboardInterrupt

    monkeypatch.setattr(coordinator.state, "advance", interrupted)
    with pytest.raises(KeyboardInterrupt):
        coordinator.step()
    assert coordinator.state.modules != before["modules"]  # half way: a new snapshot, the old position
    coordinator.mark("stopped", "stopped by Ctrl-C")
    after = json.loads((tmp_path / "dmea" / "state.json").read_text())
    assert (after["status"], after["message"]) == ("stopped", "stopped by Ctrl-C")
    assert {k: v for k, v in after.items() if k not in ("status", "message")} == \
        {k: v for k, v in before.items() if k not in ("status", "message")}


def test_a_stop_that_comes_while_a_step_runs_is_kept_by_that_steps_save(tmp_path):
    """On Ray `mark` runs beside `step` (the actor takes two calls): the step's own save, after the mark,
    keeps the stop and its reason instead of writing "running" over them."""
    coordinator, kernels = _coordinator(tmp_path, "dmea")
    search = kernels.search

    def search_then_stopped(model, jobs, data):
        coordinator.mark("stopped", "stopped by Ctrl-C")  # arrives while the EXPAND stage runs
        return search(model, jobs, data)

    kernels.search = search_then_stopped
    while coordinator.state.stage is not Stage.EXPAND or coordinator.state.task_index == 0:
        coordinator.step()
    coordinator.step()
    saved = json.loads((tmp_path / "dmea" / "state.json").read_text())
    assert (saved["task_index"], saved["stage"]) != (1, "expand")  # the stage finished and was saved
    assert (saved["status"], saved["message"]) == ("stopped", "stopped by Ctrl-C")


def test_in_process_kernels_without_a_progress_callback_take_what_adapt_reports():
    from dmea_dist.kernels import DecodingSettings, InProcessKernels

    kernels = InProcessKernels(None, engine=None, decoding=DecodingSettings())  # Coordinator(config, run_dir)'s
    kernels.progress("adapt", 1, 2, loss=0.5)  # what adapt's on_step passes on, loss included


@pytest.mark.parametrize("method", ["dmea", "lamol"])
def test_a_coordinator_built_from_the_files_continues_where_the_run_stopped(tmp_path, method):
    first, _ = _coordinator(tmp_path, method)
    while (first.state.task_index, first.state.stage) != (1, Stage.ADAPT):
        first.step()
    before = json.dumps(first.state.to_dict()["history"])
    first.close()
    # a new process would see only the run directory: the state, the snapshots and the task files
    second, kernels = _coordinator(tmp_path, method, resume=True)
    assert json.dumps(second.state.to_dict()["history"]) == before
    if method == "dmea":
        assert second.ctx.run.model.paths == first.ctx.run.model.paths  # modules and paths from the snapshot
    while not second.state.done:
        second.step()
    stages = [(h["task_index"], h["stage"]) for h in second.state.history]
    assert stages == [(i, s.value) for i in range(len(TASKS)) for s in ORDER]  # nothing redone, nothing skipped
    assert kernels.calls.count("adapt") == 2  # tasks 1 and 2 only: task 0's adaptation is not redone
    # the pseudo samples of task 1 were read back from their Parquet files, not from memory
    assert any(key.startswith("replay:") for key, _, _ in kernels.adapt_jobs[0].sources)


@pytest.mark.parametrize(("method", "stopped_at", "refused"), [
    ("dmea", (1, Stage.ADAPT), False), ("dmea", (1, Stage.EVALUATE), True), ("lamol", (1, Stage.EVALUATE), False),
    ("multitask", (2, Stage.EVALUATE), False)])
def test_a_run_started_before_token_row_scopes_resumes_only_where_its_scores_would_not_mix(
        tmp_path, method, stopped_at, refused):
    """A state written before scopes existed (no token_row_scopes) whose earlier tasks were already scored with a
    later task's token rows is refused with what to do; one that stopped before any later task trained rows
    resumes, with scopes from then on. Methods without rows (lamol) and multitask have nothing to mix."""
    first, _ = _coordinator(tmp_path, method)
    while (first.state.task_index, first.state.stage) != stopped_at:
        first.step()
    first.close()
    file = tmp_path / method / "state.json"
    old = json.loads(file.read_text())
    del old["token_row_scopes"]  # as a checkout before scopes wrote it
    file.write_text(json.dumps(old))
    if refused:
        with pytest.raises(StateError, match="checkout that started it"):
            _coordinator(tmp_path, method, resume=True)
        assert json.loads(file.read_text()) == old  # nothing is changed by the refusal
        return
    second, _ = _coordinator(tmp_path, method, resume=True)
    second.step()
    assert load_state(tmp_path / method).token_row_scopes


@pytest.mark.parametrize("method", ["dmea", "lamol"])
def test_every_file_the_run_writes_survives_a_machine_crash(tmp_path, monkeypatch, method):
    """A resume after a power loss reads the state and every file it names (snapshots, records, bases, pseudo
    samples, a task's modules or backbone): each must be fsynced under its final name and its directory after
    the name appeared, or the rename (or the data under it) can be lost while state.json names it."""
    from tests.unit.disk_log import DiskLog

    disk = DiskLog(monkeypatch)
    coordinator, _ = _coordinator(tmp_path, method)
    while not coordinator.state.done:
        coordinator.step()
    run_dir = tmp_path / method
    made_by_the_test = {run_dir / "config.yaml", run_dir / "backbone", run_dir / "tokenizer"}  # `_run`, plainly
    made_before = made_by_the_test | {p for d in made_by_the_test if d.is_dir() for p in d.rglob("*")}
    written = sorted(p for p in run_dir.rglob("*") if p.is_file() and p not in made_before)
    kinds = {p.name for p in written}
    assert {"state.json", "record.json", "token_counts.json"} <= kinds
    if method == "dmea":  # module snapshots and a task's modules, bases, pseudo samples
        assert {"manifest.json", "modules.safetensors", "basis.safetensors"} <= kinds
        assert any(p.suffix == ".parquet" for p in written)
    else:  # the fine-tuned backbone, as snapshot and as a task's model
        assert "model.safetensors" in kinds
    assert [why for p in written if (why := disk.why_not_durable(p))] == []
    folders = {p.parent for p in written} - {run_dir}
    assert [f for f in sorted(folders) if f not in made_before and not disk.directory_synced(f.parent)] == []


@pytest.mark.parametrize("all_tasks", [False, True])
def test_eval_every_k_tasks_scores_only_the_new_task_in_the_rows_between(tmp_path, all_tasks):
    """eval.every 2 of 3 tasks: row 0 scores task 0 alone (R's diagonal: BWT and forgetting; with all_tasks also
    task 1 before its training: FWT), rows 1 and 2 every task. Row 0 was left empty, and with it every run's
    BWT and forgetting, the figures a long run is for."""
    from dmea_dist.driver import sequence_metrics

    config = _config(tmp_path, "adapter")
    config = dataclasses.replace(config, eval=dataclasses.replace(config.eval, every=2, all_tasks=all_tasks))
    run_dir = tmp_path / "every"
    coordinator = Coordinator(config, run_dir, kernels_factory=lambda run, progress: FakeKernels(run),
                              run=_run(config, run_dir))
    while not coordinator.state.done:
        coordinator.step()
    results = coordinator.results()
    R = np.nan_to_num(results["R"], nan=-1.0)
    scored = 100.0
    assert list(R[0]) == [scored, scored if all_tasks else -1.0, -1.0]  # task 1 of 3: not a multiple of 2
    assert list(R[1]) == [scored, scored, scored if all_tasks else -1.0] and list(R[2]) == [scored] * 3
    metrics = sequence_metrics(results["R"], baseline=results.get("baseline"), every=2)
    assert metrics["bwt"] == 0.0 and metrics["forgetting"] == 0.0
    assert ("fwt" in metrics) == all_tasks


class HalfParsedKernels(FakeKernels):
    """Generation that parses only half of what it samples, for one task: that task's yield is 50%."""

    def __init__(self, run, poor: str):
        super().__init__(run)
        self.poor = poor

    def generate(self, model, requests):
        return [dataclasses.replace(o, generated=2 * o.generated, malformed=o.generated) if o.task_id == self.poor
                else o for o in super().generate(model, requests)]


@pytest.mark.parametrize("mode", ["new_path", "gated"])
def test_gated_transfer_leaves_out_a_selected_task_whose_pseudo_samples_mostly_failed(tmp_path, mode):
    config = _config(tmp_path, "dmea", adaptation={"transfer": mode, "min_yield": 0.9})
    run_dir, made = tmp_path / mode, []
    run = _run(config, run_dir)

    def kernels(run, progress):
        made.append(HalfParsedKernels(run, poor=TASKS[0]))
        return made[-1]

    coordinator = Coordinator(config, run_dir, kernels_factory=kernels, run=run)
    while not coordinator.state.done:
        coordinator.step()
    last, ts = made[0].adapt_jobs[-1], coordinator.state.tasks[2]
    assert ts.selected == [TASKS[0]] and TASKS[0] in ts.pseudo  # selected, and its samples were made
    keys = [key for key, _, _ in last.sources]
    assert f"replay:{TASKS[0]}" in keys  # replay is not gated: a poor sample still guards the old modules
    if mode == "gated":
        assert f"transfer:{TASKS[0]}" not in keys and ts.transfer == []
        record = json.loads((run_dir / ts.record).read_text())
        assert any("not transferred" in w for w in record["params"]["warnings"])
    else:
        assert f"transfer:{TASKS[0]}" in keys and ts.transfer == [TASKS[0]]


@pytest.mark.parametrize("split", ["by_use", "all"])
def test_the_replayed_tasks_share_the_replay_budget_whatever_is_selected_besides(tmp_path, split):
    """The last task replays both earlier tasks (the fake search shares every layer but the first) and selects
    one: its replay budget, gamma * N, is split over the two replayed tasks, and the selected one is drawn at
    the transfer budget; under split "all" one budget is split over every task drawn."""
    config = _config(tmp_path, "dmea", adaptation={"gamma": 1.0, "pseudo_split": split})
    run_dir, made = tmp_path / split, []
    run = _run(config, run_dir)

    def kernels(run, progress):
        made.append(FakeKernels(run))
        return made[-1]

    coordinator = Coordinator(config, run_dir, kernels_factory=kernels, run=run)
    while not coordinator.state.done:
        coordinator.step()
    ts, kernels = coordinator.state.tasks[2], made[0]
    budget = len(run.tasks[2].rows["train"])  # gamma 1: N pseudo samples
    assert budget >= 4 and set(ts.selected) < {TASKS[0], TASKS[1]}
    (selected,), (other,) = ts.selected, {TASKS[0], TASKS[1]} - set(ts.selected)
    asked = {r.task_id: r.n for r in kernels.generate_requests[-2:]}
    if split == "by_use":
        assert asked == {selected: budget, other: budget // 2}
    else:
        assert asked == {selected: budget // 2, other: budget // 2}


def test_usable_transfer_takes_the_next_task_in_selection_order_when_a_selected_one_fails_the_gate(tmp_path):
    """transfer=usable: the selected task's samples fail the gate, so the next task in selection's order is
    drawn and transferred in its place (gated transfers nothing here: the test above)."""
    config = _config(tmp_path, "dmea", adaptation={"transfer": "usable", "min_yield": 0.9, "gamma": 1.0})
    run_dir, made = tmp_path / "usable", []

    def kernels(run, progress):
        made.append(HalfParsedKernels(run, poor=TASKS[0]))
        return made[-1]

    coordinator = Coordinator(config, run_dir, kernels_factory=kernels, run=_run(config, run_dir))
    while not coordinator.state.done:
        coordinator.step()
    ts = coordinator.state.tasks[2]
    assert ts.selected == [TASKS[0]]  # selection itself is unchanged
    assert ts.transfer == [TASKS[1]] and TASKS[1] in ts.pseudo  # the stand-in was drawn and passed
    assert f"transfer:{TASKS[1]}" in [key for key, _, _ in made[0].adapt_jobs[-1].sources]
    record = json.loads((run_dir / ts.record).read_text())
    assert record["params"]["transfer"] == [TASKS[1]] and record["params"]["selected"] == [TASKS[0]]
    assert any(TASKS[0] in w and "not transferred" in w for w in record["params"]["warnings"])
    assert f"pseudo.yield.{TASKS[1]}" in record["metrics"]  # the stand-in's draw is recorded like any other
    # the stand-in is replayed too (its share of replay's budget: N / 2) and is drawn again at a selected task's
    # count (transfer's budget over one selected task: N), which its replay then uses as well
    budget = len(coordinator.ctx.run.tasks[2].rows["train"])
    assert [(r.task_id, r.n) for r in made[0].generate_requests[-3:]] == \
        [(TASKS[0], budget), (TASKS[1], budget // 2), (TASKS[1], budget)]
    assert record["metrics"][f"pseudo.requested.{TASKS[1]}"] == budget


def test_usable_transfer_under_random_selection_stands_in_from_the_unselected_tasks(tmp_path):
    """Random selection records no similarities: the stand-in comes from a seeded order of the rest."""
    config = _config(tmp_path, "dmea", adaptation={"transfer": "usable", "min_yield": 0.9})
    config = dataclasses.replace(config, method=dataclasses.replace(
        config.method, selection=dataclasses.replace(config.method.selection, mode="random")))
    run_dir = tmp_path / "random"
    coordinator = Coordinator(config, run_dir, kernels_factory=lambda run, progress: HalfParsedKernels(run, TASKS[0]),
                              run=_run(config, run_dir))
    while not coordinator.state.done:
        coordinator.step()
    ts = coordinator.state.tasks[2]
    assert ts.selected == [TASKS[0]]  # train.seed 0: random selection picks it (and its samples fail the gate)
    assert ts.transfer == [TASKS[1]]


def _read_directly(ctx, task, path, scope) -> list[torch.Tensor]:
    """The new task's per-layer representations along `path` with the rows of `scope` (None: every row),
    collected without the stage."""
    from dmea_dist.data.formatting import collate
    from dmea_dist.method import selection

    n = ctx.settings.selection.n_samples
    return selection.collect_representations(ctx.run.model, [collate(task.train[0][:n], pad_id=ctx.special.pad)],
                                             path=path, n_samples=n, scope=scope)


def _at_select(tmp_path, route: str):
    """A dmea run stopped at the last task's SELECT, its new layer-0 module (its own path's) set to noise."""
    config = _config(tmp_path, "dmea")
    config = dataclasses.replace(config, method=dataclasses.replace(
        config.method, selection=dataclasses.replace(config.method.selection, route=route)))
    run_dir = tmp_path / route
    coordinator = Coordinator(config, run_dir, kernels_factory=lambda run, progress: FakeKernels(run),
                              run=_run(config, run_dir))
    while (coordinator.state.task_index, coordinator.state.stage) != (2, Stage.SELECT):
        coordinator.step()
    ctx = coordinator.ctx
    new_path = ctx.path(TASKS[2])
    assert new_path[0] not in {ctx.path(t)[0] for t in TASKS[:2]}  # the fake search added a module there
    torch.manual_seed(1)
    with torch.no_grad():
        for p in ctx.run.model.get_module(0, new_path[0]).parameters():
            p.copy_(torch.randn_like(p))
    return ctx


@pytest.mark.parametrize("route", ["earlier", "own"])
def test_selection_reads_the_new_tasks_inputs_along_the_route_it_is_set_to(tmp_path, route):
    """`route=earlier` compares each earlier task's basis with the new task's inputs read along that task's
    path, so the new task's own modules cannot move it; `own` reads them along the new path. Reference: the
    representations collected directly, projected onto the stored bases."""
    from dmea_dist import stages
    from dmea_dist.method import selection

    ctx = _at_select(tmp_path, route)
    task = ctx.run.tasks[2]
    sims = stages.select(ctx, task)["similarity"]
    for old in ctx.run.tasks[:2]:
        path = ctx.path(old.task_id if route == "earlier" else task.task_id)
        scope = ctx.scope(old.task_id) if route == "earlier" else None  # None: every row
        reps = _read_directly(ctx, task, path, scope)
        bases = stages._basis(ctx, old)
        reference = np.mean([selection.projection_ratio(b, r) for b, r in zip(bases, reps, strict=True)])
        assert sims[old.task_id] == pytest.approx(reference, abs=1e-6)
    # the noise in the new module moves what `own` reads, not what `earlier` reads
    clean = {}
    for old in ctx.run.tasks[:2]:
        reps = _read_directly(ctx, task, ctx.path(old.task_id), ctx.scope(old.task_id))
        clean[old.task_id] = selection.task_similarity(stages._basis(ctx, old), reps)
    moved = max(abs(sims[t] - clean[t]) for t in clean)
    assert (moved < 1e-6) if route == "earlier" else (moved > 1e-3)


@pytest.mark.parametrize("one_path", [False, True])
def test_selection_along_an_earlier_path_sees_only_the_token_rows_that_earlier_task_was_read_with(tmp_path, one_path):
    """A basis is read when its task ends, with the rows of the tasks up to it; `route=earlier` reads the new
    task's inputs in that same network, so a later task's rows (here task 1's, over tokens of the new task's
    inputs, set to noise) move task 1's similarity, not task 0's, also where task 1 reused task 0's whole path.
    Reference: the representations collected directly in each task's scope, projected onto the stored bases."""
    from dmea_dist import stages
    from dmea_dist.method import selection

    ctx = _at_select(tmp_path, "earlier")
    task, model, n = ctx.run.tasks[2], ctx.run.model, ctx.settings.selection.n_samples
    owned = set(model.token_rows.ids_of(TASKS[0]))
    inputs = sorted({int(t) for ex in task.train[0][:n] for t in ex.input_ids} - owned)
    assert inputs  # the new task's inputs hold tokens task 0 does not own
    torch.manual_seed(2)
    model.put_token_rows(TASKS[1], torch.tensor(inputs), 3 * torch.randn(len(inputs), model.d_model))
    if one_path:
        model.set_path(TASKS[1], ctx.path(TASKS[0]))
    sims = stages.select(ctx, task)["similarity"]

    def reference(old, scope):
        reps = _read_directly(ctx, task, ctx.path(old.task_id), scope)
        return selection.task_similarity(stages._basis(ctx, old), reps)

    for old in ctx.run.tasks[:2]:
        assert sims[old.task_id] == pytest.approx(reference(old, TASKS[: old.index + 1]), abs=1e-6)
    assert abs(reference(ctx.run.tasks[0], None) - sims[TASKS[0]]) > 1e-3  # every row would have moved it


class PartlyRightKernels(FakeKernels):
    """Answers that realise the first k test inputs of every task at the k-th evaluation, and nothing else."""

    def answer(self, model, requests):
        self.calls.append("answer")
        k = self.calls.count("answer")
        firsts = {row["context"] for t in self.run.tasks for row in t.rows["test"][:k]}
        return [[row["answer"][0] if row["context"] in firsts else "" for row in r.rows] for r in requests]


def test_pseudo_fidelity_is_read_against_the_generating_models_fidelity_on_real_inputs(tmp_path):
    config = _config(tmp_path, "dmea")  # eval.max_samples 3: evaluation k realises k of 3 inputs per task
    run_dir = tmp_path / "real"
    coordinator = Coordinator(config, run_dir, kernels_factory=lambda run, progress: PartlyRightKernels(run),
                              run=_run(config, run_dir))
    while not coordinator.state.done:
        coordinator.step()
    records = [json.loads((run_dir / ts.record).read_text())["metrics"] for ts in coordinator.state.tasks]
    assert [records[j][f"fidelity.{TASKS[0]}"] for j in range(3)] == pytest.approx([1 / 3, 2 / 3, 1.0])
    assert records[2][f"fidelity.{TASKS[1]}"] == pytest.approx(1.0)
    # task j's pseudo samples were written by the model evaluated after task j-1
    assert records[1][f"pseudo.real_fidelity.{TASKS[0]}"] == pytest.approx(1 / 3)
    assert records[2][f"pseudo.real_fidelity.{TASKS[0]}"] == pytest.approx(2 / 3)
    assert records[2][f"pseudo.real_fidelity.{TASKS[1]}"] == pytest.approx(2 / 3)
    assert f"pseudo.real_fidelity.{TASKS[0]}" not in records[0]


def _token_vector(examples, special, vocab: int) -> np.ndarray:
    """Reference for the stage's token similarity: a dense count vector of the examples' ids, specials out."""
    ids = np.array([i for ex in examples for i in ex.input_ids if i not in special], dtype=np.int64)
    return np.bincount(ids, minlength=vocab).astype(np.float64)


@pytest.mark.parametrize("method", ["dmea", "acm"])
def test_the_search_starts_from_each_old_modules_token_similarity(tmp_path, method):
    """The search job's initial logits, computed independently: per layer, beta times the highest token
    cosine (special tokens left out) of the earlier tasks that use each module, the new module at -beta
    times the best; ACM starts every old module at +mix_ini and the new one at -mix_ini."""
    coordinator, kernels = _coordinator(tmp_path, method)
    while not coordinator.state.done:
        coordinator.step()
    run, state = coordinator.ctx.run, coordinator.state
    special = {run.formatter.special.ans, run.formatter.special.eos, run.formatter.special.pad,
               *run.formatter.special.tasks}
    vectors = [_token_vector(t.train[0], special, len(run.tokenizer)) for t in run.tasks]
    cos = lambda a, b: float(a @ b / np.linalg.norm(a) / np.linalg.norm(b))  # noqa: E731
    exp = run.config.method.expansion
    new, earlier = 2, [0, 1]  # the last task's search: hotel.01 after hotel.00 and listops.00
    sims = {j: cos(vectors[new], vectors[j]) for j in earlier}
    assert sims[0] > sims[1] + 0.1  # hotel.01 reads like hotel.00, not like listops.00
    for job in kernels.search_jobs[-1]:
        for layer, logits in enumerate(job.init):
            ids = sorted({state.tasks[j].path[layer] for j in earlier})
            if method == "acm":
                assert logits == pytest.approx([exp.mix_ini] * len(ids) + [-exp.mix_ini])
                continue
            score = {m: max(sims[j] for j in earlier if state.tasks[j].path[layer] == m) for m in ids}
            beta = job.params["beta"]
            assert logits == pytest.approx([beta * score[m] for m in ids] + [-beta * max(score.values())], rel=1e-6)
    if method == "dmea":  # layer 0 holds both tasks' modules: hotel.00's starts ahead of listops.00's
        layer0 = dict(zip(sorted({state.tasks[j].path[0] for j in earlier}), kernels.search_jobs[-1][0].init[0][:-1],
                          strict=True))
        assert layer0[state.tasks[0].path[0]] > layer0[state.tasks[1].path[0]]


@pytest.mark.parametrize("method", ["dmea", "acm", "lamol"])
def test_every_stream_of_an_adaptation_runs_along_the_path_it_should(tmp_path, method):
    """The new task and what transfers into it along the new path, each replayed task along its own path,
    its LM examples led by its own generation token; only DMEA scales the replay streams."""
    coordinator, kernels = _coordinator(tmp_path, method)
    while not coordinator.state.done:
        coordinator.step()
    run, state = coordinator.ctx.run, coordinator.state
    index = {t.task_id: t.index for t in run.tasks}
    for job in kernels.adapt_jobs:
        assert job.scale == (method == "dmea")
    last = kernels.adapt_jobs[-1]
    new_path = None if method == "lamol" else state.tasks[2].path
    kinds = {key.split(":")[0] for key, _, _ in last.sources}
    assert "replay" in kinds and ("transfer" in kinds) == (method == "dmea")
    for key, (_qa, lm), path in last.sources:
        kind, _, old = key.partition(":")
        if kind in ("new", "transfer"):
            assert path == new_path, key
        else:
            assert path == (None if method == "lamol" else state.tasks[index[old]].path), key
            assert path != new_path or method == "lamol"  # FakeKernels' new paths differ from the old ones
        task_index = 2 if kind == "new" else index[old]
        assert {ex.input_ids[0] for ex in lm} == {run.formatter.special.tasks[task_index]}, key  # LM examples


@pytest.mark.parametrize("method", METHODS)
def test_an_earlier_task_is_generated_replayed_and_evaluated_in_the_scope_of_the_tasks_up_to_it(tmp_path, method):
    """A later task's trained token rows would compete in an earlier task's softmax (the tied head scores them
    whatever the path): each earlier task's pseudo samples, replay stream and test rows see only the rows of
    the tasks up to it; the new task and transfer into it see every row. Methods without rows, and multitask
    (one training claims every task's rows), scope nothing."""
    coordinator, kernels = _coordinator(tmp_path, method)
    while not coordinator.state.done:
        coordinator.step()
    run = coordinator.ctx.run
    scoped = run.config.trains_token_rows and method != "multitask"
    assert scoped == (method in ("dmea", "acm", "adapter"))  # model.token_rows=auto: words for module methods
    up_to = {t.task_id: tuple(TASKS[: t.index + 1]) if scoped else None for t in run.tasks}
    assert bool(kernels.generate_requests) == (method in ("dmea", "acm", "lamol"))  # the methods that replay
    for request in kernels.generate_requests:
        assert request.scope == up_to[request.task_id]
    for job in kernels.adapt_jobs:
        assert job.scopes == {key: up_to[key.split(":", 1)[1]] for key, _, _ in job.sources
                              if scoped and key.startswith("replay:")}
    assert any(job.scopes for job in kernels.adapt_jobs) == (scoped and method != "adapter")  # adapter: no replay
    shown = [t.rows["test"][:3] for t in run.tasks]  # eval.max_samples=3
    evaluations = [r for r in kernels.answer_requests if r.task_id == "*"]
    assert len(evaluations) == (1 if method == "multitask" else len(TASKS))
    for request in evaluations:
        expected = [up_to[t.task_id] for t in run.tasks for _ in shown[t.index]][: len(request.rows)]
        assert request.scopes == (expected if scoped else None)


class SecondCandidateWinsKernels(FakeKernels):
    """Search where candidate 1 wins with a path and module weights of its own (layer 1 new, weights 0.5)."""

    def candidate(self, model, job, earlier: list[int]) -> CandidateResult:
        layer = 0 if job.candidate == 0 else 1
        new_id = model.next_ids[layer]
        state = {k: torch.full_like(v, 0.5 if job.candidate else -0.5)
                 for k, v in LayerModule(model.d_model, model.bottleneck).state_dict().items()}
        path = list(earlier)
        path[layer] = new_id
        return CandidateResult(candidate=job.candidate, path=path, new_layers=[layer], val_loss=2.0 - job.candidate,
                               logits=job.init, params=job.params,
                               new_modules={module_key(layer, new_id, k): v for k, v in state.items()})


def test_the_search_installs_the_lowest_loss_candidate_with_its_own_modules(tmp_path):
    config = _config(tmp_path, "dmea")
    run_dir = tmp_path / "winner"
    coordinator = Coordinator(config, run_dir, kernels_factory=lambda run, progress: SecondCandidateWinsKernels(run),
                              run=_run(config, run_dir))
    while not coordinator.state.tasks[1].path:  # up to task 1's EXPAND
        coordinator.step()
    model, first = coordinator.ctx.run.model, coordinator.state.tasks[0].path
    path = model.path_of(TASKS[1])
    assert path[0] == first[0] and path[1] != first[1] and path[2:] == first[2:]  # candidate 1's: layer 1 new
    for value in model.get_module(1, path[1]).state_dict().values():
        assert torch.equal(value, torch.full_like(value, 0.5))  # its own weights, not fresh or candidate 0's
    record = json.loads((run_dir / coordinator.state.tasks[1].record).read_text())
    assert [c["winner"] for c in record["params"]["candidates"]] == [False, True]


def test_a_generation_redone_after_a_kill_before_the_state_moved_on_records_its_warnings_once(tmp_path,
                                                                                           monkeypatch):
    """GENERATE writes the task's record.json, then the state moves on: killed in between, a resume redoes the
    stage on the record file the killed attempt wrote, and must not add the same warnings to it again."""
    import dmea_dist.coordinator as coordinator_module

    config = _config(tmp_path, "dmea", adaptation={"transfer": "gated", "min_yield": 0.9})
    run_dir = tmp_path / "killed"

    def kernels(run, progress):
        return HalfParsedKernels(run, poor=TASKS[0])

    coordinator = Coordinator(config, run_dir, kernels_factory=kernels, run=_run(config, run_dir))
    while (coordinator.state.task_index, coordinator.state.stage) != (1, Stage.GENERATE):
        coordinator.step()

    _killed_in_step(coordinator, monkeypatch, coordinator_module, "save_state")
    resumed = Coordinator(config, run_dir, resume=True, kernels_factory=kernels)
    assert (resumed.state.task_index, resumed.state.stage) == (1, Stage.GENERATE)
    resumed.step()
    warnings = json.loads((run_dir / resumed.state.tasks[1].record).read_text())["params"]["warnings"]
    assert warnings and len(warnings) == len(set(warnings)), warnings


class SettingsKeepingKernels(FakeKernels):
    """FakeKernels that also keep what every search was given."""

    def __init__(self, run):
        super().__init__(run)
        self.search_data = []

    def search(self, model, jobs, data):
        self.search_data.append(data)
        return super().search(model, jobs, data)


@pytest.mark.parametrize("mixing", ["alternate", "all"])
def test_the_configured_training_settings_reach_the_search_and_the_adaptation(tmp_path, mixing):
    """What the config says the search and adaptation train with is what the kernels get: the answer
    separator's loss weight (in the losses and in the global batches' normalisers), ACM's static start
    +-mix_ini, the coefficients' warm-up, and the adaptation's stream mixing (both choices). Values other
    than the defaults, so a stage that drops a setting (and the kernel falls back to its own default) is
    seen; and each search shuffles its task's data with a seed of its own."""
    config = _config(tmp_path, "acm")
    config = dataclasses.replace(
        config, train=dataclasses.replace(config.train, separator_weight=3.0),
        method=dataclasses.replace(config.method,
                                   expansion=dataclasses.replace(config.method.expansion, mix_ini=0.4,
                                                                 warmup_epochs=1.5, epochs=4.0),
                                   adaptation=dataclasses.replace(config.method.adaptation, mixing=mixing)))
    run_dir = tmp_path / f"settings-{mixing}"
    made = []

    def kernels(run, progress):
        made.append(SettingsKeepingKernels(run))
        return made[-1]

    coordinator = Coordinator(config, run_dir, kernels_factory=kernels, run=_run(config, run_dir))
    while not coordinator.state.done:
        coordinator.step()
    (k,) = made
    weights = {coordinator.ctx.special.ans: 3.0}
    assert k.search_data and k.adapt_jobs
    for data in k.search_data:
        assert data.token_weights == weights and data.train.token_weights == weights
        assert data.warmup_epochs == 1.5 and data.epochs == 4.0
    # every task's search walks its data in an order of its own
    assert len({data.train.seed for data in k.search_data}) == len(k.search_data) == 2
    for jobs in k.search_jobs:
        for job in jobs:  # acm: every old module at +mix_ini, the new one at -mix_ini
            assert all(logits == pytest.approx([0.4] * (len(logits) - 1) + [-0.4]) for logits in job.init)
    for job in k.adapt_jobs:
        assert job.token_weights == weights and job.mixing == mixing


class ShortKernels(FakeKernels):
    """Generation that keeps fewer samples than asked (every third dropped as malformed, every other answer
    of those kept emptied: unfaithful), and an adaptation whose replay eta sat at the clamp in 1 of 4 steps."""

    def generate(self, model, requests):
        outs = []
        for out in super().generate(model, requests):
            rows = [dict(r, answer=[""]) if i % 2 else r for i, r in enumerate(out.rows[: 2 * len(out.rows) // 3])]
            outs.append(dataclasses.replace(out, rows=rows, malformed=out.generated - len(rows)))
        return outs

    def adapt(self, model, job, *, checkpoint_dir=None):
        result = super().adapt(model, job, checkpoint_dir=checkpoint_dir)
        replay = [key for key, _, _ in job.sources if key.startswith("replay:")]
        if job.scale:
            result.etas = {key: [10.0, 3.0, 2.0, 1.0] for key in replay}
            result.clamp_hits = {key: 1 for key in replay}
        return result


def test_the_task_record_holds_what_generation_and_adaptation_measured(tmp_path):
    """Per replayed or transferred task: requested (replay's gamma * N split over the replayed tasks, a selected
    task at least transfer's, gamma * N split over the selected), generated, well formed, kept, yield and
    fidelity (the share of kept answers that realise their own input); the clamp rate; and a
    warning for a task replayed with fewer samples than it asked for."""
    import math

    config = _config(tmp_path, "dmea", adaptation={"transfer": "new_path", "gamma": 1.0})
    run_dir = tmp_path / "short"
    coordinator = Coordinator(config, run_dir, kernels_factory=lambda run, progress: ShortKernels(run),
                              run=_run(config, run_dir))
    while not coordinator.state.done:
        coordinator.step()
    ts = coordinator.state.tasks[2]
    record = json.loads((run_dir / ts.record).read_text())
    m, n_train, gamma = record["metrics"], 12, config.method.adaptation.gamma
    drawn = sorted(ts.pseudo)
    assert drawn == sorted(TASKS[:2])  # both earlier tasks: hotel.00 replayed and selected, listops.00 replayed
    budget = math.ceil(gamma * n_train)
    # both replayed (replay's budget over two); TASKS[0] also selected (transfer's over one), at the larger count
    shares = {TASKS[0]: budget, TASKS[1]: budget // 2}
    assert ts.selected == [TASKS[0]]
    for t in drawn:
        asked = shares[t]
        kept = 2 * asked // 3
        assert m[f"pseudo.requested.{t}"] == asked and m[f"pseudo.generated.{t}"] == asked
        assert m[f"pseudo.well_formed.{t}"] == kept and m[f"pseudo.kept.{t}"] == kept
        assert m[f"pseudo.yield.{t}"] == pytest.approx(kept / asked)
        assert m[f"pseudo.fidelity.{t}"] == pytest.approx(math.ceil(kept / 2) / kept)
        assert any(f"pseudo samples of {t}" in w and f"{kept} of {asked} requested" in w
                   for w in record["params"]["warnings"])
    assert m[f"pseudo.requested.{TASKS[1]}"] * len(drawn) <= budget  # the replay-only task: its share of replay's
    assert m["eta_clamp_rate"] == pytest.approx(0.25)


class UntrainedKernels(FakeKernels):
    """Answers nothing before the first adaptation (the untrained backbone), every answer right after it."""

    def answer(self, model, requests):
        if "adapt" not in self.calls:
            self.calls.append("answer")
            return [[""] * len(r.rows) for r in requests]
        return super().answer(model, requests)


def test_eval_all_tasks_scores_the_untrained_model_and_every_unseen_task_for_forward_transfer(tmp_path):
    """eval.all_tasks: every task is scored before any training (FWT's baseline b_i) and after every task,
    seen or not; FWT = mean_i R[i-1][i] - b_i, here 100 - 0."""
    from dmea_dist.driver import sequence_metrics

    config = _config(tmp_path, "adapter")
    config = dataclasses.replace(config, eval=dataclasses.replace(config.eval, all_tasks=True))
    run_dir = tmp_path / "fwt"
    coordinator = Coordinator(config, run_dir, kernels_factory=lambda run, progress: UntrainedKernels(run),
                              run=_run(config, run_dir))
    while not coordinator.state.done:
        coordinator.step()
    results = coordinator.results()
    assert list(results["baseline"]) == [0.0, 0.0, 0.0]
    assert not np.isnan(results["R"]).any()  # unseen tasks too (along the newest path)
    assert sequence_metrics(results["R"], baseline=results["baseline"])["fwt"] == pytest.approx(100.0)
