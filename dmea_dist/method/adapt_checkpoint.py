"""Checkpoints of an adaptation in progress, so that a stopped one continues step for step.

A checkpoint is a folder:

    <dir>/step0000040/          the engine's own checkpoint (trainable weights and optimizer
                                state, no frozen backbone: `ScaledStepEngine.save_checkpoint`)
    <dir>/step0000040/rng-rank<r>.safetensors   each rank's torch RNG, CPU and (on a GPU) CUDA (dropout masks)
    <dir>/adapt_progress.json   which step folder is complete, the steps done, the result so far,
                                and a digest of the job it belongs to

`adapt_progress.json` is written last and atomically, after every rank has
saved and fsynced its files (`barrier`, `files.sync_tree`), so it only ever
names a complete folder, a machine crash included; older folders are
removed after it. Batches are a pure function of (seed, step) (`BatchStream`,
`step_plan`), so weights, optimizer, RNG and the step are all a continuation
needs: the resumed job trains exactly the steps the uninterrupted one would.
A checkpoint of another job (changed data, path, epochs, world size) is
ignored and the job starts from step 0.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import warnings
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from dmea_dist.files import sync_tree
from dmea_dist.method.adaptation import AdaptJob, AdaptResult, cuda_in_use
from dmea_dist.state import read_json, write_json

PROGRESS = "adapt_progress.json"
FORMAT = "dmea-adapt-progress"


def job_digest(job: AdaptJob, *, world_size: int) -> str:
    """A fingerprint of everything that decides the job's steps (its data, paths, settings, world size)."""
    h = hashlib.sha256()
    # virtual_shards, rows and scopes left out at their defaults: a checkpoint written before they existed
    # still matches
    settings = {k: v for k, v in asdict(job).items()
                if k != "sources" and not (k in ("virtual_shards", "rows", "scopes") and not v)}
    h.update(json.dumps({**settings, "world_size": world_size}, sort_keys=True, default=str).encode())
    for key, (qa, lm), path in job.sources:
        h.update(json.dumps([key, path, len(qa)]).encode())
        for example in (*qa, *lm):
            h.update(json.dumps(example.input_ids).encode())
    return h.hexdigest()


def save(engine, directory: Path, *, digest: str, steps: int, result: AdaptResult, rank: int,
         barrier: Callable[[], None] | None = None) -> None:
    """Every rank calls this at the same step (a collective at ZeRO); rank 0 declares it complete."""
    tag = f"step{steps:07d}"
    engine.save_checkpoint(directory, tag=tag)
    rng = {"rng": torch.get_rng_state()}
    if cuda_in_use():  # on a GPU dropout draws from the device's generator, not the CPU one
        rng["cuda_rng"] = torch.cuda.get_rng_state()
    save_file(rng, str(directory / tag / f"rng-rank{rank}.safetensors"))
    if barrier is not None:
        barrier()  # every rank's files are written before any rank syncs them
    sync_tree(directory / tag)  # each rank its node's files: durable before the progress file names them
    if barrier is not None:
        barrier()  # every rank's files are on disk before the progress file names them
    if rank == 0:
        write_json(directory / PROGRESS, {"format": FORMAT, "digest": digest, "tag": tag, "steps": steps,
                                          "result": asdict(result)})
    if barrier is not None:
        barrier()  # the progress file names the new folder before anyone removes the old ones
    for old in directory.glob("step*"):  # each rank its own (ranks on other nodes have their own folders)
        if old.is_dir() and old.name != tag:
            shutil.rmtree(old, ignore_errors=True)


def restore(engine, directory: Path, *, digest: str, rank: int, world: int = 1) -> tuple[int, AdaptResult | None]:
    """(steps done, result so far) of this job's checkpoint in `directory`, loaded into `engine`; (0, None).

    With several ranks (a process group up) every rank continues from the same checkpoint or none does:
    each says which complete checkpoint of this job it sees, and unless all name the same one, all start
    from step 0. Only rank 0 writes the progress file, so ranks on other nodes see it only where the run
    directory is shared storage; a rank deciding alone would leave the ranks' collectives out of step.
    """
    progress = read_progress(directory)
    seen = None
    if progress is not None and progress.get("digest") == digest and \
            (Path(directory) / progress["tag"] / f"rng-rank{rank}.safetensors").is_file():
        seen = progress["tag"]
    if world > 1 and torch.distributed.is_available() and torch.distributed.is_initialized():
        views: list[str | None] = [None] * world
        torch.distributed.all_gather_object(views, seen)
        if len(set(views)) > 1:
            if rank == 0:
                warnings.warn(f"adaptation checkpoint {seen} in {directory} is not seen alike by every rank "
                              f"({views}: a run directory on node-local disks?); the adaptation starts again "
                              f"from step 0. Put output_dir on storage every node shares to continue from it",
                              stacklevel=2)
            return 0, None
    if seen is None:
        return 0, None
    engine.load_checkpoint(directory, tag=progress["tag"])
    rng = directory / progress["tag"] / f"rng-rank{rank}.safetensors"
    states = load_file(str(rng))
    torch.set_rng_state(states["rng"])
    if "cuda_rng" in states and cuda_in_use():  # the engine is built: a GPU rank's CUDA is up
        torch.cuda.set_rng_state(states["cuda_rng"])
    return int(progress["steps"]), AdaptResult(**progress["result"])


def read_progress(directory: Path) -> dict[str, Any] | None:
    file = Path(directory) / PROGRESS
    if not file.is_file():
        return None
    data = read_json(file)
    return data if data.get("format") == FORMAT else None
