"""RayKernels on a two-node Ray cluster (ray.cluster_utils.Cluster, 1 CPU per node).

Its own module: a Cluster and a plain `ray.init` cannot share one process.
The run directory (tokenizer included) is deleted before any actor starts,
so the replicas must get everything through the object store, as on nodes
that cannot read the driver's disk. Checks: the two generation actors land on
the two nodes (SPREAD) and answer exactly as in-process; once the pool is shut down (its two CPUs are
the whole cluster), the two search candidates run on the two nodes and match
the in-process search.
"""

from __future__ import annotations

import copy
import shutil
import threading

import pytest
import torch

from dmea_dist.method import expansion

ray = pytest.importorskip("ray")
from ray.cluster_utils import Cluster  # noqa: E402

from dmea_dist.distributed.workers import RayKernels  # noqa: E402
from tests.integration.test_ray_workers import answer_requests, prepare  # noqa: E402

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def cluster():
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "resources": {"node_a": 1}})
    cluster.add_node(num_cpus=1, resources={"node_b": 1})
    cluster.wait_for_nodes()
    ray.init(address=cluster.address, include_dashboard=False, log_to_driver=False)
    yield cluster
    ray.shutdown()
    cluster.shutdown()


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("ray_cluster")
    yield prepare(root, pretrain_steps=20, train_steps=20)
    torch.set_num_threads(threads)


def test_actors_and_candidates_spread_over_both_nodes(cluster, env):
    shutil.rmtree(env.run.run_dir)  # nothing may be read from the driver's run directory
    env.run.model.engine_handle = threading.Lock()  # unpicklable, as after DeepSpeed: only a snapshot travels
    nodes = {n["NodeID"] for n in ray.nodes() if n["Alive"]}
    assert len(nodes) == 2
    kernels = RayKernels(env.run, num_search_workers=2, search_cpus=1, num_generation_actors=2, generation_cpus=1,
                         placement_strategy="SPREAD")
    try:
        requests = answer_requests(env.run.model, env.run)
        answers = kernels.answer_fn(env.run.model, requests)
        assert set(kernels.pool.node_ids()) == nodes  # one replica per node
        assert answers == env.executor._answer_in_process(env.run.model, requests)
    finally:
        kernels.shutdown()  # release the pool's CPUs for the search
    results = kernels.search_fn(env.model, env.jobs, env.common)
    assert set(kernels.search_nodes) == nodes
    reference = [expansion.search_candidate(copy.deepcopy(env.model), **job, **env.common) for job in env.jobs]
    for got, want in zip(results, reference, strict=True):
        assert got.path == want.path
        assert got.val_loss == pytest.approx(want.val_loss, abs=1e-6)
