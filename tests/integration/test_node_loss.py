"""A node lost mid-run on a simulated three-node cluster: the run completes on the node that is left.

The head (the driver and the coordinator actor) has no CPUs, so every worker
lives on the two worker nodes. After the first task the node that hosts the
generation pool is removed, as a crashed machine would be: the generation
pool, the training group and the search candidates must find their way to
the other node (a dead actor's call is redone on a fresh pool, a dead rank
restarts the group from its checkpoint), and the run ends with a full R
matrix. Its own module: a Cluster and a plain `ray.init` cannot share one process.
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
def cluster():
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 0})
    nodes = [cluster.add_node(num_cpus=2) for _ in range(2)]
    cluster.wait_for_nodes()
    from dmea_dist.distributed.coordinator import connect

    connect(cluster.address)
    yield cluster, nodes
    ray.shutdown()
    cluster.shutdown()


def test_the_run_survives_losing_the_node_of_its_workers(cluster, tmp_path):
    from dmea_dist.distributed.coordinator import ray_coordinator_factory

    cluster, nodes = cluster
    config = tiny_config(tmp_path, data={"tasks": ["synth.hotel.00", "synth.hotel.01"]}, tracking={"enabled": False},
                         ray={"num_generation_actors": 1, "generation_cpus": 1, "num_train_workers": 1,
                              "train_cpus": 0.5, "search_cpus": 0.5, "placement_strategy": "PACK"})
    lost = {}

    class LoseANode:
        """The coordinator, with a node removed right after the first task is recorded."""

        def __init__(self, inner):
            self.inner = inner

        def __getattr__(self, name):
            return getattr(self.inner, name)

        def step(self):
            out = self.inner.step()
            if out["record"] is not None and not lost:
                (generation_node,) = self.inner.placement()["generation"]
                victim = next(n for n in nodes if n.node_id == generation_node)
                cluster.remove_node(victim)
                lost["node"] = generation_node
            return out

        def close(self):
            lost["placement"] = self.inner.placement()  # where work ran, before the workers go
            return self.inner.close()

    def factory(cfg, run_dir, *, resume, progress=None):
        return LoseANode(ray_coordinator_factory(cfg, run_dir, resume=resume))

    result = run_sequence(config, run_dir=tmp_path / "run", progress=False, echo=lambda s: None,
                          coordinator_factory=factory)
    assert lost, "no node was removed"
    assert np.isfinite(result.R[np.tril_indices(2)]).all()
    alive = {n["NodeID"] for n in ray.nodes() if n["Alive"]}
    assert lost["node"] not in alive
    # the second task's generation and training ran again, on the surviving node: the pool and the group
    # were rebuilt there, not left pointing at the lost one
    survivor = {n.node_id for n in nodes} - {lost["node"]}
    assert survivor <= set(lost["placement"]["generation"]), lost["placement"]
    assert survivor <= set(lost["placement"]["train"]), lost["placement"]
