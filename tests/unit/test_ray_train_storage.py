"""A Ray Train call's folder under storage_path lives until the next call or `close()`, not for the run.

A fake `TorchTrainer` (the boundary) returns what `fit()` returns: a checkpoint written by
`write_adapt_checkpoint`, the call's folder and its filesystem. Without the cleanup a 50-task run keeps
50 folders of epoch checkpoints (optimizer state included).
"""

from __future__ import annotations

import types
from pathlib import Path

import pyarrow.fs
import torch
from ray.train import Checkpoint

from dmea_dist.distributed.train_workers import RayTrainAdapter, write_adapt_checkpoint
from dmea_dist.method.adaptation import AdaptResult
from dmea_dist.settings import EngineSettings


class FakeTrainer:
    """What `TorchTrainer.fit()` leaves: the call's folder with rank 0's checkpoint in it."""

    def __init__(self, storage: Path, name: str, weight: float):
        self.folder, self.weight = storage / name, weight

    def fit(self):
        checkpoint = self.folder / "checkpoint_000000"
        checkpoint.mkdir(parents=True)
        state = {"backbone": {"weight": torch.full((2, 2), self.weight), "bias": torch.zeros(2)}}
        write_adapt_checkpoint(checkpoint, trainable=None, state=state, result=AdaptResult(steps=1), world_size=1)
        return types.SimpleNamespace(checkpoint=Checkpoint.from_directory(str(checkpoint)), metrics={},
                                     path=str(self.folder), filesystem=pyarrow.fs.LocalFileSystem())


def test_each_call_removes_the_folder_of_the_one_before_and_close_the_last(tmp_path):
    storage = tmp_path / "storage"
    adapter = RayTrainAdapter(EngineSettings(ds_config={}, clamp=(0.1, 10.0)), num_workers=1, cpus_per_worker=1,
                              storage_path=storage)
    calls = iter([FakeTrainer(storage, "adapt-a", 1.0), FakeTrainer(storage, "adapt-b", 2.0)])
    adapter._trainer = lambda model, job: next(calls)
    model = types.SimpleNamespace(backbone=torch.nn.Linear(2, 2))
    job = types.SimpleNamespace(trainable=None)

    adapter(model, job)
    assert (storage / "adapt-a").is_dir() and torch.equal(model.backbone.weight, torch.full((2, 2), 1.0))
    adapter(model, job)  # the first call's result is in the model: its folder goes
    assert not (storage / "adapt-a").exists() and (storage / "adapt-b").is_dir()
    assert torch.equal(model.backbone.weight, torch.full((2, 2), 2.0))
    adapter.close()
    assert not (storage / "adapt-b").exists() and adapter.last_checkpoint is None
    adapter.close()  # twice is fine
