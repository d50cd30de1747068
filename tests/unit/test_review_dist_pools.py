"""Review of dmea_dist/distributed (pools, training group, kernels): each test failed before its fix, with fakes
at the Ray boundary (no Ray started)."""

from __future__ import annotations

import pytest
from ray.exceptions import ActorDiedError, RayActorError, RayTaskError

from dmea_dist.distributed import train_group


class _Ref:
    """What a fake rank's call returns: a value or an error."""

    def __init__(self, value=None, error: BaseException | None = None):
        self.value, self.error = value, error


class _FakeRay:
    """`ray.get` / `ray.wait` over `_Ref`s; a list's get raises the first error in list order, as Ray's does
    for refs that are all ready (checked on Ray 2.60: rank 0's gloo error before rank 1's death)."""

    @staticmethod
    def get(refs, timeout=None):
        if isinstance(refs, list):
            for ref in refs:
                if ref.error is not None:
                    raise ref.error
            return [ref.value for ref in refs]
        if refs.error is not None:
            raise refs.error
        return refs.value

    @staticmethod
    def wait(refs, num_returns=1, timeout=None):
        return list(refs), []


class _Method:
    def __init__(self, outcome):
        self.outcome = outcome

    def remote(self, *args):
        return self.outcome()


class _Rank:
    def __init__(self, outcome):
        self.adapt = _Method(outcome)


class _Relay:
    def queue(self):
        return None

    def drain(self):
        pass

    def shutdown(self):
        pass


def _peer_error() -> RayTaskError:
    return RayTaskError("TrainWorker.adapt", "Traceback ...", RuntimeError("[gloo] Connection closed by peer"))


@pytest.mark.parametrize("progress", [False, True])
def test_a_rank_that_dies_mid_adaptation_restarts_the_group_though_its_peer_reports_first(monkeypatch, progress):
    """A rank killed mid-job (OOM killer, a lost node) breaks its peers' collectives at once: their gloo error
    (RayTaskError) can reach the group before Ray's ActorDiedError, and with the progress bar on (`dmea run`)
    it always did (a 2-rank group on Ray 2.60, SIGKILL of rank 1: `ray.get(ready)` raised rank 0's error).
    That error was not a RayActorError: no restart from the checkpoint, the run failed with max_failures left."""
    monkeypatch.setattr(train_group, "ray", _FakeRay())
    monkeypatch.setattr("dmea_dist.method.adaptation.load_trained_state", lambda model, trainable, state: None)
    group = train_group.TrainGroup(engine=None, num_workers=2, cpus_per_worker=1.0, max_failures=2,
                                   progress=(lambda *a, **k: None) if progress else None)
    group._relay = _Relay()
    calls = {"n": 0}

    def sync(model):  # the first group is the dying one; a restart gives healthy ranks
        calls["n"] += 1
        if calls["n"] == 1:
            group.workers = [_Rank(lambda: _Ref(error=_peer_error())), _Rank(lambda: _Ref(error=ActorDiedError()))]
        else:
            group.workers = [_Rank(lambda: _Ref(("result", {"modules": {}}))), _Rank(lambda: _Ref(("result", None)))]

    shutdowns = []
    monkeypatch.setattr(group, "_sync", sync)
    monkeypatch.setattr(group, "shutdown", lambda: shutdowns.append(True))

    class Job:
        trainable = [0]

    assert group(object(), Job()) == "result"
    assert group.restarts == 1 and len(shutdowns) == 1


def test_a_rank_that_fails_without_dying_tears_the_group_down_and_raises(monkeypatch):
    """A rank's own error (no rank died) is raised as before, without waiting for a death that never comes, and
    the group is torn down as the generation pool is: its other ranks may be stuck in a collective the failed
    one left, and the next job would queue behind them until the process group's timeout (30 min)."""
    monkeypatch.setattr(train_group, "ray", _FakeRay())
    group = train_group.TrainGroup(engine=None, num_workers=2, cpus_per_worker=1.0, max_failures=2)
    own = RayTaskError("TrainWorker.adapt", "Traceback ...", ValueError("a bug on rank 1"))

    def sync(model):
        group.workers = [_Rank(lambda: _Ref(error=_peer_error())), _Rank(lambda: _Ref(error=own))]

    shutdowns = []
    monkeypatch.setattr(group, "_sync", sync)
    monkeypatch.setattr(group, "shutdown", lambda: shutdowns.append(True))
    with pytest.raises(RayTaskError) as raised:
        group(object(), object())
    assert not isinstance(raised.value, RayActorError)
    assert group.restarts == 0 and shutdowns == [True]


