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
