"""How a run stops: Ctrl-C, SIGTERM and SIGHUP while the driver drives it (`dmea_dist.driver._drive`).

- Ctrl-C once stops after the stage in progress, the state saved; twice stops at once.
- SIGTERM (`kill`, `ray job stop`, a scheduler) and SIGHUP (a closed terminal, a dropped ssh connection) stop at
  once, and the command exits with 128 + the signal, as a shell reports a command the signal killed.
- Whatever stopped it, the stop is recorded (the state marked, the MLflow runs ended KILLED) before the command
  exits: presses and signals that arrive while it is recorded are taken for the same stop.
- Before a run is driven, and in the commands that drive none, SIGTERM and SIGHUP end the command by SystemExit
  (`exit_on_termination`), so that what it half made is cleaned up on the way out.
"""

from __future__ import annotations

import os
import signal
import stat
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress
from typing import Any


class StopRequest:
    """Ctrl-C once: stop after the stage in progress (state saved). Twice: stop now. SIGTERM or SIGHUP: stop now
    (`on_termination`)."""

    def __init__(self):
        self.requested = False
        self.signal: signal.Signals | None = None  # the SIGTERM or SIGHUP that stopped the run
        self._recording = False

    @contextmanager
    def on_sigint(self, echo: Callable[[str], None]) -> Iterator[None]:
        def handler(signum, frame):
            if self.requested:
                raise KeyboardInterrupt
            self.requested = True
            echo("\nCtrl-C: stopping after the stage in progress (Ctrl-C again to stop at once)")

        try:
            previous = signal.signal(signal.SIGINT, handler)
        except ValueError:  # not the main thread: no handler, Ctrl-C stops at once
            yield
            return
        try:
            yield
        finally:
            signal.signal(signal.SIGINT, previous)

    @contextmanager
    def on_termination(self) -> Iterator[None]:
        """SIGTERM (`kill`, `ray job stop`, a scheduler) and SIGHUP (the terminal closed, ssh dropped) stop the run
        at once, as a second Ctrl-C does, and the command exits with 128 + the signal, as a shell reports a command
        the signal killed. A signal ignored when the command started (`nohup`) stays ignored.

        SIGHUP's default killed the driver on the spot: the state said "running", the MLflow parent run stayed
        RUNNING. On Ray, this replaces Ray's driver handler for SIGTERM (`sys.exit(15)`, which `ray.get` turns
        into SystemExit(1)) and the C++ one Ray's core worker installs beneath it, which printed `*** SIGTERM
        received ...` and a stack (ray/_private/worker.py `init`; Ray's logging.cc): `signal.signal` sets
        Python's own handler in the process again. A second signal, or one while a stop or failure is recorded
        (`recording`), is taken for the same stop: the handler stays in place once one has stopped the run.
        """
        def handler(signum, frame):
            if self.signal is not None:
                return
            self.signal = signal.Signals(signum)
            if signum == signal.SIGHUP:
                mute_lost_output()
            if not self._recording:
                raise SystemExit(128 + signum)

        replaced = _on_termination_signals(handler)
        try:
            yield
        except BaseException as err:
            if self.signal is None:
                raise
            raise SystemExit(128 + self.signal) from err  # not Ray's SystemExit(1), nor a failure it cut short
        finally:
            if self.signal is None:
                for signum, previous in replaced.items():
                    signal.signal(signum, previous)

    @contextmanager
    def recording(self) -> Iterator[None]:
        """While a stop or failure is recorded: Ctrl-C held off (`ctrl_c_grace`), a SIGTERM or SIGHUP noted for the
        exit status but not raised into the record."""
        self._recording = True
        try:
            with ctrl_c_grace():
                yield
        finally:
            self._recording = False


def mute_lost_output() -> None:
    """After a hangup: stdout and stderr to /dev/null where they are a terminal or a pipe. The terminal is gone (a
    write, Python's flush at exit too, raises EIO) and a pipe's reader (`| tee run.log`) had the same SIGHUP
    (BrokenPipeError). Either broke the stop's record or ended the command in a traceback. A file (`> run.log`)
    keeps what follows, the stop's line."""
    for stream in (sys.stdout, sys.stderr):
        with suppress(AttributeError, OSError, ValueError):  # no file behind it (pytest's), closed
            if not stat.S_ISREG(os.fstat(stream.fileno()).st_mode):
                to_devnull(stream)


def to_devnull(stream) -> None:
    """What `stream` writes from now on, and its flush at exit, goes to /dev/null: its reader is gone."""
    devnull = os.open(os.devnull, os.O_WRONLY)
    try:
        os.dup2(devnull, stream.fileno())
    finally:
        os.close(devnull)


GRACE_S = 3.0  # Ctrl-C presses this soon after a stop began are taken for the same stop


@contextmanager
def ctrl_c_grace(seconds: float = GRACE_S) -> Iterator[None]:
    """Ignore Ctrl-C for `seconds` from now (in the main thread), then let it interrupt again.

    For the moments a stop is recorded (the state marked, the MLflow runs ended, the workers released: well under
    a second) and the command exits (Ray's shutdown): a user pressing Ctrl-C again and again cut them short, which
    left the parent run RUNNING, said nothing of how to resume, printed Ray's shutdown traceback and left Ray's
    agents behind. A press after `seconds` (the tracking server hangs) still stops at once.
    """
    previous = hold_off_ctrl_c(seconds)
    try:
        yield
    finally:
        if previous is not None:
            signal.signal(signal.SIGINT, previous)


def hold_off_ctrl_c(seconds: float = GRACE_S) -> Any:
    """Ctrl-C ignored for `seconds` from now, then a KeyboardInterrupt again (`ctrl_c_grace`); the handler it
    replaced, None off the main thread (where none can be set). `dmea run` and `dmea resume` call it as they exit."""
    started = time.monotonic()

    def handler(signum, frame):
        if time.monotonic() - started >= seconds:
            raise KeyboardInterrupt

    try:
        return signal.signal(signal.SIGINT, handler)
    except ValueError:
        return None


@contextmanager
def exit_on_termination() -> Iterator[None]:
    """SIGTERM and SIGHUP end the command by SystemExit(128 + the signal), not by their default action (the process
    gone on the spot), so that the `finally` blocks on the way out run: the backbone cache's private folder a cold
    run's pretraining writes for ~45 s, a `dmea generate`'s downloaded run in /tmp, were left behind. A signal
    ignored at the start (`nohup`) stays ignored. Inside, Ray's driver handler (set by `ray.init`) and then
    `StopRequest.on_termination` (while a run is driven) take over; a handler they leave in place stays."""
    def handler(signum, frame):
        if signum == signal.SIGHUP:
            mute_lost_output()
        raise SystemExit(128 + signum)

    replaced = _on_termination_signals(handler)
    try:
        yield
    finally:
        for signum, previous in replaced.items():
            if signal.getsignal(signum) is handler:
                signal.signal(signum, previous)


def _on_termination_signals(handler: Callable[[int, Any], None]) -> dict[int, Any]:
    """`handler` for SIGTERM and SIGHUP, except one ignored (`nohup`), which stays ignored; returns the handlers it
    replaced. Off the main thread none can be set (nor does Ray set any there): nothing is replaced."""
    replaced = {}
    with suppress(ValueError):
        for signum in (signal.SIGTERM, signal.SIGHUP):
            if signal.getsignal(signum) is not signal.SIG_IGN:
                replaced[signum] = signal.signal(signum, handler)
    return replaced
