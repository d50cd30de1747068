"""Where the ranks of a torch process group meet: rank 0's TCPStore, on a port it holds from the start.

The common recipe, a "free" port found by binding port 0 and closing the
socket, then handed to `init_process_group` (MASTER_PORT, tcp://host:port)
for rank 0 to bind again, leaves a window between the close and that bind in
which any process on the node can take the port. The group's start then fails
("The server socket has failed to listen on any local network address ...
EADDRINUSE"), or the other ranks connect to whoever took it. On a busy node
(Ray workers each starting a one-rank group, a second run beside this one) the
window is hit.

Here rank 0 opens its TCPStore on port 0 (`open_store`): the OS picks a free
port, the store listens on it (on every interface) before anyone learns its
number, and holds it as long as the store lives (the process group keeps it).
The other ranks connect to it (`connect_store`), and every rank passes its
store to `init_process_group(store=...)`. This is torch's own tcp://
rendezvous (torch/distributed/rendezvous.py `_create_c10d_store`: rank 0
hosts the TCPStore, the others are its clients) with the port chosen by the
bind instead of before it.

torch is imported in the functions: `free_port` serves the driver, which
starts Ray before it imports torch.
"""

from __future__ import annotations

import socket
from datetime import timedelta
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from torch.distributed import TCPStore

# How long a rank waits for the store and for its peers to register: torch's default process-group timeout,
# what its tcp:// rendezvous gave the store (rendezvous.py `_tcp_rendezvous_handler`).
STORE_TIMEOUT = timedelta(minutes=30)


def open_store(timeout: timedelta = STORE_TIMEOUT) -> TCPStore:
    """Rank 0's store, listening on a port the OS picked (`store.port`), which no other process can take
    while the store lives. Returns at once (no waiting for the other ranks)."""
    import torch.distributed as dist

    # host_name is where rank 0's own client reaches the server, which listens on every interface
    return dist.TCPStore("127.0.0.1", 0, is_master=True, wait_for_workers=False, timeout=timeout)


def connect_store(host: str, port: int, timeout: timedelta = STORE_TIMEOUT) -> TCPStore:
    """A client of the store rank 0 opened (`open_store`) at `host`:`port`."""
    import torch.distributed as dist

    return dist.TCPStore(host, port, is_master=False, timeout=timeout)


def free_port() -> int:
    """A TCP port on 127.0.0.1 that is free now, for a server that takes only a port number (Ray's dashboard,
    tests' `mp.spawn` groups). Another process may take it before that server binds it: a process group's
    rendezvous uses `open_store`, which holds its port from the start."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])
