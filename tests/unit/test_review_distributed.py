"""Review of dmea_dist/distributed: each test failed before its fix (sizes on an embedded Ray, the training group,
the generation and search pools, the coordinator actor's relay), with fakes at the Ray boundary."""

from __future__ import annotations

import pytest
import torch

from dmea_dist.config import config_from_dict
from dmea_dist.distributed import cluster

TASKS = {"data": {"tasks": ["synth.restaurant.00"]}}


@pytest.mark.parametrize("num_cpus", [1, 2, 3])
def test_an_embedded_ray_of_ray_num_cpus_declares_the_cpus_its_long_lived_roles_reserve(monkeypatch, num_cpus):
    """`ray.num_cpus` sizes the roles for that many cores (one search worker per core, sharing the pool), and the
    roles take turns on them; the embedded Ray must still declare what they reserve together, or the pool
    cannot be placed beside the training ranks (a 120 s wait, then "could not reserve")."""
    from dmea_dist import cli
    from dmea_dist.distributed import coordinator

    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    monkeypatch.setattr(cluster, "machine_cores", lambda: 2)
    declared = {}
    monkeypatch.setattr(coordinator, "connect", lambda address, **kwargs: declared.update(kwargs) or "local")
    config = config_from_dict({**TASKS, "ray": {"num_cpus": num_cpus}})
    sized, _ = cli._ray(None, config)
    assert sized.ray.num_search_workers == num_cpus  # one search worker per core it was given
    assert declared["num_cpus"] >= sized.ray.reserved_cpus()
    assert declared["num_cpus"] >= num_cpus


class _UnplacedGroup:
    """A placement group that never becomes ready."""

    def wait(self, timeout_seconds):
        return False


def test_a_training_group_that_cannot_get_its_gpus_says_so_not_that_cpus_are_short(monkeypatch):
    """The training group reserves {CPU, GPU} bundles (`use_gpu`); on a cluster short of GPUs the error named a
    CPU-only bundle and the free CPUs (all of them), and advised fewer CPUs per worker."""
    removed = []
    monkeypatch.setattr(cluster, "placement_group", lambda bundles, strategy: _UnplacedGroup())
    monkeypatch.setattr(cluster, "remove_placement_group", removed.append)
    monkeypatch.setattr(cluster.ray, "available_resources", lambda: {"CPU": 8.0})
    monkeypatch.setattr(cluster.ray, "cluster_resources", lambda: {"CPU": 8.0, "GPU": 1.0})
    with pytest.raises(RuntimeError) as failed:
        cluster.reserve(2, cpus=1.0, strategy="PACK", timeout_s=1, what="the training group",
                        bundle={"CPU": 1.0, "GPU": 1.0})
    message = str(failed.value)
    assert "could not reserve 2 x {CPU: 1, GPU: 1} (PACK) for the training group" in message
    assert "0 of 1 GPUs free" in message and "8 of 8 CPUs" in message
    assert len(removed) == 1  # the pending reservation is withdrawn
    # a CPU bundle is described as before
    with pytest.raises(RuntimeError, match=r"could not reserve 3 x \{CPU: 2\} \(SPREAD\) for the pool .*8 of 8 CPUs free"):
        cluster.reserve(3, cpus=2.0, strategy="SPREAD", timeout_s=1, what="the pool")


def test_a_cluster_too_small_for_the_run_is_one_line_from_the_cli(monkeypatch, capsys):
    """The reservation's clear message was a RuntimeError: raised in the coordinator actor, `dmea run` and the
    job entry point printed it as a traceback (exit 1). It is a DmeaError now: one `error:` line, exit 2."""
    from dmea_dist.driver import report_error
    from dmea_dist.errors import ClusterTooSmall, DmeaError

    monkeypatch.setattr(cluster, "placement_group", lambda bundles, strategy: _UnplacedGroup())
    monkeypatch.setattr(cluster, "remove_placement_group", lambda pg: None)
    monkeypatch.setattr(cluster.ray, "available_resources", lambda: {"CPU": 0.0})
    monkeypatch.setattr(cluster.ray, "cluster_resources", lambda: {"CPU": 2.0})
    with pytest.raises(DmeaError) as failed:
        cluster.reserve(1, cpus=1.0, strategy="SPREAD", timeout_s=1, what="the expansion search")
    assert isinstance(failed.value, ClusterTooSmall)
    assert report_error(failed.value) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: could not reserve 1 x {CPU: 1} (SPREAD) for the expansion search")
    assert err.count("\n") == 1


class _ModelOnADevice:
    """What `adapt` needs of a model to see where it lives: parameters on a device, and `to`."""

    def __init__(self):
        self.device = torch.device("cpu")

    def parameters(self):
        yield torch.zeros(1, device=self.device)

    def to(self, device):
        self.device = torch.device(device)
        return self


