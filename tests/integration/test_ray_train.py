"""The ADAPT stage on real Ray Train + DeepSpeed against independent references.

One embedded Ray session (2 CPUs) serves the module; every case trains a tiny
run built in tmp_path (2-layer GPT-2, 48 training rows per task).

* 1 worker == the in-process `run_adapt_job` (same seed) to 1e-6, and the
  driver's model holds exactly the trained adapters afterwards, from an
  adapters-only checkpoint.
* 2 workers train exactly what 1 worker trains (train.batch_size is the global
  batch, each rank takes its share; dropout off): the same steps, weights,
  losses and eta to 1e-5. The job has a replay source, so the gradient-scaling
  all-reduce runs across the Ray Train ranks.
* ZeRO-3 on Ray Train (weights gathered from the partitions) == ZeRO-1 in-process.
* The checkpoint format round-trips and rejects a checkpoint of another job.
* A worker killed (SIGKILL) mid-adaptation: Ray Train restarts it from the last
  epoch checkpoint and the result equals the uninterrupted in-process run.
* A failing worker raises on the driver with its cause; the driver's model is untouched.
"""

from __future__ import annotations

import copy
import dataclasses
import os

import pytest
import ray  # a hard dependency: a broken install fails here, it does not skip
import torch
from safetensors.torch import load_file

from dmea_dist.config import config_from_dict
from dmea_dist.coordinator import engine_settings
from dmea_dist.data.formatting import encode_task
from dmea_dist.distributed.train_group import TrainWorker
from dmea_dist.distributed.train_workers import (
    RESULT_FILE,
    WEIGHT_FILES,
    RayTrainAdapter,
    read_adapt_checkpoint,
    write_adapt_checkpoint,
)
from dmea_dist.method.adaptation import AdaptJob, AdaptResult, run_adapt_job, trained_state
from dmea_dist.run import build_run

pytestmark = pytest.mark.integration

TOL = 1e-6
N_TRAIN, BATCH, EPOCHS = 48, 8, 2


def tiny_config(output_dir, deepspeed=None):
    return config_from_dict({
        "name": "ray-train-test", "output_dir": str(output_dir),
        "data": {"tasks": ["synth.restaurant.00", "synth.restaurant.01"], "synth_sizes": [N_TRAIN, 8, 8],
                 "overlength": "truncate"},  # one row passes max_length=96 with this BPE
        "model": {"tiny": {"n_layer": 2, "n_embd": 32, "n_head": 2, "n_positions": 128, "vocab_size": 400,
                           "pretrain": {"steps": 20, "batch_size": 16, "seq_len": 32, "heldout_tasks": 1}},
                  "bottleneck": 8, "max_length": 96},
        "train": {"batch_size": BATCH, "lr": 3e-3},
        "tracking": {"enabled": False},
        "deepspeed": deepspeed or {},
    })


@pytest.fixture(autouse=True)
def _sigint_handler_restored():
    """Ray Train's `fit` in a main thread installs its own SIGINT handler (to abort the run) and leaves it
    installed: put back what was there, so later tests of Ctrl-C see Python's."""
    import signal

    before = signal.getsignal(signal.SIGINT)
    yield
    signal.signal(signal.SIGINT, before)


@pytest.fixture(scope="module")
def ray_session():
    # one declared GPU (no device behind it): a GPU rank is scheduled, so its environment can be read
    ray.init(address="local", num_cpus=2, num_gpus=1, include_dashboard=False, log_to_driver=False)
    yield
    ray.shutdown()


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """(config, model, first-task job, second-task job with replay), built like the ADAPT stage builds them."""
    out = tmp_path_factory.mktemp("ray-train")
    cfg = tiny_config(out)
    run = build_run(cfg, run_dir=out / "run")
    model, (t0, t1) = run.model, run.tasks
    path0 = model.add_modules(generator=torch.Generator().manual_seed(0))
    model.set_path(t0.task_id, path0)
    # task 1 shares task 0's layer-0 module and adds a new one in layer 1: replay of task 0 reaches layer 0
    path1 = [path0[0], *model.add_modules(layers=[1], generator=torch.Generator().manual_seed(1))]
    model.set_path(t1.task_id, path1)
    common = dict(epochs=EPOCHS, lm_lambda=0.25, scale=True, progress="epochs", batch_size=BATCH,
                  pad_id=run.formatter.special.pad)
    first = AdaptJob(sources=[("new", t0.train, path0)], trainable=path0, seed=10, **common)
    pseudo = encode_task(run.formatter, t0.rows["train"][:16], task_index=0)  # stand-in pseudo samples
    second = AdaptJob(sources=[("new", t1.train, path1), (f"replay:{t0.task_id}", pseudo, path0)],
                      trainable=path1, seed=11, **common)
    return cfg, model, first, second


