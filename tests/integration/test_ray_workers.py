"""The Ray kernels (RayKernels) against the in-process kernels, on a real embedded Ray.

One tiny run (2-layer GPT-2, two synthetic tasks of different families) is
built in tmp; task 0 gets a path whose modules are trained a little with
plain PyTorch (so generations and answers are not all garbage), and the
EXPAND stage of task 1 is run with a capturing search kernel, so the search
jobs are exactly the ones the stage builds. Then:

* the distributed search (2 search actors, 3 candidates: one runs on a
  replica that ran another first) gives the in-process paths, losses, logits
  and new-module weights, also for a model carrying an unpicklable attribute
  (as after DeepSpeed), and a second search on the same actors repeats them;
* one generation actor gives exactly the in-process pseudo samples, and
  answers;
* two actors: pseudo samples equal the in-process generation of the planned
  ranges (part seeds derived), cover n, and repeat exactly; greedy answers
  equal the in-process ones; top-k answers repeat exactly;
* warm_up starts the generation actor and a search actor before any call,
  and the first calls use them;
* with `shared_replicas` one pool's actors run the candidates and the
  pseudo samples, each as in process;
* after the coordinator's model changes (new module, new path, perturbed
  module and backbone weights, then a module dropped again) the pool's next
  call matches the in-process kernels on the changed model;
* a pool whose actors' constructor raises fails its first call with that
  error, without rebuilding; a call whose actor dies right after it returned
  keeps its results, and the next call rebuilds the pool.

Test order matters on 2 CPUs: the 2-actor pool (module fixture, 2 CPUs) is
created after the search and the 1-actor tests have released their CPUs.
"""

from __future__ import annotations

import copy
import dataclasses
import threading
from types import SimpleNamespace

import pytest
import ray  # a hard dependency: a broken install fails here, it does not skip
import torch

from dmea_dist import stages
from dmea_dist.config import config_from_dict
from dmea_dist.coordinator import decoding_settings, engine_settings, in_process_kernels
from dmea_dist.distributed.generation_pool import GenerationWorker, plan_shards
from dmea_dist.distributed.kernels import RayKernels
from dmea_dist.kernels import AnswerRequest, GenerateRequest, run_search_job
from dmea_dist.method import expansion
from dmea_dist.method.generation import generate_answers
from dmea_dist.method.training import make_optimizer, task_loss
from dmea_dist.run import build_run, torch_threads
from dmea_dist.state import RunState

pytestmark = pytest.mark.integration

TASKS = ["synth.restaurant.00", "synth.listops.00"]


def tiny_config(root, *, pretrain_steps: int = 300):
    """A tiny run: 2 layers x 32, two tasks of different families, 2 search candidates."""
    return config_from_dict({
        "name": "tiny", "output_dir": str(root),
        "data": {"tasks": TASKS, "synth_sizes": [24, 8, 8], "overlength": "truncate"},  # 6 rows pass max_length=80
        "model": {"tiny": {"n_layer": 2, "n_embd": 32, "n_head": 2, "n_positions": 96, "vocab_size": 400,
                           "pretrain": {"steps": pretrain_steps, "batch_size": 16, "seq_len": 64,
                                        "heldout_tasks": 1}},
                  "max_length": 80, "bottleneck": 32},
        "train": {"batch_size": 8, "lr": 3e-3},
        "method": {"expansion": {"epochs": 3, "warmup_epochs": 1, "coefficient_lr": 0.5,
                                 "candidates": [{"beta": 1.0}, {"beta": 2.0, "seed": 1}]}},
        "eval": {"max_new_tokens": 12, "batch_size": 4},
        "tracking": {"enabled": False},
    })


class Capture:
    """The in-process kernels, remembering the search's model, jobs and data."""

    def __init__(self, kernels):
        self.kernels, self.captured = kernels, {}

    def search(self, model, jobs, data):
        self.captured.update(model=copy.deepcopy(model), jobs=list(jobs), data=data)
        return self.kernels.search(model, jobs, data)

    def __getattr__(self, name):
        return getattr(self.kernels, name)


