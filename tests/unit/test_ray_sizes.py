"""What a config's `ray:` section leaves unset is set by where the run is (RayConfig.sized, cluster.sized_for):
one search worker per core on an embedded Ray, 1 on a cluster; workers warm up where they have cores of their own;
Ray's dashboard starts where Ray Train needs its State API; search and generation share one pool of replicas
where the roles take turns on the same cores."""

import dataclasses

import pytest

from dmea_dist.config import RayConfig, config_from_dict
from dmea_dist.distributed import cluster
from dmea_dist.errors import ConfigError


def test_an_embedded_ray_runs_one_search_worker_per_core_and_keeps_the_thread_counts():
    sized = RayConfig().sized(local_cores=4)
    assert (sized.num_search_workers, sized.search_cpus) == (4, 1.0)
    # threads change floating-point results: generation and training keep their configured CPUs
    assert (sized.generation_cpus, sized.train_cpus) == (1.0, 1.0)
    assert RayConfig(search_cpus=2.0).sized(local_cores=5).num_search_workers == 2
    assert RayConfig(search_cpus=4.0).sized(local_cores=2).num_search_workers == 1  # never below one
    assert RayConfig(num_search_workers=3).sized(local_cores=8).num_search_workers == 3  # explicit stays


def test_on_a_cluster_an_unset_search_pool_has_one_worker():
    assert RayConfig().sized(local_cores=None).num_search_workers == 1


def test_sized_for_follows_the_address_and_ray_num_cpus(monkeypatch):
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    monkeypatch.setattr(cluster, "machine_cores", lambda: 6)
    assert cluster.sized_for(RayConfig(), None).num_search_workers == 6
    assert cluster.sized_for(RayConfig(num_cpus=2), None).num_search_workers == 2
    assert cluster.sized_for(RayConfig(), "auto").num_search_workers == 1
    monkeypatch.setenv("RAY_ADDRESS", "http://head:8265")  # inside `ray job submit`
    assert cluster.sized_for(RayConfig(), None).num_search_workers == 1


def test_logical_cpus_and_resume_overrides_use_the_sizes():
    sized = RayConfig().sized(local_cores=2)  # search and generation 2 x 1 (one pool), training 1 x 1
    assert sized.reserved_cpus() == 3.0 and cluster.logical_cpus(sized) >= 3
    assert cluster.size_overrides(RayConfig(), sized) == ["ray.num_search_workers=2", "ray.warm_up=False",
                                                          "ray.shared_replicas=True", "ray.dashboard=False"]
    assert cluster.size_overrides(sized, sized) == []
    separate = dataclasses.replace(sized, shared_replicas=False)  # search 2 x 1, generation 1 x 1, training 1 x 1
    assert separate.reserved_cpus() == 4.0 and cluster.logical_cpus(separate) >= 4


def test_search_and_generation_share_replicas_where_the_roles_take_turns():
    turns = RayConfig().sized(local_cores=2)
    assert turns.shared_replicas and turns.replicas() == 2  # max(2 search workers, 1 generation actor)
    assert turns.layout() == "search and generation 2 x 1 CPU (one pool), training 1 x 1"  # what `dmea run` prints
    assert RayConfig().sized(local_cores=None).layout() == "search 1 x 1 CPU, generation 1 x 1, training 1 x 1"
    assert RayConfig(num_generation_actors=3).sized(local_cores=2).replicas() == 3
    assert not RayConfig().sized(local_cores=None).shared_replicas  # a cluster: a pool each
    assert not RayConfig(num_search_workers=2).sized(local_cores=8).shared_replicas  # cores to spare
    # different CPUs (torch threads) per role: not shared unless asked, and asked, refused by key
    assert not RayConfig(search_cpus=0.5).sized(local_cores=2).shared_replicas
    assert RayConfig(shared_replicas=False).sized(local_cores=2).shared_replicas is False  # an explicit choice stays
    with pytest.raises(ConfigError, match=r"ray.search_cpus=0.5 and ray.generation_cpus=1 differ.*shared_replicas=false"):
        RayConfig(shared_replicas=True, search_cpus=0.5)


def test_workers_warm_up_where_they_have_cores_of_their_own():
    assert RayConfig().sized(local_cores=None).warm_up  # a cluster
    assert not RayConfig().sized(local_cores=2).warm_up  # every role on the same 2 cores: they take turns
    spare = RayConfig(num_search_workers=2).sized(local_cores=8)
    assert spare.reserved_cpus() == 4.0 and spare.warm_up
    assert not RayConfig(warm_up=False).sized(local_cores=None).warm_up  # an explicit choice stays
    assert RayConfig(warm_up=True).sized(local_cores=2).warm_up


def test_the_dashboard_starts_where_the_run_asks_its_state_api():
    assert not RayConfig().sized(local_cores=2).dashboard  # the training group needs no State API
    assert RayConfig(adapt_on="ray_train").sized(local_cores=2).dashboard  # Ray Train's cleaner asks it
    assert RayConfig(dashboard=True).sized(local_cores=2).dashboard  # an explicit choice stays
    assert not RayConfig(adapt_on="ray_train", dashboard=False).sized(local_cores=None).dashboard


def test_sizes_load_from_yaml_as_null_or_numbers_and_bad_ones_fail_by_key():
    base = {"data": {"tasks": ["synth.restaurant.00"]}}
    assert config_from_dict({**base, "ray": {"num_search_workers": None}}).ray.num_search_workers is None
    assert config_from_dict({**base, "ray": {"train_cpus": 3}}).ray.train_cpus == 3.0
    with pytest.raises(ConfigError, match="ray.num_search_workers"):
        config_from_dict({**base, "ray": {"num_search_workers": 0}})


def test_a_cluster_with_fewer_cpus_than_the_run_reserves_is_named_at_once_with_the_fixes():
    """On 2 CPUs the cluster's default layout (3 x 1 CPU) waits 120 s and fails; the job says so when it starts,
    naming the keys that fit it, rather than sitting silent for two minutes."""
    from dmea_dist.distributed.cluster import capacity_note

    sized = RayConfig().sized(local_cores=None)  # a cluster: search, generation and training 1 x 1 each
    note = capacity_note(sized, {"CPU": 2.0})
    assert note.startswith("the run reserves 3 CPUs") and "the cluster has 2" in note
    assert "ray.shared_replicas=true" in note and "ray job stop" in note and "120 s" in note
    four = RayConfig(num_train_workers=4, shared_replicas=True).sized(local_cores=None)
    note = capacity_note(four, {"CPU": 2.0})
    assert note.startswith("the run reserves 5 CPUs") and "ray.num_train_workers" in note
    assert "shared_replicas" not in note  # already shared
    assert capacity_note(RayConfig(shared_replicas=True).sized(local_cores=None), {"CPU": 2.0}) is None
    gpus = RayConfig(use_gpu=True, num_train_workers=2, shared_replicas=True).sized(local_cores=None)
    assert "2 GPUs" in capacity_note(gpus, {"CPU": 8.0, "GPU": 1.0})
