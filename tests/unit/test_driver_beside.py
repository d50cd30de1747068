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


def test_a_backbone_pretrained_in_a_thread_is_the_one_pretrained_in_the_main_thread():
    """The cache key does not say which thread pretrained: a thread must make the same weights, bit for bit
    (torch's thread count is per thread for OpenMP; `torch_threads` sets it in the thread that trains)."""
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel

    from dmea_dist.modeling.pretrain import pretrain_lm
    from dmea_dist.run import PRETRAIN_THREADS, torch_threads

    def pretrained() -> list[torch.Tensor]:
        torch.manual_seed(0)
        model = GPT2LMHeadModel(GPT2Config(vocab_size=97, n_positions=32, n_embd=32, n_layer=2, n_head=2))
        g = torch.Generator().manual_seed(1)
        ids = [torch.randint(1, 97, (20,), generator=g).tolist() for _ in range(64)]
        with torch_threads(PRETRAIN_THREADS):
            pretrain_lm(model, ids, steps=30, lr=3e-3, batch_size=16, seq_len=32, eos_id=0, seed=0)
        return [p.detach().clone() for p in model.parameters()]

    here, there = pretrained(), []
    worker = threading.Thread(target=lambda: there.append(pretrained()))
    worker.start()
    worker.join()
    assert all(torch.equal(a, b) for a, b in zip(here, there[0], strict=True))
