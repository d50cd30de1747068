"""The embedded Ray's State API answers for our cluster, also when another Ray cluster starts on the machine.

The cause of "Destroying worker since its placement group was removed" under a
live run: Ray Train's placement-group cleaner asks `ray.util.state.get_actor`
whether the training controller is alive; with no address it auto-detects
the cluster started most recently on the machine. Here a second cluster is
started in another process after ours; a task of ours then asks the State
API about one of our actors, as the cleaner does, and must find it alive
(without the pinned address it asks the newer cluster and finds nothing).
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pytest
import ray  # a hard dependency: a broken install fails here, it does not skip

pytestmark = pytest.mark.integration

OTHER_CLUSTER = """
import time
from ray.cluster_utils import Cluster
cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 0, "include_dashboard": True})
print("up", flush=True)
time.sleep(600)
"""


@ray.remote(num_cpus=0)
class Alive:
    def ping(self) -> str:
        return "pong"


@ray.remote(num_cpus=0)
def ask_state_api(actor_id: str):
    from ray.util.state import get_actor

    state = get_actor(actor_id)
    return os.environ.get("RAY_API_SERVER_ADDRESS"), state.state if state else None


def test_the_cleaner_s_question_is_answered_by_our_own_cluster():
    from dmea_dist.distributed.cluster import connect

    connect(None, num_cpus=2, dashboard=True)  # the State API is the dashboard's (`ray.dashboard`)
    other = None
    try:
        actor = Alive.remote()
        assert ray.get(actor.ping.remote()) == "pong"
        other = subprocess.Popen([sys.executable, "-c", OTHER_CLUSTER], stdout=subprocess.PIPE, text=True,
                                 start_new_session=True)
        assert other.stdout.readline().strip() == "up"
        time.sleep(2)
        address, state = ray.get(ask_state_api.remote(actor._actor_id.hex()))
        assert state == "ALIVE"  # found in our cluster; unpinned, the newer cluster answers and knows nothing
        assert address and address.startswith("http://127.0.0.1:")
    finally:
        if other is not None:
            os.killpg(other.pid, signal.SIGKILL)
            other.wait()
        ray.shutdown()