def test_looking_for_a_dead_rank_gives_up_after_its_timeout(monkeypatch):
    """A rank stuck in a collective (its peer failed on its own) is not waited for past the timeout."""
    waits = []

    class Stuck(_FakeRay):
        @staticmethod
        def wait(refs, num_returns=1, timeout=None):
            waits.append(timeout)
            return [], list(refs)

    monkeypatch.setattr(train_group, "ray", Stuck())
    times = iter([0.0, 0.0, 31.0])
    monkeypatch.setattr(train_group.time, "monotonic", lambda: next(times))
    assert train_group._rank_died([_Ref(error=_peer_error()), _Ref()], timeout_s=30.0) is None
    assert waits == [30.0]


def test_a_pool_call_fails_as_soon_as_one_of_its_actors_dies_not_after_the_others_finish(monkeypatch):
    """`gather` waited for every ref before `ray.get` raised: an actor lost at the start of a long generation
    or evaluation call held the pool's restart (and the redone call) until all the other actors had finished
    their shards, doubling the call's time; the training group raises a dead rank at once."""
    from dmea_dist.distributed import cluster

    done = [_Ref(error=ActorDiedError()), _Ref("slow shard")]  # in the order they finish
    waits = []

    class Ray(_FakeRay):
        @staticmethod
        def wait(refs, num_returns=1, timeout=None):
            waits.append(len(refs))
            first = next(ref for ref in done if ref in refs)
            return [first], [ref for ref in refs if ref is not first]

    monkeypatch.setattr(cluster, "ray", Ray())
    seen = []
    with pytest.raises(ActorDiedError):
        cluster.gather([done[1], done[0]], label="generate", progress=lambda *a: seen.append(a))
    assert waits == [2] and seen == []  # raised at the first wait, the slow shard not waited for
    # results still come in submission order, progress as they finish
    done[0] = _Ref("fast shard")
    assert cluster.gather([done[1], done[0]], label="evaluate", progress=lambda *a: seen.append(a)) == [
        "slow shard", "fast shard"]
    assert seen == [("evaluate", 1, 2), ("evaluate", 2, 2)]


def test_a_ray_job_whose_runtime_env_sets_a_variable_the_run_sets_too_connects(monkeypatch):
    """`ray job submit --runtime-env-json '{"env_vars": {"DS_ACCELERATOR": "cpu"}}'` (forced for CPU runs
    on GPU nodes), or HF_HUB_OFFLINE for an offline cluster: `connect` passed ray.init its own env_vars with the same
    keys, and Ray 2.60 refuses to merge a job's runtime env with a driver's that sets any variable again
    ("Failed to merge the Job's runtime env ... because of a conflict"): the job failed before it started."""
    import json

    from ray.runtime_env.runtime_env import _merge_runtime_env

    from dmea_dist.distributed import cluster

    job_env = {"env_vars": {"DS_ACCELERATOR": "cpu", "HF_HUB_OFFLINE": "1", "MLFLOW_TRACKING_USERNAME": "alice"}}
    monkeypatch.setenv("RAY_JOB_CONFIG_JSON_ENV_VAR", json.dumps({"runtime_env": job_env, "metadata": {}}))
    monkeypatch.setenv("RAY_ADDRESS", "127.0.0.1:6379")
    monkeypatch.setenv("DS_ACCELERATOR", "cpu")  # the job's env_vars are the entry point's environment
    given = {}
    monkeypatch.setattr(cluster.ray, "is_initialized", lambda: False)
    monkeypatch.setattr(cluster.ray, "init", lambda **kwargs: given.update(kwargs))
    assert cluster.connect(None) == "127.0.0.1:6379"
    assert _merge_runtime_env(job_env, given["runtime_env"]) is not None  # what ray.init does with them
    merged = _merge_runtime_env(job_env, given["runtime_env"])["env_vars"]
    assert merged["TRANSFORMERS_OFFLINE"] == "1" and merged["DS_ACCELERATOR"] == "cpu"  # the run's own still go
    # outside a job, as before
    monkeypatch.delenv("RAY_JOB_CONFIG_JSON_ENV_VAR")
    cluster.connect(None)
    assert given["runtime_env"]["env_vars"]["HF_HUB_OFFLINE"] == "1" and given["runtime_env"]["env_vars"][
        "DS_ACCELERATOR"] == "cpu"


