"""What a config's `ray:` section leaves unset is set by where the run is (RayConfig.sized, cluster.sized_for):
one search worker per core on an embedded Ray, 1 on a cluster; workers warm up where they have cores of their own;
Ray's dashboard starts where Ray Train needs its State API."""

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
    sized = RayConfig().sized(local_cores=2)  # search 2 x 1, generation 1 x 1, training 1 x 1
    assert sized.reserved_cpus() == 4.0 and cluster.logical_cpus(sized) >= 4
    assert cluster.size_overrides(RayConfig(), sized) == ["ray.num_search_workers=2", "ray.warm_up=False",
                                                          "ray.dashboard=False"]
    assert cluster.size_overrides(sized, sized) == []


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
