"""`dmea run` on Ray starts Ray while a first run's backbone pretrains (`driver.check_input(then=...)`)."""

from __future__ import annotations

import threading
import time

import pytest

from dmea_dist.driver import _beside


def test_then_runs_once_the_checks_pass_while_the_background_goes_on():
    events = []
    release = threading.Event()

    def background(checked):
        events.append("checked")
        checked()
        release.wait(5)  # the pretraining: still running while `then` works
        events.append("pretrained")

    def then():
        events.append("then")
        release.set()
        return "ray"

    assert _beside(background, then) == "ray"
    assert events == ["checked", "then", "pretrained"]  # returned only once the background is done too


def test_a_failed_check_stops_before_then():
    called = []

    def background(checked):
        raise ValueError("input too long")

    with pytest.raises(ValueError, match="input too long"):
        _beside(background, lambda: called.append(1))
    assert called == []


def test_a_failure_after_the_checks_is_raised_after_then():
    def background(checked):
        checked()
        time.sleep(0.05)
        raise RuntimeError("pretraining diverged")

    with pytest.raises(RuntimeError, match="diverged"):
        _beside(background, lambda: "ray")


def test_a_failure_of_then_does_not_wait_for_the_background():
    def background(checked):
        checked()
        time.sleep(30)

    started = time.perf_counter()
    with pytest.raises(ConnectionError):
        _beside(background, lambda: (_ for _ in ()).throw(ConnectionError("no Ray at that address")))
    assert time.perf_counter() - started < 5