@pytest.fixture(scope="module")
def in_process_first(tiny):
    """The in-process reference of the first job: (model after, AdaptResult)."""
    cfg, model, job, _ = tiny
    model = copy.deepcopy(model)
    torch.manual_seed(job.seed)  # what the Ray worker of rank 0 seeds (dropout)
    return model, run_adapt_job(model, job, engine_factory=engine_settings(cfg).factory())


def max_diff(a: dict, b: dict) -> float:
    assert a.keys() == b.keys()
    return max((a[k] - b[k]).abs().max().item() for k in a)


def assert_results_close(got: AdaptResult, want: AdaptResult, tol: float = TOL):
    assert got.steps == want.steps
    for series in ("losses", "etas"):
        g, w = getattr(got, series), getattr(want, series)
        assert g.keys() == w.keys(), series
        for key in w:
            assert g[key] == pytest.approx(w[key], abs=tol), f"{series}[{key}]"


def test_one_zero3_worker_equals_in_process_and_installs_the_gathered_adapters(ray_session, tiny, in_process_first,
                                                                               tmp_path):
    """One Ray Train worker at ZeRO-3 (every adapter partitioned, persistence threshold 0) trains what the
    in-process ZeRO-1 reference trains (on one rank the stages compute the same update), gathers the adapters
    and installs them in the driver's model. ZeRO-1 on Ray Train: the killed-worker and two-worker tests."""
    _, model, job, _ = tiny
    cfg = tiny_config(tmp_path, deepspeed={"zero_optimization": {"stage": 3, "stage3_param_persistence_threshold": 0}})
    want_model, want_result = in_process_first
    driver_model = copy.deepcopy(model)
    before = trained_state(driver_model, job.trainable)
    steps = []  # what the driver's progress bar gets while fit() runs
    storage = tmp_path / "storage"
    adapter = RayTrainAdapter(engine_settings(cfg), num_workers=1, cpus_per_worker=2, storage_path=storage,
                              progress=lambda stage, done, total, **info: steps.append((stage, done, total, info)))
    got_result = adapter(driver_model, job)

    got, want = trained_state(driver_model, job.trainable)["modules"], trained_state(want_model, job.trainable)["modules"]
    assert max_diff(got, before["modules"]) > 1e-3  # it trained, and the driver's model got the result
    assert max_diff(got, want) <= TOL
    assert got_result.steps == EPOCHS * N_TRAIN // BATCH
    assert_results_close(got_result, want_result)
    # rank 0's steps reached the driver, the last one with the final loss
    assert steps and steps[-1][:3] == ("adapt", got_result.steps, got_result.steps)
    assert steps[-1][3]["loss"] == pytest.approx(want_result.losses["new"][-1], abs=TOL)
    backbone_after = driver_model.backbone.state_dict()
    for key, tensor in model.backbone.state_dict().items():
        assert torch.equal(backbone_after[key], tensor), key  # the frozen backbone is untouched
    assert all(isinstance(v, float) for v in adapter.last_metrics.values())
    assert adapter.last_metrics["final_loss.new"] == pytest.approx(want_result.losses["new"][-1], abs=TOL)

    # adapters-only: the path's module weights and the result, nothing of the backbone or the optimizer
    with adapter.last_checkpoint.as_directory() as directory:
        assert sorted(os.listdir(directory)) == sorted([RESULT_FILE, WEIGHT_FILES["modules"]])
        keys = set(load_file(os.path.join(directory, WEIGHT_FILES["modules"])))
    assert keys == set(want)  # modeling.io's key scheme, as every module file
    calls = [path for path in storage.iterdir() if path.name.startswith("adapt-")]
    assert len(calls) == 1 and calls[0].is_dir()  # the storage_path given is the one used
    adapter.close()  # the call's folder (its epoch checkpoints) goes: a long run does not keep one per task
    assert not calls[0].exists()


