"""Cost of DMEA's gradient-scaled DeepSpeed step over a plain DeepSpeed step.

Usage: .venv/bin/python benchmarks/bench_grad_scaling.py [--stage 2] [--world-size 1] [--threads 1]
       [--transfer 1]

A self-contained GPT-2-like model (transformers GPT2LMHeadModel from a local
config, frozen) with bottleneck adapters after every block; per optimizer step
one sub-batch of the new task, `--transfer` knowledge-transfer sub-batches
(through the new task's path, unscaled) and two replayed tasks (each routed
along its own path, sharing only the top adapters with the others, so eta
uses matched norms). Three variants run side by side in one process, on
identical sub-batches and the same number of forward/backward passes:

  scaled   ScaledStepEngine.step(..., scale=True, unscaled=transfer keys)  (the method)
  summed   ScaledStepEngine.step(..., scale=False)  (the ablation: plain sum)
  plain    plain DeepSpeed accumulation: gradient_accumulation_steps = number of
           sub-batches, engine(x) / engine.backward(loss) / engine.step() per sub-batch

Repetitions are interleaved (the order rotates every repetition) after a
warm-up, and the median step time of each is reported with the ratios
scaled/plain and scaled/summed (target <= 1.05).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from functools import partial

import torch
from torch import nn

os.environ.setdefault("DS_ACCELERATOR", "cpu")

PATHS = ("new", "a", "b")  # each with its own bottom-half adapters


def _routes(n_transfer: int) -> dict[str, str]:
    """Group key -> path, in sub-batch order: new, transfer streams (new path), replayed tasks."""
    transfer = {f"transfer:{k}": "new" for k in range(n_transfer)}
    return {"new": "new", **transfer, "replay:a": "a", "replay:b": "b"}


class Adapter(nn.Module):
    def __init__(self, d_model: int, bottleneck: int):
        super().__init__()
        self.down = nn.Linear(d_model, bottleneck)
        self.up = nn.Linear(bottleneck, d_model)

    def forward(self, h):  # (batch, seq, d_model)
        return h + self.up(torch.relu(self.down(h)))


class AdaptedGPT2(nn.Module):
    """Frozen GPT-2 with one adapter per block along each route; routes share the top half."""

    def __init__(self, config, bottleneck: int):
        super().__init__()
        from transformers import GPT2LMHeadModel

        self.lm = GPT2LMHeadModel(config)
        self.lm.requires_grad_(False)
        n_layer = config.n_layer
        self.adapters = nn.ModuleDict({
            route: nn.ModuleList(Adapter(config.n_embd, bottleneck) for _ in range(n_layer // 2))
            for route in PATHS
        })
        self.shared = nn.ModuleList(Adapter(config.n_embd, bottleneck) for _ in range(n_layer - n_layer // 2))
        self.route = "new"
        for i, block in enumerate(self.lm.transformer.h):
            block.register_forward_hook(partial(self._adapt, i))

    def _adapt(self, layer, module, args, output):
        own = self.adapters[self.route]
        return own[layer](output) if layer < len(own) else self.shared[layer - len(own)](output)

    def forward(self, input_ids, route):  # input_ids: (batch, seq)
        self.route = route
        return self.lm(input_ids=input_ids, labels=input_ids).loss


def _ds_config(stage: int, gas: int) -> dict:
    return {
        "train_micro_batch_size_per_gpu": 4, "gradient_accumulation_steps": gas,
        "gradient_clipping": 1.0, "steps_per_print": 10**9,
        "optimizer": {"type": "AdamW", "params": {"lr": 1.75e-4, "eps": 1e-6, "weight_decay": 0.01,
                                                  "torch_adam": True}},
        "zero_optimization": {"stage": stage},
    }


def _models(args):
    from transformers import GPT2Config

    config = GPT2Config(vocab_size=args.vocab, n_positions=args.seq, n_embd=args.d_model,
                        n_layer=args.layers, n_head=args.heads)
    torch.manual_seed(0)
    first = AdaptedGPT2(config, args.d_model // 16)
    models = [first]
    for _ in range(2):
        model = AdaptedGPT2(config, args.d_model // 16)
        model.load_state_dict(first.state_dict())
        models.append(model)
    return models


def _engines(args, models):
    import deepspeed

    from dmea_dist.engine import build_engine

    trainable = [[p for p in m.parameters() if p.requires_grad] for m in models]
    scaled = build_engine(models[0], trainable[0], ds_config=_ds_config(args.stage, 1))
    summed = build_engine(models[1], trainable[1], ds_config=_ds_config(args.stage, 1))
    plain, *_ = deepspeed.initialize(model=models[2], model_parameters=trainable[2],
                                     config=_ds_config(args.stage, len(_routes(args.transfer))))
    return scaled, summed, plain


def _time_variants(args, rank, scaled_eng, summed_eng, plain_eng) -> dict[str, list[float]]:
    routes = _routes(args.transfer)
    unscaled = [key for key in routes if key.startswith("transfer:")]
    gen = torch.Generator().manual_seed(1 + rank)  # each rank its own data shard
    batches = {key: torch.randint(0, args.vocab, (4, args.seq), generator=gen) for key in routes}

    def run_scaled(eng, scale):
        sub = [(k, lambda x=x, r=routes[k]: eng(x, r)) for k, x in batches.items()]
        eng.step(sub, progress=0.5, scale=scale, unscaled=unscaled)

    def run_plain():
        for key, x in batches.items():
            plain_eng.backward(plain_eng(x, routes[key]))
            plain_eng.step()  # applies the update only at the accumulation boundary

    variants = {"scaled": partial(run_scaled, scaled_eng, True),
                "summed": partial(run_scaled, summed_eng, False), "plain": run_plain}
    times: dict[str, list[float]] = {name: [] for name in variants}
    names = list(variants)
    for rep in range(args.warmup + args.reps):
        order = names[rep % len(names):] + names[:rep % len(names)]
        for name in order:
            start = time.perf_counter()
            variants[name]()
            if rep >= args.warmup:
                times[name].append(time.perf_counter() - start)
    return times


def _bench(rank: int, args: argparse.Namespace, port: int) -> None:
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(args.world_size),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    if args.threads:
        torch.set_num_threads(args.threads)
    models = _models(args)
    n_trainable = sum(p.numel() for p in models[0].parameters() if p.requires_grad)
    n_total = sum(p.numel() for p in models[0].parameters())
    times = _time_variants(args, rank, *_engines(args, models))
    if rank != 0:
        return
    print(f"ZeRO {args.stage}, world size {args.world_size}, {args.layers} layers, d_model {args.d_model}, "
          f"seq {args.seq}, {len(_routes(args.transfer))} sub-batches of 4 per rank (new, "
          f"{args.transfer} transfer, 2 replay); trainable {n_trainable} of {n_total} parameters; "
          f"torch threads {torch.get_num_threads()}; {args.reps} reps after {args.warmup} warm-up")
    median = {name: statistics.median(ts) for name, ts in times.items()}
    for name, value in median.items():
        q1, _, q3 = statistics.quantiles(times[name], n=4)
        print(f"  {name:7s} median {value * 1e3:8.2f} ms  (quartiles {q1 * 1e3:.2f}-{q3 * 1e3:.2f})")
    print(f"  ratio scaled/plain  {median['scaled'] / median['plain']:.3f}  (target <= 1.05)")
    print(f"  ratio scaled/summed {median['scaled'] / median['summed']:.3f}")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--stage", type=int, default=2, choices=[1, 2, 3])
    parser.add_argument("--world-size", type=int, default=1, help="ranks, as local processes on gloo")
    parser.add_argument("--reps", type=int, default=30)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--d-model", type=int, default=256)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--seq", type=int, default=64)
    parser.add_argument("--vocab", type=int, default=2048)
    parser.add_argument("--transfer", type=int, default=1,
                        help="knowledge-transfer sub-batches per step (unscaled, through the new path)")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch threads per rank (1 gives steadier timings on a shared machine)")
    args = parser.parse_args(argv)

    from dmea_dist.rendezvous import free_port

    if args.world_size == 1:
        _bench(0, args, free_port())
    else:
        import torch.multiprocessing as mp

        mp.spawn(_bench, args=(args, free_port()), nprocs=args.world_size, join=True)


if __name__ == "__main__":
    sys.exit(main())