def prepare(root, *, pretrain_steps: int = 300, train_steps: int = 150) -> SimpleNamespace:
    """Build the run, give task 0 a (briefly trained) path, capture task 1's search arguments."""
    config = tiny_config(root, pretrain_steps=pretrain_steps)
    run = build_run(config, run_dir=root / "tiny")
    kernels = Capture(in_process_kernels(run))
    ctx = stages.RunContext(run=run, state=RunState.new(TASKS), kernels=kernels,
                            settings=stages.StageSettings.from_config(config))
    stages.expand(ctx, run.tasks[0])
    model, path = run.model, run.model.path_of(TASKS[0])
    model.set_trainable(path)
    optimizer = make_optimizer(model.trainable_parameters(path), lr=1e-2, weight_decay=0.0, eps=1e-6)
    stream = stages._stream(ctx, run.tasks[0].train, seed="0")
    model.train()
    for step in range(train_steps):
        qa, lm = stream.batch(step)
        loss = task_loss(model, qa, lm, path=path, lm_lambda=1.0)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    model.set_trainable(None)
    stages.expand(ctx, run.tasks[1])  # in-process search; records the jobs the stage builds
    return SimpleNamespace(run=run, reference=kernels.kernels, **kernels.captured)


def ray_kernels(run, tmp, **sizes) -> RayKernels:
    """The run's Ray kernels with `sizes` in place of its `ray:` section."""
    return RayKernels(tokenizer=run.tokenizer, max_length=run.formatter.max_length, engine=engine_settings(run.config),
                      decoding=decoding_settings(run.config), sizes=dataclasses.replace(run.config.ray, **sizes),
                      storage_path=tmp)


@pytest.fixture(scope="module")
def ray_local():
    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield
    ray.shutdown()


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    with torch_threads(1):  # the reference runs on one core, as each Ray worker does
        yield prepare(tmp_path_factory.mktemp("ray_workers"))


@pytest.fixture(scope="module")
def kernels2(ray_local, env, tmp_path_factory):
    kernels = ray_kernels(env.run, tmp_path_factory.mktemp("train"), num_generation_actors=2, generation_cpus=1)
    yield kernels
    kernels.close()


def pseudo_requests(run, *, n=6, seed=3):
    return [GenerateRequest(task_id=t.task_id, task_index=t.index, path=run.model.path_of(t.task_id),
                            n=n - 3 * t.index, seed=seed) for t in run.tasks]


def answer_requests(model, run):
    return [AnswerRequest(task_id=t.task_id, rows=t.rows["test"], path=model.path_of(t.task_id)) for t in run.tasks]


def in_process_pseudo(env, model, req):
    return env.reference.generate(model, [req])[0]


# ------------------------------------------------------------------------------ plan (pure)


def test_plan_groups_fixed_pieces_and_balances():
    sizes = [10, 3, 0, 7]
    shards = plan_shards(sizes, n_actors=3, chunk=4)
    for request, size in enumerate(sizes):
        mine = [s for s in shards if s.request == request]
        assert mine[0].start == 0 and mine[-1].stop == size and mine[0].first == 0
        assert all(a.stop == b.start and a.last == b.first for a, b in zip(mine, mine[1:], strict=False))
        assert all(s.start == 4 * s.first for s in mine)  # runs of whole pieces
    assert [len([s for s in shards if s.request == r]) for r in range(4)] == [3, 1, 1, 2]
    loads = [sum(s.size for s in shards if s.actor == a) for a in range(3)]
    assert max(loads) - min(loads) <= 4  # greedy balance within one piece
    # one actor: every request whole
    assert [(s.start, s.stop, s.actor) for s in plan_shards(sizes, n_actors=1, chunk=4)] == \
        [(0, 10, 0), (0, 3, 0), (0, 0, 0), (0, 7, 0)]


# ---------------------------------------------------------------------------------- search