def test_ctrl_c_while_a_reservation_waits_withdraws_it(monkeypatch):
    """`reserve` waits up to 120 s, saying so; Ctrl-C then left the pending placement group queued in Ray, owned
    by the driver (a notebook, a library caller): it took the CPUs as soon as they freed, for nothing."""
    from dmea_dist.distributed import cluster

    removed = []

    class Interrupted:
        def wait(self, timeout_seconds):
            raise KeyboardInterrupt

    monkeypatch.setattr(cluster, "placement_group", lambda bundles, strategy: Interrupted())
    monkeypatch.setattr(cluster, "remove_placement_group", removed.append)
    with pytest.raises(KeyboardInterrupt):
        cluster.reserve(2, cpus=1.0, strategy="PACK", timeout_s=120, what="the training group")
    assert len(removed) == 1


def test_ranks_launched_for_a_coordinator_that_never_came_are_released(monkeypatch):
    """`ray_coordinator_factory` launches the training ranks, then the coordinator actor; the driver closes only
    a coordinator it got. Ctrl-C (or an error) in between left the ranks and their CPUs held by the driver, and
    one during the ranks' own launch left its placement group."""
    from dmea_dist.config import config_from_dict
    from dmea_dist.distributed import coordinator

    released = []

    class Ranks:
        def release(self):
            released.append("ranks")

    monkeypatch.setattr(coordinator, "launch_ranks", lambda config: Ranks())

    def interrupted():
        raise KeyboardInterrupt

    monkeypatch.setattr(coordinator.ray, "get_runtime_context", interrupted)
    config = config_from_dict({"data": {"tasks": ["synth.restaurant.00"]}})
    with pytest.raises(KeyboardInterrupt):
        coordinator.ray_coordinator_factory(config, "/nowhere")
    assert released == ["ranks"]

    monkeypatch.undo()

    class Group:
        def __init__(self, *args, **kwargs):
            pass

        def launch(self):
            raise KeyboardInterrupt  # after its reservation was placed

        def shutdown(self):
            released.append("group")

    monkeypatch.setattr(coordinator, "TrainGroup", Group)
    with pytest.raises(KeyboardInterrupt):
        coordinator.launch_ranks(config)
    assert released == ["ranks", "group"]


def test_kernels_whose_warm_up_fails_release_what_it_started(monkeypatch):
    """With `ray.warm_up` every role is started when the kernels are built; a role that cannot be placed
    (ClusterTooSmall after 120 s) failed `ray_kernels` with the roles started before it still holding their
    placement groups and actors, which nobody could close (the kernels were never returned)."""
    from types import SimpleNamespace

    from dmea_dist.config import config_from_dict
    from dmea_dist.distributed import kernels as kernels_module
    from dmea_dist.errors import ClusterTooSmall

    closed = []

    class Kernels:
        def __init__(self, **kwargs):
            pass

        def warm_up(self, model):
            raise ClusterTooSmall("could not reserve 2 x {CPU: 1} (SPREAD) for the training group")

        def close(self):
            closed.append(True)

    monkeypatch.setattr(kernels_module, "RayKernels", Kernels)
    monkeypatch.setattr(kernels_module.ray, "is_initialized", lambda: True)
    monkeypatch.setenv("DS_ACCELERATOR", "cpu")  # what ray_kernels sets in its process, undone after the test
    config = config_from_dict({"data": {"tasks": ["synth.restaurant.00"]}, "ray": {"warm_up": True}})
    run = SimpleNamespace(config=config, tokenizer=None, formatter=SimpleNamespace(max_length=64), run_dir="/nowhere",
                          policy=SimpleNamespace(full_finetune=False), model=None)
    with pytest.raises(ClusterTooSmall):
        kernels_module.ray_kernels(run)
    assert closed == [True]


