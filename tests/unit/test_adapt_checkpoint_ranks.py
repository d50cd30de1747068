"""Two ranks (two processes, a gloo group) continue an adaptation from the same checkpoint, or both from 0.

Only rank 0 writes the progress file. On storage every node shares, both ranks see the checkpoint and
continue from it; on node-local disks rank 1 sees none, and a rank deciding alone would leave the ranks'
collectives out of step (a hang until the group's timeout), so both start again.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from dataclasses import asdict
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from dmea_dist.method.adapt_checkpoint import FORMAT, PROGRESS
from dmea_dist.method.adaptation import AdaptResult
from dmea_dist.state import write_json

RANK = """
import json, sys
from pathlib import Path
import torch.distributed as dist
from dmea_dist.method import adapt_checkpoint

rank, store, directory = int(sys.argv[1]), sys.argv[2], Path(sys.argv[3])
dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=2)
loaded = []

class Engine:
    def load_checkpoint(self, directory, tag):
        loaded.append(tag)

steps, _ = adapt_checkpoint.restore(Engine(), directory, digest="job", rank=rank, world=2)
print(json.dumps({"steps": steps, "loaded": loaded}))
dist.destroy_process_group()
"""


def _checkpoint(directory: Path, *, ranks: list[int], progress: bool) -> None:
    tag = directory / "step0000004"
    tag.mkdir(parents=True)
    for rank in ranks:
        save_file({"rng": torch.get_rng_state()}, str(tag / f"rng-rank{rank}.safetensors"))
    if progress:
        write_json(directory / PROGRESS, {"format": FORMAT, "digest": "job", "tag": tag.name, "steps": 4,
                                          "result": asdict(AdaptResult(steps=8))})


def _restore_on_two_ranks(tmp_path: Path, dirs: list[Path]) -> list[dict]:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    procs = [subprocess.Popen([sys.executable, "-c", RANK, str(rank), str(tmp_path / "store"), str(dirs[rank])],
                              env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for rank in (0, 1)]
    outs = []
    for proc in procs:
        out, err = proc.communicate(timeout=120)
        assert proc.returncode == 0, err[-2000:]
        outs.append(json.loads(out.strip().splitlines()[-1]))
    return outs


@pytest.mark.parametrize("storage", ["shared", "node_local"])
def test_ranks_continue_from_one_checkpoint_or_all_from_step_0(tmp_path, storage):
    if storage == "shared":
        shared = tmp_path / "run"
        _checkpoint(shared, ranks=[0, 1], progress=True)
        dirs = [shared, shared]
    else:  # each node its own disk: rank 0's holds the progress file, rank 1's only its own files
        dirs = [tmp_path / "node0", tmp_path / "node1"]
        _checkpoint(dirs[0], ranks=[0], progress=True)
        _checkpoint(dirs[1], ranks=[1], progress=False)
    outs = _restore_on_two_ranks(tmp_path, dirs)
    expected = {"steps": 4, "loaded": ["step0000004"]} if storage == "shared" else {"steps": 0, "loaded": []}
    assert outs == [expected, expected]


class _SGDEngine:
    """Engine fake: plain SGD on the job's parameters; checkpoints hold them (DeepSpeed's save/load contract)."""

    virtual_shards = 0

    def __init__(self, model, params):
        self.module, self.params, self.steps = model, list(params), 0

    def __call__(self, *args, **kwargs):
        return self.module(*args, **kwargs)

    def step(self, sub_batches, *, progress, scale, unscaled):
        from dmea_dist.engine import StepStats

        losses = {}
        for key, closure in sub_batches:
            loss = closure()
            loss.backward()
            losses[key] = float(loss.detach())
        with torch.no_grad():
            for p in self.params:
                if p.grad is not None:
                    p -= 0.5 * p.grad
                    p.grad = None
        self.steps += 1
        return StepStats(losses=losses, etas={}, clamped={}, sq_norms={}, matched_sq_norms={}, scaled=False)

    def save_checkpoint(self, directory, tag):
        (Path(directory) / tag).mkdir(parents=True, exist_ok=True)
        save_file({str(k): p.detach().clone() for k, p in enumerate(self.params)}, str(Path(directory) / tag / "p"))

    def load_checkpoint(self, directory, tag):
        from safetensors.torch import load_file

        saved = load_file(str(Path(directory) / tag / "p"))
        with torch.no_grad():
            for k, p in enumerate(self.params):
                p.copy_(saved[str(k)])


def tiny_job(config):
    """(model, job): one new path trained 2 epochs of 2 steps (a checkpoint after step 2), no scaling."""
    from dmea_dist.data.formatting import Example
    from dmea_dist.method.adaptation import AdaptJob
    from dmea_dist.modeling.model import DMEAModel

    model = DMEAModel.from_config(config, bottleneck=4, seed=0)
    path = model.add_modules(generator=torch.Generator().manual_seed(0))
    g = torch.Generator().manual_seed(1)
    examples = [Example(ids, [-100] + ids[1:]) for ids in (torch.randint(0, 90, (8,), generator=g).tolist()
                                                           for _ in range(8))]
    job = AdaptJob(sources=[("new", (examples, examples), path)], trainable=path, epochs=2, lm_lambda=0.25,
                   scale=False, progress="epochs", batch_size=4, pad_id=95, seed=0)  # 4 steps, a checkpoint at 2
    return model, job


def test_an_adaptation_stopped_after_a_checkpoint_continues_from_it(tmp_path, tiny_gpt2_config):
    """A job killed in its second epoch and started again on the same folder loads the epoch-1 checkpoint
    (weights and the result so far) and runs only the steps that were left: its losses are, step for step,
    those of a job that never stopped."""
    import copy

    from dmea_dist.method.adaptation import run_adapt_job

    model, job = tiny_job(tiny_gpt2_config)
    engines = []

    def factory(target, params):
        engines.append(_SGDEngine(target, params))
        return engines[-1]

    whole = run_adapt_job(copy.deepcopy(model), job, engine_factory=factory)

    def killed(done, total, **info):
        if done == 3:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        run_adapt_job(copy.deepcopy(model), job, engine_factory=factory, checkpoint_dir=tmp_path, on_step=killed)
    resumed = run_adapt_job(copy.deepcopy(model), job, engine_factory=factory, checkpoint_dir=tmp_path)
    assert resumed.resumed_from == 2 and engines[-1].steps == 2
    assert len(whole.losses["new"]) == 4
    assert resumed.losses["new"] == pytest.approx(whole.losses["new"], rel=1e-6)
    assert len(set(whole.losses["new"])) == 4  # the weights move: a resume that lost them would be seen