def test_search_matches_in_process(ray_local, env):
    jobs = [*env.jobs, dataclasses.replace(env.jobs[0], candidate=2, seed=5, params={"beta": 1.0, "seed": 5})]
    kernels = ray_kernels(env.run, env.run.run_dir / "_ray_train", num_search_workers=2, search_cpus=1)
    dirty = copy.deepcopy(env.model)
    dirty.engine_handle = threading.Lock()  # like what DeepSpeed leaves on a model: it does not pickle
    try:
        distributed = kernels.search(dirty, jobs, env.data)  # job 2 runs on the replica job 0 ran on
        again = kernels.search(dirty, jobs[1:], env.data)  # each actor has run candidates: put back each time
    finally:
        kernels.close()  # the search actors hold both CPUs until then
    reference = [run_search_job(copy.deepcopy(env.model), job, env.data) for job in jobs]
    assert len(kernels.placement.search) >= 1
    for got, first in zip(again, distributed[1:], strict=True):
        assert (got.path, got.new_layers, got.val_loss, got.logits) == (first.path, first.new_layers,
                                                                         first.val_loss, first.logits)
    assert any(r.new_layers for r in reference), "the check needs a candidate that keeps new modules"
    for got, want in zip(distributed, reference, strict=True):
        assert (got.candidate, got.path, got.new_layers, got.params) == (want.candidate, want.path,
                                                                          want.new_layers, want.params)
        assert got.val_loss == pytest.approx(want.val_loss, abs=1e-6)
        torch.testing.assert_close(torch.tensor(got.logits), torch.tensor(want.logits), rtol=0, atol=1e-6)
        assert got.new_modules.keys() == want.new_modules.keys()
        for key, value in want.new_modules.items():
            torch.testing.assert_close(got.new_modules[key], value, rtol=0, atol=1e-6)
    assert expansion.pick_best(distributed).candidate == expansion.pick_best(reference).candidate


# ------------------------------------------------------------------------------ generation


def test_one_actor_equals_in_process(ray_local, env):
    run = env.run
    kernels = ray_kernels(run, run.run_dir / "_ray_train", num_generation_actors=1)
    requests = pseudo_requests(run)
    got = kernels.generate(run.model, requests)
    want = env.reference.generate(run.model, requests)
    assert got == want
    assert want[0].rows, "the check needs some well-formed samples"
    assert kernels.answer(run.model, answer_requests(run.model, run)) == \
        env.reference.answer(run.model, answer_requests(run.model, run))
    kernels.close()
    assert not kernels.pool.started


def test_warm_up_starts_the_workers_before_their_first_call(ray_local, env):
    """ray.warm_up: the generation and search actors start at once, without a call; the first calls use them
    and compute what the in-process kernels compute."""
    run = env.run
    kernels = ray_kernels(run, run.run_dir / "_ray_train", num_generation_actors=1, generation_cpus=1,
                          num_search_workers=1, search_cpus=1, adapt_on="coordinator")
    try:
        assert not kernels.pool.started and not kernels.search_pool.started
        kernels.warm_up(run.model)
        assert kernels.pool.started and kernels.search_pool.started
        actors, searchers = list(kernels.pool.actors), list(kernels.search_pool.actors)
        assert ray.get([a.node_id.remote() for a in searchers], timeout=120)  # up, replica built
        requests = pseudo_requests(run)
        assert kernels.generate(run.model, requests) == env.reference.generate(run.model, requests)
        assert kernels.pool.actors == actors  # the warmed actors did the work
        (got,) = kernels.search(env.model, env.jobs[:1], env.data)
        assert kernels.search_pool.actors == searchers
        want = run_search_job(copy.deepcopy(env.model), env.jobs[0], env.data)
        assert got.path == want.path and got.val_loss == pytest.approx(want.val_loss, abs=1e-6)
    finally:
        kernels.close()


def test_shared_replicas_search_and_generate_on_one_pool(ray_local, env):
    """ray.shared_replicas: one pool of max(search, generation) actors runs candidates and pseudo samples, and
    each computes what the in-process kernels compute (candidates between the calls leave the replicas as
    synced)."""
    run = env.run
    kernels = ray_kernels(run, run.run_dir / "_ray_train", num_generation_actors=1, generation_cpus=1,
                          num_search_workers=2, search_cpus=1, shared_replicas=True, adapt_on="coordinator")
    try:
        assert kernels.pool is kernels.search_pool and kernels.pool.num_actors == 2
        requests = pseudo_requests(run)
        want = env.reference.generate(run.model, requests)
        assert kernels.generate(run.model, requests) == want
        actors = list(kernels.pool.actors)
        got = kernels.search(env.model, env.jobs, env.data)
        assert kernels.generate(run.model, requests) == want
        assert kernels.pool.actors == actors  # the replicas that generated ran the candidates
        groups = [pg for pg in ray.util.placement_group_table().values() if pg["state"] == "CREATED"]
        assert len(groups) == 1  # one pool's reservation, not a search pool beside a generation pool
        for result, job in zip(got, env.jobs, strict=True):
            reference = run_search_job(copy.deepcopy(env.model), job, env.data)
            assert (result.path, result.new_layers) == (reference.path, reference.new_layers)
            assert result.val_loss == pytest.approx(reference.val_loss, abs=1e-6)
    finally:
        kernels.close()


