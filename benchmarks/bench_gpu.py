"""Adaptation on one GPU: tokens/s and peak memory for gpt2 to gpt2-xl by ZeRO stage.

Usage (on a machine with a CUDA GPU; random initialisation, nothing is downloaded):

    python benchmarks/bench_gpu.py [--sizes gpt2,gpt2-medium,gpt2-large,gpt2-xl] [--stages 1,2,3]
        [--modes dmea,lamol] [--autocast bf16] [--batch 4] [--seq 128] [--warmup 2] [--steps 6]

Each cell runs the system's own adaptation, `run_adapt_job` with the DeepSpeed
engine and its gradient-scaled step (the code a training worker runs), on
synthetic examples of exactly `--seq` tokens:

  dmea   a path whose bottom half are new modules and top half a replayed task's
         modules; every step takes the new task, one knowledge-transfer stream
         (new path, unscaled) and one replayed task (its own path, scaled);
         only the path's modules train.
  lamol  the whole backbone trains (the lamol / finetune baselines); every step
         takes the new task and one replayed task, summed unscaled.

tokens/s counts every token through a forward and backward: per sub-batch the
QA and the LM sequence (`batch` x `seq` each). Peak is
torch.cuda.max_memory_allocated over the adaptation, with the model already
on the GPU ("resident" before it; ZeRO-3 trains a copy, as run_adapt_job
does). Each cell starts from a freed GPU; "left" is what stayed allocated
after the cell was freed (a leak shows there). `--budget-s` stops starting
new cells when the time is spent; skipped cells are listed.

On the CPU (`--device cpu`, DS_ACCELERATOR=cpu) the same script runs with
`--sizes tiny` as a smoke test.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import random
import sys
import time

import torch

SIZES = {  # n_embd, n_layer, n_head (GPT-2's released shapes)
    "tiny": (64, 4, 4),
    "gpt2": (768, 12, 12),
    "gpt2-medium": (1024, 24, 16),
    "gpt2-large": (1280, 36, 20),
    "gpt2-xl": (1600, 48, 25),
}
VOCAB = 50257 + 8  # GPT-2's vocabulary plus the reserved special tokens of a short run


def _examples(n: int, seq: int, vocab: int, rng: random.Random):
    from dmea_dist.data.formatting import IGNORE, Example

    qa, lm = [], []
    for _ in range(n):
        ids = [rng.randrange(vocab) for _ in range(seq)]
        qa.append(Example(ids, [IGNORE] * (seq // 2) + ids[seq // 2:]))
        lm.append(Example(ids, [IGNORE] + ids[1:]))
    return qa, lm


def _model(size: str, device: torch.device, seq: int):
    from transformers import GPT2Config

    from dmea_dist.modeling.model import DMEAModel

    n_embd, n_layer, n_head = SIZES[size]
    config = GPT2Config(vocab_size=VOCAB, n_positions=max(1024, seq), n_embd=n_embd, n_layer=n_layer,
                        n_head=n_head, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    with torch.device(device):
        model = DMEAModel.from_config(config, seed=0)
        old = model.add_modules()  # the replayed task's path
        bottom = list(range(n_layer // 2))
        new = model.add_modules(layers=bottom) + old[len(bottom):]
    return model.to(device), old, new


def _job(mode: str, args, old: list[int], new: list[int], steps: int, stage: int):
    from dmea_dist.config import deepspeed_config
    from dmea_dist.kernels import EngineSettings
    from dmea_dist.method.adaptation import AdaptJob

    rng = random.Random(0)
    new_data = _examples(args.batch * steps, args.seq, VOCAB, rng)
    other = _examples(args.batch * 2, args.seq, VOCAB, rng)
    if mode == "dmea":
        sources = [("new", new_data, new), ("transfer:a", other, new), ("replay:a", other, old)]
        trainable, scale = new, True
    else:
        sources = [("new", new_data, None), ("replay:a", other, None)]
        trainable, scale = None, False
    job = AdaptJob(sources=sources, trainable=trainable, epochs=1.0, lm_lambda=0.25, scale=scale,
                   progress="epochs", batch_size=args.batch, pad_id=0, seed=0, autocast=args.autocast)
    lr = 1.75e-4 if mode == "dmea" else 6.25e-5
    ds = deepspeed_config({"zero_optimization": {"stage": stage}}, lr=lr, weight_decay=0.01, eps=1e-6,
                          grad_clip=1.0, micro_batch=args.batch)
    return job, EngineSettings(ds_config=ds, clamp=(0.1, 10.0)), len(sources)


def _cell(size: str, mode: str, stage: int, args, device: torch.device) -> dict:
    from dmea_dist.method.adaptation import run_adapt_job

    steps = args.warmup + args.steps
    model, old, new = _model(size, device, args.seq)
    job, settings, n_sources = _job(mode, args, old, new, steps, stage)
    groups_per_step = n_sources  # one stream of each kind: alternate mixing takes every stream every step
    trainable = sum(p.numel() for p in model.trainable_parameters(new)) if mode == "dmea" else \
        sum(p.numel() for p in model.backbone.parameters())
    total = sum(p.numel() for p in model.parameters())
    stamps: list[float] = []

    def on_step(step, _total, **_):
        if device.type == "cuda":
            torch.cuda.synchronize()
        stamps.append(time.perf_counter())

    resident = _allocated(device)
    _reset_peak(device)
    start = time.perf_counter()
    result = run_adapt_job(model, job, engine_factory=settings.factory(), on_step=on_step)
    wall = time.perf_counter() - start
    peak = _peak(device)
    timed = stamps[args.warmup:]
    seconds = (timed[-1] - stamps[args.warmup - 1]) if args.warmup else (timed[-1] - start)
    tokens = len(timed) * groups_per_step * 2 * args.batch * args.seq
    losses = result.losses.get("new", [])
    del model, result
    return {"size": size, "mode": mode, "stage": stage, "autocast": args.autocast, "batch": args.batch,
            "seq": args.seq, "params": total, "trainable": trainable, "steps_timed": len(timed),
            "step_s": seconds / len(timed), "tokens_per_s": tokens / seconds, "resident_gib": resident / 2**30,
            "peak_gib": peak / 2**30, "wall_s": wall, "first_loss": losses[0] if losses else None,
            "last_loss": losses[-1] if losses else None}


def _allocated(device) -> int:
    return torch.cuda.memory_allocated() if device.type == "cuda" else 0


def _reset_peak(device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()


def _peak(device) -> int:
    return torch.cuda.max_memory_allocated() if device.type == "cuda" else 0


def _free(device) -> float:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return _allocated(device) / 2**30


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="gpt2,gpt2-medium,gpt2-large,gpt2-xl")
    parser.add_argument("--stages", default="1,2,3")
    parser.add_argument("--modes", default="dmea,lamol")
    parser.add_argument("--autocast", default="bf16", choices=["bf16", "none"])
    parser.add_argument("--batch", type=int, default=4, help="global batch per sub-batch (one rank)")
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--steps", type=int, default=6, help="timed steps after the warm-up")
    parser.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    parser.add_argument("--budget-s", type=float, default=float("inf"),
                        help="start no new cell after this many seconds")
    parser.add_argument("--json", default=None, help="also write the rows here (one JSON object per line)")
    args = parser.parse_args(argv)
    if args.warmup < 1 or args.steps < 1:
        parser.error("--warmup and --steps must be >= 1")
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        print("no CUDA GPU here; run with --device cpu --sizes tiny for a smoke test", file=sys.stderr)
        return 2
    if device.type == "cpu":
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    sizes, modes = args.sizes.split(","), args.modes.split(",")
    stages = [int(s) for s in args.stages.split(",")]
    for size in sizes:
        if size not in SIZES:
            parser.error(f"--sizes: {size!r} unknown; choose from {', '.join(SIZES)}")
    name = torch.cuda.get_device_name() if device.type == "cuda" else "cpu"
    print(f"device {name}; torch {torch.__version__}; autocast {args.autocast}; batch {args.batch} x seq "
          f"{args.seq} per sub-batch; {args.steps} timed steps after {args.warmup}", flush=True)
    header = (f"{'size':12s} {'mode':6s} {'ZeRO':>4s} {'params':>8s} {'trained':>8s} {'step ms':>8s} "
              f"{'tokens/s':>9s} {'resident':>9s} {'peak GiB':>9s} {'left':>6s} {'loss':>13s}")
    print(header, flush=True)
    began, skipped, failed = time.perf_counter(), [], []
    for size in sizes:
        for mode in modes:
            for stage in stages:
                if time.perf_counter() - began > args.budget_s:
                    skipped.append(f"{size}/{mode}/ZeRO{stage}")
                    continue
                try:
                    row = _cell(size, mode, stage, args, device)
                except Exception as err:  # noqa: BLE001 - one failed cell (out of memory, say) must not hide the rest
                    print(f"{size:12s} {mode:6s} {stage:4d}  failed: {type(err).__name__}: {err}"[:400], flush=True)
                    failed.append(f"{size}/{mode}/ZeRO{stage}")
                    _free(device)
                    continue
                row["left_gib"] = _free(device)
                print(f"{size:12s} {mode:6s} {stage:4d} {row['params'] / 1e6:7.1f}M {row['trainable'] / 1e6:7.2f}M "
                      f"{row['step_s'] * 1e3:8.1f} {row['tokens_per_s']:9.0f} {row['resident_gib']:9.2f} "
                      f"{row['peak_gib']:9.2f} {row['left_gib']:6.2f} "
                      f"{row['first_loss']:6.2f}>{row['last_loss']:6.2f}", flush=True)
                if args.json:
                    with open(args.json, "a") as f:
                        f.write(json.dumps(row) + "\n")
    if skipped:
        print(f"skipped (time budget): {', '.join(skipped)}")
    if failed:
        print(f"failed: {', '.join(failed)}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