def test_an_actor_that_died_after_a_pool_call_does_not_fail_the_stage(monkeypatch):
    """`RayKernels.generate` / `answer` record the actors' nodes after the pool call returned: an actor that
    died in between raised there (ActorDiedError), failing a stage whose work was done. The node ids are
    bookkeeping: the live actors' are recorded, the result stands, the next call rebuilds the pool."""
    from dmea_dist.distributed import generation_pool, kernels

    class Actor:
        def __init__(self, ref):
            self.node_id = _Method(lambda: ref)

    monkeypatch.setattr(generation_pool, "ray", _FakeRay())
    monkeypatch.setattr(kernels, "require_ray", lambda: None)
    pool = generation_pool.GenerationPool(tokenizer=None, max_length=8, decoding=None, num_actors=2)
    pool.actors = [Actor(_Ref("node-a")), Actor(_Ref(error=ActorDiedError()))]
    monkeypatch.setattr(pool, "generate", lambda model, requests, progress=None: ["pseudo samples"])
    monkeypatch.setattr(pool, "answer", lambda model, requests, progress=None: [["answers"]])
    ray_kernels = kernels.RayKernels.__new__(kernels.RayKernels)  # only what generate / answer use
    ray_kernels.pool, ray_kernels.progress, ray_kernels.placement = pool, None, kernels.Placement()
    assert ray_kernels.generate(object(), []) == ["pseudo samples"]
    assert ray_kernels.answer(object(), []) == [["answers"]]
    assert ray_kernels.placement.generation == {"node-a"}


def _constructor_error(cls: str = "GenerationWorker", error: Exception | None = None) -> ActorDiedError:
    """What Ray 2.60 raises for the calls of an actor whose __init__ raised: ActorDiedError, actor_init_failed,
    the constructor's traceback in its message (checked on embedded Ray; not restarted, max_restarts or not)."""
    error = error or FileNotFoundError("no such file: /nowhere/tokenizer.json")
    traceback = f'Traceback (most recent call last):\n  File "x.py", line 1, in __init__\n{type(error).__name__}: {error}'
    return ActorDiedError.from_task_error(RayTaskError(f"{cls}.__init__", traceback, error,
                                                       proctitle=f"ray::{cls}.__init__()"))


def test_a_pool_whose_actors_fail_to_construct_raises_at_once_not_after_a_rebuild(monkeypatch):
    """An actor's constructor that raises (a bad snapshot, a missing file) fails every call with ActorDiedError,
    which the pool took for a death: it tore itself down, reserved and built every replica again and redid the
    call, to meet the same error. Raised at once now, with the constructor's message; a pool whose actors waited
    on other refs (`start(after=...)`: those refs' failure reads as a constructor's too) is still rebuilt once,
    without them."""
    from dmea_dist.distributed import generation_pool

    pool = generation_pool.GenerationPool(tokenizer=None, max_length=8, decoding=None, num_actors=1, retries=2)
    syncs, shutdowns = [], []

    def shutdown():  # as the pool's: the next sync starts fresh actors, without `after`
        shutdowns.append(True)
        pool._after = False

    def broken(model):  # every constructor raises
        syncs.append(pool._after)
        raise _constructor_error()

    def waited_on_failed_refs(model):  # only the actors started after other refs fail (those refs failed)
        syncs.append(pool._after)
        if pool._after:
            raise _constructor_error()

    pool._after = False  # started without `after` (as `start` records)
    monkeypatch.setattr(pool, "shutdown", shutdown)
    monkeypatch.setattr(pool, "sync", broken)
    with pytest.raises(ActorDiedError, match="no such file: /nowhere/tokenizer.json"):
        pool._run(object(), [0], lambda item: None, label="generate", progress=None)
    assert (syncs, len(shutdowns), pool.restarts) == ([False], 1, 0)

    syncs.clear()
    pool._after = True  # started after other refs (`RayKernels._start_the_rest`): rebuilt once, without them
    monkeypatch.setattr(pool, "sync", waited_on_failed_refs)
    monkeypatch.setattr(generation_pool, "gather", lambda refs, label, progress: ["out"])
    assert pool._run(object(), [0], lambda item: None, label="generate", progress=None) == {0: "out"}
    assert syncs == [True, False] and pool.restarts == 1