class _UnbuildableWorker(GenerationWorker):
    """A generation actor whose constructor raises, as on a bad snapshot or a missing file."""

    def __init__(self, *args, **kwargs):
        raise FileNotFoundError("no such file: /nowhere/tokenizer.json")


def test_a_pool_whose_actors_fail_to_construct_raises_their_error_at_once(ray_local, env, monkeypatch):
    """Ray raises ActorDiedError (actor_init_failed) for the calls of an actor whose __init__ raised, and
    restarts it never (max_restarts or not). The pool took that for a death, and reserved and built its
    replicas again before the same error came out; now the first one comes out, with the constructor's message."""
    from dmea_dist.distributed import generation_pool

    reservations = []
    reserve = generation_pool.reserve
    monkeypatch.setattr(generation_pool, "reserve", lambda *a, **k: reservations.append(k) or reserve(*a, **k))
    run = env.run
    pool = generation_pool.GenerationPool(tokenizer=run.tokenizer, max_length=run.formatter.max_length,
                                          decoding=decoding_settings(run.config), num_actors=1, retries=2)
    pool.worker_class = _UnbuildableWorker
    try:
        with pytest.raises(ray.exceptions.ActorDiedError, match="no such file: /nowhere/tokenizer.json") as raised:
            pool.generate(run.model, pseudo_requests(run))
    finally:
        pool.shutdown()
    assert raised.value.actor_init_failed
    assert len(reservations) == 1 and pool.restarts == 0  # built once, not again per retry


def test_pool_size_does_not_change_pseudo_samples(kernels2, env):
    """Pieces are seeded by what they are (call, piece), not by which actor runs them."""
    run = env.run
    requests = pseudo_requests(run, n=10)  # 10 + 7 samples end to end, pieces of eval.batch_size=4
    got = kernels2.generate(run.model, requests)
    shards = plan_shards([sum(r.n for r in requests)], n_actors=2, chunk=4)
    assert {s.actor for s in shards if s.start < requests[0].n} == {0, 1}  # task 0 is split over both actors
    assert any(s.start < requests[0].n < s.stop for s in shards)  # and one run mixes both tasks
    want = env.reference.generate(run.model, requests)  # in process: every piece in one process
    assert got == want
    assert got[0].rows and all(len(g.rows) <= r.n for g, r in zip(got, requests, strict=True))
    assert kernels2.generate(run.model, requests) == got  # deterministic across calls


def test_two_actors_answers(kernels2, env):
    run = env.run
    requests = answer_requests(run.model, run)
    assert all(len(r.rows) > run.config.eval.batch_size for r in requests)  # so each request is split
    want = env.reference.answer(run.model, requests)
    assert kernels2.answer(run.model, requests) == want
    pool = kernels2.pool
    sampling = dataclasses.replace(pool.decoding, decoding="top_k")
    pool.decoding = sampling
    try:
        pool.shutdown()  # replicas take their decoding settings when they start
        sampled = [pool.answer(run.model, requests) for _ in range(2)]
    finally:
        pool.shutdown()
        pool.decoding = dataclasses.replace(sampling, decoding="greedy")
    assert sampled[0] == sampled[1]
    assert [len(a) for a in sampled[0]] == [len(r.rows) for r in requests]


