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
import ray  # a hard dependency: a broken install fails here, it does not skip
from ray.cluster_utils import Cluster

from dmea_dist.kernels import run_search_job
from dmea_dist.run import torch_threads
from tests.integration.test_ray_workers import answer_requests, prepare, ray_kernels

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
    with torch_threads(1):  # the reference runs on one core, as each Ray worker does
        yield prepare(tmp_path_factory.mktemp("ray_cluster"), pretrain_steps=20, train_steps=20)


def tmp_path_factory_dir(env):
    return env.run.run_dir.parent / "_ray_train"  # not under the run directory, which the test removes


def test_actors_and_candidates_spread_over_both_nodes(cluster, env):
    shutil.rmtree(env.run.run_dir)  # nothing may be read from the driver's run directory
    env.run.model.engine_handle = threading.Lock()  # unpicklable, as after DeepSpeed: only a snapshot travels
    nodes = {n["NodeID"] for n in ray.nodes() if n["Alive"]}
    assert len(nodes) == 2
    kernels = ray_kernels(env.run, tmp_path_factory_dir(env), num_search_workers=2, search_cpus=1,
                          num_generation_actors=2, generation_cpus=1, placement_strategy="SPREAD")
    try:
        requests = answer_requests(env.run.model, env.run)
        answers = kernels.answer(env.run.model, requests)
        assert set(kernels.pool.node_ids()) == nodes  # one replica per node
        assert answers == env.reference.answer(env.run.model, requests)
    finally:
        kernels.close()  # release the pool's CPUs for the search
    results = kernels.search(env.model, env.jobs, env.data)
    assert kernels.placement.search == nodes
    reference = [run_search_job(copy.deepcopy(env.model), job, env.data) for job in env.jobs]
    for got, want in zip(results, reference, strict=True):
        assert got.path == want.path
        assert got.val_loss == pytest.approx(want.val_loss, abs=1e-6)
