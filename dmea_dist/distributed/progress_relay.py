"""Adaptation progress from a training rank to the driver's progress bar.

Rank 0 of a training job (a `TrainGroup` rank or a Ray Train worker) puts
(steps done, total, {"loss": ...}) on a `ray.util.queue.Queue` at most twice a
second and at the last step (`throttled`); the process that waits for the job
drains the queue into its `Progress` ("adapt", done, total, loss=...) while
it waits (`ProgressRelay`). The queue is one small actor (no CPU) on the
driver's node, made at the first job and kept for the relay's life, so a
lost worker node does not take it along.
"""

from __future__ import annotations

import threading
import time

import ray


def throttled(queue, every_s: float = 0.5):
    """An `on_step` that puts (done, total, info) on `queue` at most every `every_s` and at the last step."""
    if queue is None:
        return None
    last = [0.0]

    def on_step(done: int, total: int, **info: float) -> None:
        now = time.monotonic()
        if now - last[0] >= every_s or done >= total:
            last[0] = now
            queue.put_nowait((done, total, info))

    return on_step


class ProgressRelay:
    """Drains rank 0's queue into `progress`; `queue()` is what rank 0 gets."""

    def __init__(self, progress):
        self.progress = progress
        self._queue = None

    def queue(self):
        if self._queue is None:
            from ray.util.queue import Queue
            from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

            here = NodeAffinitySchedulingStrategy(node_id=ray.get_runtime_context().get_node_id(), soft=True)
            self._queue = Queue(actor_options={"num_cpus": 0, "scheduling_strategy": here})
        return self._queue

    def drain(self) -> None:
        while self._queue is not None and not self._queue.empty():
            done, total, info = self._queue.get_nowait()
            self.progress("adapt", done, total, **info)

    def around(self, call):
        """`call()` in this thread while a second thread drains the queue every half second; then the rest."""
        stop = threading.Event()

        def relay() -> None:
            while not stop.wait(0.5):
                self.drain()

        thread = threading.Thread(target=relay, name="adapt-progress", daemon=True)
        thread.start()
        try:
            return call()
        finally:
            stop.set()
            thread.join()
            self.drain()

    def shutdown(self) -> None:
        if self._queue is not None:
            self._queue.shutdown()
            self._queue = None
