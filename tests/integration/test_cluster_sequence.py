"""A short sequence on a simulated two-node cluster (ray.cluster_utils.Cluster).

The driver joins the cluster like a submitted job would; the coordinator
spreads generation actors, search candidates and Ray Train workers over both
nodes, and the run completes with a full R matrix and its MLflow record.
Its own module: a Cluster and a plain `ray.init` cannot share one process.
"""

from __future__ import annotations

import numpy as np
import pytest
import ray  # a hard dependency: a broken install fails here, it does not skip
from ray.cluster_utils import Cluster

from dmea_dist.driver import run_sequence
from tests.integration.tiny_run import tiny_config

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def two_nodes():
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 2})
    cluster.add_node(num_cpus=2)
    cluster.wait_for_nodes()
    from dmea_dist.distributed.coordinator import connect

    connect(cluster.address)
    yield cluster
    ray.shutdown()
    cluster.shutdown()


def test_short_sequence_uses_both_nodes(two_nodes, tmp_path):
    from dmea_dist.distributed.coordinator import ray_coordinator_factory
    from dmea_dist.tracking import find_task_runs

    config = tiny_config(tmp_path, data={"tasks": ["synth.hotel.00", "synth.listops.00"]},
                         ray={"num_search_workers": 2, "search_cpus": 0.5, "num_generation_actors": 2,
                              "num_train_workers": 2, "train_cpus": 0.5, "placement_strategy": "SPREAD"})
    handles = []

    def factory(cfg, run_dir, *, resume, progress=None):
        handles.append(ray_coordinator_factory(cfg, run_dir, resume=resume))
        handles[-1].close = lambda: None  # keep the actor for the placement check below
        return handles[-1]

    result = run_sequence(config, run_dir=tmp_path / "run", progress=False, echo=lambda s: None,
                          coordinator_factory=factory)
    assert np.isfinite(result.R[np.tril_indices(2)]).all()
    placement = handles[0].placement()
    nodes = {n["NodeID"] for n in ray.nodes() if n["Alive"]}
    assert len(nodes) == 2
    assert set(placement["generation"]) == nodes, placement
    assert set(placement["train"]) == nodes, placement
    assert set(placement["search"]) == nodes, placement
    runs = find_task_runs(uri=config.tracking.uri, experiment=config.tracking.experiment,
                          parent_run_id=result.parent_run_id)
    assert [r["task_id"] for r in runs] == ["synth.hotel.00", "synth.listops.00"]
