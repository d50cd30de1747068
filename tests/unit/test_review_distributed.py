"""Review of dmea_dist/distributed: each test failed before its fix (sizes on an embedded Ray, the training group,
the generation and search pools, the coordinator actor's relay), with fakes at the Ray boundary."""

from __future__ import annotations

import pytest

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
