"""The whole lifecycle on embedded Ray reproduces the in-process run (same seeds, same answers).

With one search worker, one generation actor and one Ray Train worker, every
stage computes exactly what it computes in process: the same candidate paths,
the same pseudo samples, the same trained weights, hence the same R matrix.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from dmea_dist.driver import run_sequence
from dmea_dist.run import torch_threads
from tests.integration.tiny_run import tiny_config

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def ray_local():
    import ray

    from dmea_dist.distributed.coordinator import connect

    connect(None, num_cpus=4)  # logical: the pool, the training group and search bundles take turns on 2 cores
    yield
    ray.shutdown()


def test_distributed_run_reproduces_the_in_process_run(tmp_path, ray_local):
    one_each = {"num_search_workers": 1, "num_generation_actors": 1, "num_train_workers": 1}
    events = []  # the driver's bars get the kernels' progress from inside the actor (the relay)
    local, distributed, placement = _in_process_and_on_ray(
        tiny_config(tmp_path, ray=one_each), tmp_path, relay=lambda what, done, total, **info: events.append(what))
    for stage, key in (("expand", "path"), ("select", "selected"), ("generate", "pseudo_samples")):
        assert _decisions(distributed, stage, key) == _decisions(local, stage, key), stage
    np.testing.assert_allclose(distributed.R, local.R, atol=1e-6, equal_nan=True)
    assert np.isfinite(distributed.R[np.tril_indices(3)]).all()
    assert {"search", "generate", "adapt", "evaluate"} <= set(events), sorted(set(events))
    # the work really ran on Ray: search tasks, the generation pool and the training group
    assert placement["search"] and placement["generation"] and placement["train"], placement
    # and each task's record holds those workers' peak memory: the replicas and the training live there, so the
    # coordinator's own figure leaves them out (a process that imported torch holds well over 100 MiB)
    workers = [h.get("worker_peak_rss_mib", {}) for h in distributed.history if h["stage"] == "record"]
    assert all(w.get("training", 0) > 100 and max(w.get("generation", 0), w.get("replicas", 0)) > 100
               for w in workers), workers
    assert max(workers[-1].get("search", 0), workers[-1].get("replicas", 0)) > 100, workers
    assert not any("worker_peak_rss_mib" in h for h in local.history)


def _in_process_and_on_ray(config, tmp_path, *, relay=None):
    """The same config run in process at one thread (as every Ray worker computes: same float reduction
    order) and on the embedded Ray; also where and on how many workers the Ray run's kernels ran (taken
    before the coordinator closes). `relay`: the kernels' progress callback instead of the driver's."""
    from dmea_dist.distributed.coordinator import ray_coordinator_factory

    with torch_threads(1):
        local = run_sequence(config, run_dir=tmp_path / "local", progress=False, echo=lambda s: None)
    placements = []

    def factory(cfg, run_dir, *, resume, progress=None):
        handle = ray_coordinator_factory(cfg, run_dir, resume=resume, progress=relay or progress)
        placement, close = handle.placement, handle.close
        handle.close = lambda: (placements.append(placement()), close())
        return handle

    distributed = run_sequence(config, run_dir=tmp_path / "ray", progress=False, echo=lambda s: None,
                               coordinator_factory=factory)
    return local, distributed, placements[-1]


def _decisions(result, stage, key):
    return [h[key] for h in result.history if h["stage"] == stage]


def test_results_do_not_depend_on_the_number_of_workers(tmp_path, ray_local):
    """2 search workers, 2 generation actors and 2 Ray Train ranks give the in-process run: the global batch
    is split over the ranks (dropout off: masks are drawn per rank), pseudo samples are seeded per piece.
    With model.token_rows "trained" (rows frozen on 2 ranks: the virtual-shards test below), so that the rows
    travel through every Ray kernel: see `_assert_token_rows`."""
    two_each = {"num_search_workers": 2, "search_cpus": 0.5, "num_generation_actors": 2, "generation_cpus": 0.5,
                "num_train_workers": 2, "train_cpus": 0.5}
    config = tiny_config(tmp_path, ray=two_each, model={"dropout": 0.0, "token_rows": "trained"})
    local, distributed, placement = _in_process_and_on_ray(config, tmp_path)
    assert (placement["train_ranks"], placement["generation_actors"]) == (2, 2), placement  # two of each served
    for stage, key in (("expand", "path"), ("select", "selected"), ("generate", "pseudo_samples"), ("adapt", "steps")):
        assert _decisions(distributed, stage, key) == _decisions(local, stage, key), stage
    # the same training, not only the same counts: every stream's last loss of every adaptation
    for two, one in zip(_decisions(distributed, "adapt", "final_losses"), _decisions(local, "adapt", "final_losses"),
                        strict=True):
        assert two == pytest.approx(one, rel=1e-5, abs=1e-6)
    np.testing.assert_allclose(distributed.R, local.R, atol=1e-6, equal_nan=True)
    _assert_token_rows(config, tmp_path)


def _assert_token_rows(config, tmp_path):
    """Each task trained the rows of the untrained tokens it was first to use (at least its generation token's),
    on Ray as in process, and no later task moved them."""
    tasks = config.data.tasks
    rows = {}
    for run in ("local", "ray"):
        # each task's own artifact (written right after it) and the last one (every task's rows, at the end)
        files = [next((tmp_path / run / "tasks").glob(f"{i:03d}-*/modules/modules.safetensors")) for i in range(3)]
        after_own, at_end = [load_file(str(f)) for f in files], load_file(str(files[-1]))
        backbone = load_file(str(tmp_path / run / "backbone" / "model.safetensors"))["transformer.wte.weight"]
        owned = []
        for i, task in enumerate(tasks):
            ids, trained = after_own[i][f"rows.{task}.ids"], after_own[i][f"rows.{task}.weight"]
            assert len(ids) > 0, task
            assert (trained - backbone[ids]).abs().max() > 1e-4, f"{task}'s rows did not train"
            assert torch.equal(at_end[f"rows.{task}.weight"], trained), f"a later task moved {task}'s rows"
            owned.append(set(ids.tolist()))
        assert not (owned[0] & owned[1] or owned[0] & owned[2] or owned[1] & owned[2]), owned
        rows[run] = at_end
    for key, tensor in rows["local"].items():
        torch.testing.assert_close(rows["ray"][key], tensor, rtol=1e-5, atol=1e-6)


def test_virtual_shards_train_two_ranks_bit_for_bit_like_one_with_dropout(tmp_path, ray_local):
    """With `train.virtual_shards` two training ranks give the in-process run's numbers exactly, dropout on:
    each fixed piece of a batch draws its own masks and the pieces are summed in one order (dmea_dist.engine)."""
    config = tiny_config(tmp_path, ray={"num_train_workers": 2, "train_cpus": 0.5}, train={"virtual_shards": 4},
                         model={"dropout": 0.1, "token_rows": "frozen"})
    local, distributed, placement = _in_process_and_on_ray(config, tmp_path)
    assert placement["train_ranks"] == 2, placement
    # not close: equal, down to the losses of every adaptation and the whole R matrix
    for stage, key in (("expand", "path"), ("generate", "pseudo_samples"), ("adapt", "final_losses")):
        assert _decisions(distributed, stage, key) == _decisions(local, stage, key), stage
    np.testing.assert_array_equal(distributed.R, local.R)
    assert np.isfinite(local.R[np.tril_indices(3)]).all()

