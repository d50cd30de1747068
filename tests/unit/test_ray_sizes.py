"""Ray sizes left unset are set by where the run is: the machine's cores on an embedded Ray, 1 on a cluster."""

import pytest

from dmea_dist.config import RayConfig, config_from_dict
from dmea_dist.distributed import cluster
from dmea_dist.errors import ConfigError


def test_an_embedded_ray_gives_every_role_the_machines_cores():
    sized = RayConfig().sized(local_cores=4)
    assert (sized.num_search_workers, sized.search_cpus) == (4, 1.0)
    assert (sized.num_generation_actors, sized.generation_cpus) == (1, 4.0)
    assert (sized.num_train_workers, sized.train_cpus) == (1, 4.0)


def test_ranks_and_actors_share_the_cores_and_explicit_sizes_are_kept():
    sized = RayConfig(num_train_workers=2, num_generation_actors=4, search_cpus=2.0).sized(local_cores=8)
    assert sized.train_cpus == 4.0 and sized.generation_cpus == 2.0 and sized.num_search_workers == 4
    explicit = RayConfig(num_search_workers=1, train_cpus=0.5, generation_cpus=1.0).sized(local_cores=8)
    assert (explicit.num_search_workers, explicit.train_cpus, explicit.generation_cpus) == (1, 0.5, 1.0)
    assert RayConfig(num_train_workers=3).sized(local_cores=2).train_cpus == 1.0  # never below one CPU


def test_on_a_cluster_unset_sizes_are_one_each():
    sized = RayConfig().sized(local_cores=None)
    assert (sized.num_search_workers, sized.generation_cpus, sized.train_cpus) == (1, 1.0, 1.0)


def test_sized_for_follows_the_address_and_ray_num_cpus(monkeypatch):
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    monkeypatch.setattr(cluster, "machine_cores", lambda: 6)
    assert cluster.sized_for(RayConfig(), None).train_cpus == 6.0
    assert cluster.sized_for(RayConfig(num_cpus=2), None).train_cpus == 2.0
    assert cluster.sized_for(RayConfig(), "auto").train_cpus == 1.0
    monkeypatch.setenv("RAY_ADDRESS", "http://head:8265")  # inside `ray job submit`
    assert cluster.sized_for(RayConfig(), None).train_cpus == 1.0


def test_logical_cpus_and_resume_overrides_use_the_sizes():
    sized = RayConfig().sized(local_cores=2)  # search 2 x 1, generation 1 x 2, training 1 x 2
    assert cluster.logical_cpus(sized) >= 6
    assert cluster.size_overrides(RayConfig(), sized) == ["ray.num_search_workers=2", "ray.generation_cpus=2.0",
                                                          "ray.train_cpus=2.0", "ray.warm_up=False"]
    assert cluster.size_overrides(sized, sized) == []


def test_workers_warm_up_where_they_have_cores_of_their_own():
    assert RayConfig().sized(local_cores=None).warm_up  # a cluster
    assert not RayConfig().sized(local_cores=2).warm_up  # every role on the same 2 cores: they take turns
    spare = RayConfig(num_search_workers=1, generation_cpus=1, train_cpus=1).sized(local_cores=4)
    assert spare.reserved_cpus() == 3.0 and spare.warm_up
    assert not RayConfig(warm_up=False).sized(local_cores=None).warm_up  # an explicit choice stays
    assert RayConfig(warm_up=True).sized(local_cores=2).warm_up


def test_sizes_load_from_yaml_as_null_or_numbers_and_bad_ones_fail_by_key():
    base = {"data": {"tasks": ["synth.restaurant.00"]}}
    assert config_from_dict({**base, "ray": {"train_cpus": None}}).ray.train_cpus is None
    assert config_from_dict({**base, "ray": {"train_cpus": 3}}).ray.train_cpus == 3.0
    with pytest.raises(ConfigError, match="ray.num_search_workers"):
        config_from_dict({**base, "ray": {"num_search_workers": 0}})
