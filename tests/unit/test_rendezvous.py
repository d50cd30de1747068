"""The rendezvous of a process group (dmea_dist/rendezvous.py): rank 0's store holds its port from the start.

A port found free (bind port 0, close) and bound again later by rank 0 can be
taken in between by any process on the node; the group's start then failed
with EADDRINUSE. The two-rank case on Ray is in
tests/integration/test_ray_train.py (`..._port_taken_...`).
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import textwrap
from pathlib import Path

import dmea_dist
from dmea_dist.rendezvous import connect_store, open_store


def _bind(port: int) -> socket.socket | None:
    """A listening socket on `port` (every IPv4 interface), or None if the port is in use."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    try:
        sock.bind(("0.0.0.0", port))
    except OSError:
        sock.close()
        return None
    sock.listen()
    return sock


def test_the_store_holds_its_port_and_the_other_ranks_reach_it():
    store = open_store()
    assert store.port > 0
    assert _bind(store.port) is None  # no other process can take it while the store lives
    client = connect_store("127.0.0.1", store.port)
    client.set("rank1", "here")
    assert store.get("rank1") == b"here"


def test_a_one_rank_group_starts_though_the_port_it_was_offered_is_taken(tmp_path):
    """`build_engine` in a single process starts a one-rank group (engine._init_distributed). It took a port
    from `free_port` and DeepSpeed bound it later; here every port `free_port` hands out is taken at once by
    another socket (the race, made certain), and the group must start all the same. In a fresh process: the
    group is process-wide."""
    script = textwrap.dedent("""
        import os, socket
        import torch.distributed as dist
        from dmea_dist import engine, rendezvous

        thieves = []

        def taken_port():  # the port is free when handed out, and taken before the group binds it
            thief = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            thief.bind(("0.0.0.0", 0))
            thief.listen()
            thieves.append(thief)
            return thief.getsockname()[1]

        for module in (engine, rendezvous):
            module.free_port = taken_port
        os.environ.pop("WORLD_SIZE", None)
        engine._init_distributed(engine.import_deepspeed(), "gloo")
        assert dist.is_initialized() and dist.get_world_size() == 1
        assert int(os.environ["MASTER_PORT"]) not in [t.getsockname()[1] for t in thieves]
        print("group started")
    """)
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300,
                          cwd=tmp_path, env=_env())
    assert done.returncode == 0 and "group started" in done.stdout, done.stderr[-3000:]


def _env() -> dict[str, str]:
    root = str(Path(dmea_dist.__file__).resolve().parent.parent)
    return {**os.environ, "PYTHONPATH": os.pathsep.join([root, os.environ.get("PYTHONPATH", "")]),
            "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1"}