def _no_dropout(model):
    """Dropout off in the modules and in the config that replicas are built from (as model.dropout=0 does)."""
    for key in ("resid_pdrop", "embd_pdrop", "attn_pdrop"):
        setattr(model.backbone.config, key, 0.0)
    for module in model.modules():
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0
    return model


def test_two_workers_train_what_one_worker_trains(ray_session, tiny, tmp_path):
    """train.batch_size is the global batch: 2 ranks split every global batch, so they take the same steps on
    the same examples with the same gradients as 1 worker (dropout off: masks are drawn per rank)."""
    cfg, model, _, job = tiny
    model = _no_dropout(copy.deepcopy(model))
    one = copy.deepcopy(model)
    want = run_adapt_job(one, job, engine_factory=engine_settings(cfg).factory())
    driver_model = copy.deepcopy(model)
    before = trained_state(driver_model, job.trainable)["modules"]
    got = RayTrainAdapter(engine_settings(cfg), num_workers=2, cpus_per_worker=1,
                          storage_path=tmp_path / "storage")(driver_model, job)
    trained = trained_state(driver_model, job.trainable)["modules"]
    assert max_diff(trained, before) > 1e-3
    assert max_diff(trained, trained_state(one, job.trainable)["modules"]) <= 1e-5
    assert got.steps == want.steps == EPOCHS * -(-N_TRAIN // BATCH)  # not halved by the second worker
    assert_results_close(got, want, tol=1e-5)
    etas = got.etas[job.sources[1][0]]
    assert len(etas) == got.steps and any(abs(e - 1.0) > 1e-3 for e in etas)  # scaling was active


def test_checkpoint_round_trip_and_mismatch(tmp_path, tiny_gpt2_config):
    from dmea_dist.modeling.model import DMEAModel

    model = DMEAModel.from_config(tiny_gpt2_config, bottleneck=4)
    path = model.add_modules(generator=torch.Generator().manual_seed(0))
    result = AdaptResult(steps=2, losses={"new": [2.0, 1.5], "replay:a": [3.0, 2.5]}, etas={"replay:a": [0.5, 2.0]})
    for trainable, key in ((path, "modules"), (None, "backbone")):
        directory = tmp_path / key
        directory.mkdir()
        state = trained_state(model, trainable)
        write_adapt_checkpoint(directory, trainable=trainable, state=state, result=result, world_size=2)
        got_state, got_result = read_adapt_checkpoint(directory, trainable=trainable)
        assert got_result == result
        assert got_state[key].keys() == state[key].keys()
        for name, value in state[key].items():
            assert torch.equal(got_state[key][name], value), name
    with pytest.raises(ValueError, match=r"trainable=\[0, 0, 0\].*the job trains \[1, 1, 1\]"):
        read_adapt_checkpoint(tmp_path / "modules", trainable=[1, 1, 1])
    with pytest.raises(FileNotFoundError, match="write_adapt_checkpoint"):
        read_adapt_checkpoint(tmp_path, trainable=path)


def test_a_worker_killed_mid_adaptation_is_restarted_from_its_checkpoint(ray_session, tiny, tmp_path):
    """SIGKILL the training worker after its first epoch checkpoint: Ray Train restarts the group, the new
    worker continues from that checkpoint, and the result is the uninterrupted in-process one."""
    import threading

    from tests.integration.test_ray_workers import _kill

    cfg, model, job, _ = tiny
    job = dataclasses.replace(job, epochs=8)  # the kill lands after the first of 8 epoch checkpoints
    want_model = copy.deepcopy(model)
    want = run_adapt_job(want_model, job, engine_factory=engine_settings(cfg).factory())
    storage = tmp_path / "storage"
    killed = []

    def kill_after_first_checkpoint():
        # The worker uploads a checkpoint's files, then the controller registers it and only then writes
        # its checkpoint-manager snapshot: kill once the snapshot exists, so a restart must find the
        # checkpoint (waiting a fixed time after the files appeared lost that race on a loaded CI machine).
        while not list(storage.glob("*/checkpoint_manager_snapshot.json")):
            if killer_stop.is_set():
                return
            threading.Event().wait(0.05)
        killed.append(_kill("RayTrainWorker"))

    killer_stop = threading.Event()
    killer = threading.Thread(target=kill_after_first_checkpoint, daemon=True)
    killer.start()
    driver_model = copy.deepcopy(model)
    try:
        got = RayTrainAdapter(engine_settings(cfg), num_workers=1, cpus_per_worker=2, storage_path=storage,
                              max_failures=2)(driver_model, job)
    finally:
        killer_stop.set()
        killer.join()
    assert killed and killed[0] >= 1, "the worker was never killed"
    assert got.resumed_from > 0  # continued from the epoch checkpoint, not from step 0
    assert got.steps == want.steps
    got_state = trained_state(driver_model, job.trainable)["modules"]
    assert max_diff(got_state, trained_state(want_model, job.trainable)["modules"]) <= TOL
    assert_results_close(got, want)


def test_a_failing_worker_surfaces_its_error_and_leaves_the_model(ray_session, tiny):
    cfg, model, job, _ = tiny
    driver_model = copy.deepcopy(model)
    before = trained_state(driver_model, job.trainable)["modules"]
    empty = dataclasses.replace(job, sources=[("new", ([], []), job.trainable)])
    with pytest.raises(ray.train.TrainingFailedError, match="training split is empty"):
        RayTrainAdapter(engine_settings(cfg), num_workers=1, cpus_per_worker=1, storage_path=cfg.output_dir,
                        max_failures=0)(driver_model, empty)
    assert max_diff(trained_state(driver_model, job.trainable)["modules"], before) == 0.0



# ------------------------------------------------------------- the training group that lives for the run


def test_training_group_lives_for_the_run_and_trains_what_one_process_trains(ray_session, tiny, tmp_path):
    """Two jobs on one 2-rank group (started once): each equals the in-process job; the second call starts
    nothing (same actors), and gets the first job's trained modules as adapter deltas."""
    from dmea_dist.distributed.train_group import TrainGroup

    cfg, model, first, second = tiny
    model = _no_dropout(copy.deepcopy(model))
    reference = copy.deepcopy(model)
    want = [run_adapt_job(reference, job, engine_factory=engine_settings(cfg).factory()) for job in (first, second)]
    group = TrainGroup(engine_settings(cfg), num_workers=2, cpus_per_worker=1)
    try:
        driver_model = copy.deepcopy(model)
        got = [group(driver_model, first, checkpoint_dir=tmp_path / "a")]
        workers, start_seconds = list(group.workers), group.start_seconds
        got.append(group(driver_model, second, checkpoint_dir=tmp_path / "b"))
        assert group.workers == workers and group.start_seconds == start_seconds  # nothing started again
    finally:
        group.shutdown()
    for job, g, w in zip((first, second), got, want, strict=True):
        assert_results_close(g, w, tol=1e-5)
        assert max_diff(trained_state(driver_model, job.trainable)["modules"],
                        trained_state(reference, job.trainable)["modules"]) <= 1e-5


def test_adaptation_in_the_coordinator_reports_its_steps(tiny, tmp_path):
    """adapt_on: coordinator trains in the coordinator's process and feeds every step to the run's progress."""
    from dmea_dist.config import RayConfig
    from dmea_dist.coordinator import decoding_settings
    from dmea_dist.distributed.kernels import RayKernels

    cfg, model, first, _ = tiny
    events = []
    kernels = RayKernels(tokenizer=None, max_length=96, engine=engine_settings(cfg), decoding=decoding_settings(cfg),
                         sizes=RayConfig(adapt_on="coordinator"), storage_path=tmp_path,
                         progress=lambda what, done, total, **info: events.append((what, done, total, info)))
    result = kernels.adapt(copy.deepcopy(model), first)
    assert [e[:3] for e in events] == [("adapt", k + 1, result.steps) for k in range(result.steps)]
    assert events[-1][3]["loss"] == pytest.approx(result.losses["new"][-1], rel=1e-6)


def test_a_group_launched_ahead_trains_the_model_as_it_is_at_its_first_job(ray_session, tiny, tmp_path):
    """`launch` (ray.warm_up) starts the ranks from the model as it is at the run's start, without waiting;
    the first job waits for them and first brings them to the model as it is then, so it trains what one
    process trains. Without that sync the ranks would train the modules they were launched with."""
    from dmea_dist.distributed.train_group import TrainGroup

    cfg, model, first, _ = tiny
    model = _no_dropout(copy.deepcopy(model))
    at_launch = copy.deepcopy(model)
    with torch.no_grad():  # the modules as they were before the stages changed them
        for pool in at_launch.pools:
            for p in pool.parameters():
                p.add_(0.5)
    reference = copy.deepcopy(model)
    want = run_adapt_job(reference, first, engine_factory=engine_settings(cfg).factory())
    group = TrainGroup(engine_settings(cfg), num_workers=2, cpus_per_worker=1)
    try:
        group.launch(at_launch)
        assert group.started and group._joining is not None  # launched, not waited for
        workers = list(group.workers)
        driver_model = copy.deepcopy(model)
        got = group(driver_model, first, checkpoint_dir=tmp_path / "a")
        assert group.workers == workers and group._joining is None  # the launched ranks did the job
    finally:
        group.shutdown()
    assert_results_close(got, want, tol=1e-5)
    assert max_diff(trained_state(driver_model, first.trainable)["modules"],
                    trained_state(reference, first.trainable)["modules"]) <= 1e-5


def test_the_ranks_join_though_another_process_goes_for_the_port_rank_0_offered(ray_session, tiny):
    """Rank 0 offers the rendezvous (`TrainWorker.address`) and the ranks join it later (`join`). The port
    offered was one found free and closed again, for rank 0 to bind at its join: any process on the node could
    take it in between, and the group's start failed (EADDRINUSE). Here another process goes for the port right
    after the offer: rank 0 holds it already, and the ranks join."""
    import socket

    cls = ray.remote(TrainWorker).options(num_cpus=1)
    workers = [cls.remote(None, engine=engine_settings(tiny[0]), cpus=1) for _ in range(2)]
    thief = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    try:
        host, port = ray.get(workers[0].address.remote())
        try:
            thief.bind(("0.0.0.0", port))
            thief.listen()
            taken = True
        except OSError:
            taken = False
        joins = [w.join.remote(rank, 2, (host, port), "gloo") for rank, w in enumerate(workers)]
        pending, deadline = joins, 180.0
        while pending:  # the first join to fail raises at once (a rank whose store went to the thief would hang)
            ready, pending = ray.wait(pending, num_returns=1, timeout=deadline)
            assert ready, "the ranks did not join within 180 s"
            ray.get(ready)
        assert not taken  # the port was rank 0's from the offer on
    finally:
        thief.close()
        for worker in workers:
            ray.kill(worker)


def test_gpu_ranks_run_deepspeed_on_cuda_though_the_driver_says_cpu(ray_session, tiny, monkeypatch):
    """A worker inherits the driver's DS_ACCELERATOR (here `cpu`, as conftest, the Makefile and the project's
    image set it; `cluster.connect` passes it on to a job's workers too). GPU ranks left it alone, so they would
    build CPU engines beside their GPUs. Their own environment says cuda now, in both adaptation paths (CPU
    ranks' says cpu, as before). Here the GPU is one Ray counts with no device behind it: the GPU rank's
    constructor, finding cuda in its environment, refuses it, and that ConfigError comes out as itself, not as
    Ray's ActorDiedError (a traceback from the CLI)."""
    from dmea_dist.distributed.train_group import TrainGroup
    from dmea_dist.errors import ConfigError

    assert os.environ["DS_ACCELERATOR"] == "cpu"
    cfg, model, first, _ = tiny
    group = TrainGroup(engine_settings(cfg), num_workers=1, cpus_per_worker=1, use_gpu=True)
    try:
        with pytest.raises(ConfigError, match="ray.use_gpu: a training rank on node .* torch .* there sees none"):
            group(copy.deepcopy(model), first)
    finally:
        group.shutdown()
    group = TrainGroup(engine_settings(cfg), num_workers=1, cpus_per_worker=1, use_gpu=False)
    group.launch()
    try:
        assert ray.get(group.workers[0].__ray_call__.remote(lambda self: os.environ["DS_ACCELERATOR"])) == "cpu"
    finally:
        group.shutdown()

    captured = {}  # Ray Train: the runtime env its workers get (the trainer itself is Ray Train's)
    monkeypatch.setattr("ray.train.torch.TorchTrainer", lambda *a, run_config, **k: captured.update(
        env=run_config.worker_runtime_env["env_vars"]))
    for use_gpu in (True, False):
        RayTrainAdapter(engine_settings(tiny[0]), num_workers=1, cpus_per_worker=1, storage_path="/tmp",
                        use_gpu=use_gpu)._trainer(tiny[1], tiny[2])
        assert captured["env"]["DS_ACCELERATOR"] == ("cuda" if use_gpu else "cpu")


class _UnbuildableRank(TrainWorker):
    """A training rank whose constructor raises, as on a bad setting or a missing file (TrainGroup's actor class
    for one test)."""

    def __init__(self, *args, **kwargs):
        raise FileNotFoundError("no such file: /nowhere/ds_config.json")


def test_a_group_whose_ranks_fail_to_construct_raises_their_error_at_once(ray_session, tiny, monkeypatch):
    """Ray raises ActorDiedError (actor_init_failed) for the calls of a rank whose __init__ raised, and restarts
    it never. The group took that for a dead rank and launched itself again max_failures times (each rank
    importing DeepSpeed and building a replica) before the error came out; now the first one comes out."""
    from dmea_dist.distributed import train_group

    cfg, model, first, _ = tiny
    monkeypatch.setattr(train_group, "TrainWorker", _UnbuildableRank)
    group = train_group.TrainGroup(engine_settings(cfg), num_workers=1, cpus_per_worker=1, max_failures=2)
    launches = []
    launch = group.launch
    monkeypatch.setattr(group, "launch", lambda model=None: launches.append(True) or launch(model))
    try:
        with pytest.raises(ray.exceptions.ActorDiedError, match="no such file: /nowhere/ds_config.json") as raised:
            group(copy.deepcopy(model), first)
    finally:
        group.shutdown()
    assert raised.value.actor_init_failed
    assert len(launches) == 1 and group.restarts == 0


def in_turn_kernels(cfg, tmp_path):
    """(sizes, the other RayKernels arguments) for `tiny` with ray.warm_up off, every role fitting in 2 CPUs."""
    from dmea_dist.config import RayConfig
    from dmea_dist.coordinator import decoding_settings
    from dmea_dist.data.tokenizer import load_tokenizer

    sizes = RayConfig(warm_up=False, num_train_workers=1, train_cpus=1, num_generation_actors=1,
                      generation_cpus=0.5, num_search_workers=1, search_cpus=0.5)
    config = dataclasses.replace(cfg, ray=sizes)
    return sizes, dict(tokenizer=load_tokenizer(cfg.output_dir + "/run/tokenizer"), max_length=96,
                       engine=engine_settings(config), decoding=decoding_settings(config), storage_path=tmp_path)


def test_without_warm_up_the_workers_start_in_turn_behind_the_first_adaptation(ray_session, tiny, in_process_first,
                                                                               tmp_path):
    """ray.warm_up off (the roles take turns on the same cores): the first adaptation starts the training ranks
    and, once they are up, the generation actors and then the search actors, without waiting for
    them (their imports use the core the one-thread adaptation leaves idle); it trains what one process trains."""
    from dmea_dist.distributed.kernels import RayKernels

    cfg, model, job, _ = tiny
    want_model, want = in_process_first
    sizes, settings = in_turn_kernels(cfg, tmp_path)
    kernels = RayKernels(sizes=sizes, **settings)
    try:
        assert not kernels.group.started and not kernels.pool.started and not kernels.search_pool.started
        driver_model = copy.deepcopy(model)
        got = kernels.adapt(driver_model, job, checkpoint_dir=tmp_path / "a")
        # started behind the ranks, not at first use
        assert kernels.pool.started and kernels.search_pool.started and kernels.search_pool is not kernels.pool
        assert ray.get([a.node_id.remote() for a in kernels.search_pool.actors], timeout=120)  # up, replica built
        assert ray.get([a.node_id.remote() for a in kernels.pool.actors], timeout=120)
    finally:
        kernels.close()
    assert_results_close(got, want, tol=1e-5)
    assert max_diff(trained_state(driver_model, job.trainable)["modules"],
                    trained_state(want_model, job.trainable)["modules"]) <= 1e-5


def test_ranks_launched_before_the_model_exists_are_adopted_and_train_it(ray_session, tiny, in_process_first,
                                                                       tmp_path):
    """`dmea run` launches the training ranks from the driver before any model exists (`launch_ranks`), so
    their start-up overlaps the coordinator's; the coordinator's kernels adopt them, give them the model at
    the first adaptation, which trains what one process trains on those very ranks, and (warm_up off)
    start the other workers behind it. Ranks that do not fit the kernels' sizes are released, not kept."""
    from dmea_dist.distributed.coordinator import launch_ranks
    from dmea_dist.distributed.kernels import RayKernels

    cfg, model, job, _ = tiny
    want_model, want = in_process_first
    sizes, settings = in_turn_kernels(cfg, tmp_path)
    config = dataclasses.replace(cfg, ray=sizes)
    assert launch_ranks(dataclasses.replace(config, ray=dataclasses.replace(sizes, adapt_on="coordinator"))) is None
    ranks = launch_ranks(config)
    assert ray.get(ranks.joining, timeout=120)  # up, imported and joined, with no model anywhere yet
    kernels = RayKernels(sizes=sizes, ranks=ranks, **settings)
    try:
        assert kernels.group.started and kernels.group.workers == ranks.workers
        driver_model = copy.deepcopy(model)
        got = kernels.adapt(driver_model, job, checkpoint_dir=tmp_path / "a")
        assert kernels.group.workers == ranks.workers and kernels.group.restarts == 0  # the adopted ranks did it
        assert kernels.pool.started and kernels.search_pool.started  # the rest started behind them, as before
    finally:
        kernels.close()
        ranks.release()  # what the driver does at the end: the kernels released them already; harmless
    assert_results_close(got, want, tol=1e-5)
    assert max_diff(trained_state(driver_model, job.trainable)["modules"],
                    trained_state(want_model, job.trainable)["modules"]) <= 1e-5

    two = launch_ranks(config)
    kernels = RayKernels(sizes=dataclasses.replace(sizes, num_train_workers=2), ranks=two, **settings)
    try:
        assert not kernels.group.started  # not the group's size: not adopted ...
        with pytest.raises(ray.exceptions.RayActorError):  # ... and stopped, their CPU freed
            ray.get(two.workers[0].address.remote(), timeout=60)
    finally:
        kernels.close()

    dead = launch_ranks(config)  # a rank that dies before its first job: that job runs on a fresh group
    ray.kill(dead.workers[0])
    kernels = RayKernels(sizes=sizes, ranks=dead, **settings)
    try:
        driver_model = copy.deepcopy(model)
        got = kernels.adapt(driver_model, job, checkpoint_dir=tmp_path / "b")
        assert kernels.group.workers and kernels.group.workers != dead.workers
    finally:
        kernels.close()
    assert_results_close(got, want, tol=1e-5)


def test_a_training_rank_killed_mid_adaptation_continues_from_its_checkpoint(ray_session, tiny, tmp_path):
    """SIGKILL a rank after its first epoch checkpoint: the group restarts and continues from that checkpoint;
    the result is the uninterrupted in-process one."""
    import threading

    from dmea_dist.distributed.train_group import TrainGroup
    from tests.integration.test_ray_workers import _kill

    cfg, model, job, _ = tiny
    job = dataclasses.replace(job, epochs=8)  # the kill lands after the first of 8 epoch checkpoints
    want_model = copy.deepcopy(model)
    want = run_adapt_job(want_model, job, engine_factory=engine_settings(cfg).factory())
    checkpoints = tmp_path / "adapt_checkpoint"
    stop, killed = threading.Event(), []

    def kill_after_first_checkpoint():
        while not (checkpoints / "adapt_progress.json").exists():
            if stop.wait(0.05):
                return
        killed.append(_kill("TrainWorker"))

    killer = threading.Thread(target=kill_after_first_checkpoint, daemon=True)
    killer.start()
    steps = []  # rank 0's progress reaches the driver through the restart
    group = TrainGroup(engine_settings(cfg), num_workers=1, cpus_per_worker=2, max_failures=2,
                       progress=lambda what, done, total, **info: steps.append((what, done, total, info)))
    driver_model = copy.deepcopy(model)
    try:
        got = group(driver_model, job, checkpoint_dir=checkpoints)
    finally:
        stop.set()
        killer.join()
        group.shutdown()
    assert killed and killed[0] >= 1 and group.restarts == 1
    assert got.resumed_from > 0 and got.steps == want.steps
    assert steps[-1][:3] == ("adapt", want.steps, want.steps) and "loss" in steps[-1][3]
    assert max_diff(trained_state(driver_model, job.trainable)["modules"],
                    trained_state(want_model, job.trainable)["modules"]) <= TOL
    assert_results_close(got, want)