def test_a_training_group_whose_ranks_fail_to_construct_raises_at_once(monkeypatch):
    """The same for the training group: a rank whose constructor raised was taken for a dead rank, and the group
    was launched again max_failures times (each rank importing DeepSpeed and building a replica) before the
    error came out; and at the first adaptation without warm_up, `_start_the_rest` dropped it before that."""
    from dmea_dist.distributed import kernels

    group = train_group.TrainGroup(engine=None, num_workers=2, cpus_per_worker=1.0, max_failures=2)
    shutdowns = []
    monkeypatch.setattr(group, "shutdown", lambda: shutdowns.append(True))

    def sync(model):
        raise _constructor_error("TrainWorker")

    monkeypatch.setattr(group, "_sync", sync)
    with pytest.raises(ActorDiedError, match="no such file"):
        group(object(), object())
    assert group.restarts == 0 and shutdowns == [True]

    monkeypatch.setattr(group, "start", sync)
    ray_kernels = kernels.RayKernels.__new__(kernels.RayKernels)  # only what _start_the_rest uses first
    ray_kernels.group = group
    with pytest.raises(ActorDiedError, match="no such file"):
        ray_kernels._start_the_rest(object())


def test_our_error_in_a_replicas_or_ranks_constructor_comes_out_as_itself_not_as_actor_died(monkeypatch, capsys):
    """A DmeaError raised in a pool replica's or training rank's constructor (a GPU rank whose torch sees no GPU)
    came out as Ray's ActorDiedError, whose message is the constructor's traceback: `dmea run` printed it as a
    traceback, where our errors are one `error:` line. The pools, the group and `_start_the_rest` raise the error
    itself now; another constructor's error (a bug) stays Ray's, with its traceback."""
    from dmea_dist.distributed import generation_pool, kernels
    from dmea_dist.driver import report_error
    from dmea_dist.errors import ConfigError

    ours = ConfigError("ray.use_gpu: a training rank on node 10.0.0.7 holds one of the GPUs Ray counts there, but "
                       "torch there sees none")

    def constructor_raised(model, error=ours):
        raise _constructor_error("TrainWorker", error)

    pool = generation_pool.GenerationPool(tokenizer=None, max_length=8, decoding=None, num_actors=1, retries=2)
    monkeypatch.setattr(pool, "shutdown", lambda: None)
    monkeypatch.setattr(pool, "sync", constructor_raised)
    with pytest.raises(ConfigError) as raised:
        pool._run(object(), [0], lambda item: None, label="generate", progress=None)
    assert raised.value is ours and pool.restarts == 0

    group = train_group.TrainGroup(engine=None, num_workers=1, cpus_per_worker=1.0, max_failures=2)
    monkeypatch.setattr(group, "shutdown", lambda: None)
    monkeypatch.setattr(group, "_sync", constructor_raised)
    with pytest.raises(ConfigError):
        group(object(), object())
    monkeypatch.setattr(group, "start", constructor_raised)
    ray_kernels = kernels.RayKernels.__new__(kernels.RayKernels)  # only what _start_the_rest uses first
    ray_kernels.group = group
    with pytest.raises(ConfigError):
        ray_kernels._start_the_rest(object())

    # on to the driver: an error of the coordinator actor's step, the CLI's one line
    through_coordinator = RayTaskError("CoordinatorActor.call", "Traceback ...", raised.value).as_instanceof_cause()
    assert report_error(through_coordinator) == 2
    assert capsys.readouterr().err == f"error: {ours}\n"

    monkeypatch.setattr(pool, "sync", lambda model: constructor_raised(model, FileNotFoundError("no such file")))
    with pytest.raises(ActorDiedError, match="no such file"):  # not ours: Ray's error and its traceback
        pool._run(object(), [0], lambda item: None, label="generate", progress=None)


def test_a_gpu_rank_whose_torch_sees_no_gpu_says_so(monkeypatch):
    """A node that declares GPUs torch cannot use (a CPU build of torch, no driver): Ray gave its rank a GPU,
    which failed at the process group's join (no NCCL), a traceback. The rank's constructor refuses it in one line."""
    from dmea_dist.errors import ConfigError

    monkeypatch.setattr(train_group.ray.util, "get_node_ip_address", lambda: "10.0.0.7")
    monkeypatch.setattr("torch.cuda.is_available", lambda: False)
    monkeypatch.setenv("DS_ACCELERATOR", "cpu")  # a CPU rank: nothing to check
    train_group.check_gpu()
    monkeypatch.setenv("DS_ACCELERATOR", "cuda")  # what worker_env gives a GPU rank
    with pytest.raises(ConfigError, match=r"ray.use_gpu: a training rank on node 10.0.0.7 holds one of the GPUs Ray "
                                          r"counts there, but torch .* there sees none"):
        train_group.check_gpu()