def test_pool_follows_the_coordinators_model(kernels2, env):
    run = env.run
    kernels2.answer(run.model, answer_requests(run.model, run))  # the pool holds the original model
    changed = copy.deepcopy(run.model)
    generator = torch.Generator().manual_seed(11)
    (new,) = changed.add_modules(layers=[0], generator=generator)
    with torch.no_grad():
        for param in changed.get_module(0, new).parameters():
            param.add_(0.3 * torch.randn(param.shape, generator=generator))
        for param in changed.get_module(1, changed.path_of(TASKS[0])[1]).parameters():
            param.mul_(1.5)
        changed.backbone.transformer.wte.weight.add_(0.05 * torch.randn(changed.backbone.transformer.wte.weight.shape,
                                                                        generator=generator))
    changed.set_path(TASKS[1], [new, changed.path_of(TASKS[1])[1]])
    requests = answer_requests(changed, run)
    want = [generate_answers(changed, run.formatter, r.rows, path=r.path, batch_size=4, max_new_tokens=12)
            for r in requests]
    assert want != env.reference.answer(run.model, answer_requests(run.model, run))  # a real change
    assert kernels2.answer(changed, requests) == want
    req = dataclasses.replace(pseudo_requests(run)[1], path=changed.path_of(TASKS[1]), n=2)
    assert kernels2.generate(changed, [req]) == [in_process_pseudo(env, changed, req)]  # n=2: one range
    # back to the original model: the added module is dropped, the backbone restored
    original = answer_requests(run.model, run)
    assert kernels2.answer(run.model, original) == env.reference.answer(run.model, original)


def test_search_without_free_cpus_fails_clearly(kernels2, env):
    assert kernels2.pool.started  # its 2 actors hold both CPUs
    kernels = ray_kernels(env.run, env.run.run_dir / "_ray_train", num_search_workers=2, search_cpus=1)
    kernels.search_pool.ready_timeout_s = 2
    with pytest.raises(RuntimeError, match=r"could not reserve 2 x \{CPU: 1\}.*0 of 2 CPUs free"):
        kernels.search(env.model, env.jobs, env.data)
    states = [pg["state"] for pg in ray.util.placement_group_table().values()]
    assert "PENDING" not in states and states.count("CREATED") == 1  # the failed reservation was withdrawn


def _kill(name: str) -> int:
    """SIGKILL every live process of this machine whose title names `name` (Ray titles actors `ray::Class...`)."""
    import psutil

    killed = 0
    for proc in psutil.process_iter(["cmdline"]):
        if any(name in part for part in proc.info["cmdline"] or []):
            proc.kill()
            killed += 1
    return killed


def test_a_generation_actor_killed_mid_call_has_its_work_redone(kernels2, env):
    run = env.run
    requests = pseudo_requests(run, n=24, seed=9)
    want = kernels2.generate(run.model, requests)  # the pool is up; this is the answer a healthy pool gives
    restarts = kernels2.pool.restarts
    killer = threading.Timer(0.5, _kill, args=("GenerationWorker",))
    killer.start()
    try:
        got = kernels2.generate(run.model, requests)
        killer.join()
        if kernels2.pool.restarts == restarts:  # the call ended before the kill landed: the next one meets it
            got = kernels2.generate(run.model, requests)
    finally:
        killer.cancel()
    assert kernels2.pool.restarts == restarts + 1
    assert got == want  # every range is a function of its request and seed: the redone call is the same


def test_a_generation_actor_that_dies_after_its_call_returned_leaves_the_calls_results_standing(kernels2, env,
                                                                                               monkeypatch):
    """After a pool call the kernels ask the actors for their nodes (the run's placement record). An actor
    that died in between (its process killed, its node lost) made that question raise ActorDiedError: the
    stage failed although its pseudo samples were in hand. They stand now; the next call rebuilds the pool."""
    run = env.run
    requests = pseudo_requests(run, n=8, seed=5)
    want = kernels2.generate(run.model, requests)
    pool, generate = kernels2.pool, kernels2.pool.generate
    restarts = pool.restarts

    def generate_then_lose_an_actor(*args, **kwargs):
        out = generate(*args, **kwargs)
        victim = pool.actors[0]
        ray.kill(victim)
        while True:  # until Ray reports the death: the question for its node now meets it for sure
            try:
                ray.get(victim.node_id.remote(), timeout=60)
            except ray.exceptions.RayActorError:
                break
        return out

    monkeypatch.setattr(pool, "generate", generate_then_lose_an_actor)
    assert kernels2.generate(run.model, requests) == want
    monkeypatch.undo()
    assert kernels2.generate(run.model, requests) == want  # the next call finds the death and rebuilds
    assert pool.restarts == restarts + 1