def test_adaptation_in_the_coordinator_on_ray_puts_the_model_back_where_it_was(monkeypatch):
    """`ray.adapt_on: coordinator` runs DeepSpeed in the coordinator's process, which moves the model onto its
    accelerator (a GPU where the node has one: with `use_gpu` no CPU accelerator is forced, and the coordinator
    actor sees the node's GPUs). The stages after it build CPU batches (the basis right after, in ADAPT):
    the model must come back, as `InProcessKernels.adapt` brings it back."""
    from dmea_dist.config import RayConfig
    from dmea_dist.distributed import kernels as ray_kernels_module
    from dmea_dist.distributed.kernels import RayKernels
    from dmea_dist.settings import decoding_settings, engine_settings

    config = config_from_dict(TASKS)

    def adapt_on_an_accelerator(model, job, **kwargs):
        model.to("meta")  # where DeepSpeed's engine leaves it (cuda:0 on a GPU node)
        return "result"

    monkeypatch.setattr(ray_kernels_module, "run_adapt_job", adapt_on_an_accelerator)
    kernels = RayKernels(tokenizer=None, max_length=64, engine=engine_settings(config),
                         decoding=decoding_settings(config), sizes=RayConfig(adapt_on="coordinator", use_gpu=True),
                         storage_path="unused")
    model = _ModelOnADevice()
    assert kernels.adapt(model, job=None) == "result"
    assert model.device == torch.device("cpu")


def test_a_run_the_coordinator_actor_cannot_build_fails_as_in_process_not_as_a_dead_actor(monkeypatch):
    """An error building the run in the actor (a damaged snapshot on resume) raised in `__init__` reached the
    driver as ActorDiedError, a traceback with exit code 1; in process it is one line with exit code 2. The
    actor now keeps it and raises it from its first call, where Ray hands the driver the error itself."""
    import dmea_dist.coordinator
    from dmea_dist.distributed.coordinator import CoordinatorActor
    from dmea_dist.state import StateError

    damaged = StateError("state/modules-3/modules.safetensors: damaged")

    def refuse(*args, **kwargs):
        raise damaged

    monkeypatch.setattr(dmea_dist.coordinator, "Coordinator", refuse)
    actor = CoordinatorActor(config_from_dict(TASKS), "/nowhere", resume=True, ranks=None)  # does not raise
    with pytest.raises(StateError) as err:
        actor.call("tracking")
    assert err.value is damaged
    assert actor.call("close") is None  # nothing was built: nothing to release


def test_the_driver_fails_a_run_whose_coordinator_was_never_built_without_offering_a_resume(tmp_path):
    """On Ray the factory returns before the actor has built the run; its error arrives at the first call.
    That call is made where a failure only closes the coordinator, as the in-process factory's error would:
    no "failed: ... continue with dmea resume" for a run that never started, and the same error raised."""
    from dmea_dist.driver import run_sequence
    from dmea_dist.state import StateError

    closed = []

    class Unbuilt:
        def __init__(self, *args, **kwargs):
            pass

        def tracking(self):
            raise StateError("damaged")

        def close(self):
            closed.append(True)

    said = []
    config = config_from_dict({**TASKS, "output_dir": str(tmp_path), "tracking": {"enabled": False}})
    with pytest.raises(StateError, match="damaged"):
        run_sequence(config, coordinator_factory=Unbuilt, progress=False, echo=said.append, check=False)
    assert closed == [True]
    assert not any("resume" in line for line in said)


def test_a_reservation_that_waits_says_on_what_before_it_gives_up(monkeypatch, capsys):
    """A cluster that cannot place a role's reservation was silent for the whole timeout (120 s by default),
    then failed: after a short wait a line now says what is waited for and what is free."""
    waits = []

    class Never(_UnplacedGroup):
        def wait(self, timeout_seconds):
            waits.append(timeout_seconds)
            return False

    monkeypatch.setattr(cluster, "placement_group", lambda bundles, strategy: Never())
    monkeypatch.setattr(cluster, "remove_placement_group", lambda pg: None)
    monkeypatch.setattr(cluster.ray, "available_resources", lambda: {"CPU": 0.0})
    monkeypatch.setattr(cluster.ray, "cluster_resources", lambda: {"CPU": 2.0})
    with pytest.raises(RuntimeError, match="could not reserve"):
        cluster.reserve(1, cpus=1.0, strategy="SPREAD", timeout_s=120, what="the expansion search")
    assert waits == [cluster.RESERVE_QUIET_S, 120 - cluster.RESERVE_QUIET_S]  # the same timeout in all
    err = capsys.readouterr().err
    assert err == ("waiting for 1 x {CPU: 1} (SPREAD) for the expansion search: the cluster has 0 of 2 CPUs free; "
                   "giving up after 120s\n")
