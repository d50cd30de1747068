"""A CPU training step of a tiny DMEA model with torch's dropout against `dmea_dist.modeling.dropout`.

Usage: .venv/bin/python benchmarks/bench_dropout.py [--threads 1] [--reps 20] [--layers 4 --d-model 64]

The quick start's backbone shape (4 layers, d_model 64, 4 heads, GPT-2's dropout 0.1 everywhere), one
module per layer trained along a path, a batch of 16 padded sequences of up to 96 tokens (the quick start's
`model.max_length`). Three variants, repetitions interleaved after a warm-up, median step time each:

  torch     the backbone as transformers builds it: nn.Dropout and SDPA attention (dropout -> math path)
  dmea      what DMEAModel runs: dmea_dist.modeling.dropout (cheaper masks, explicit attention with dropout)
  no dropout  the same step with every rate at 0 (what dropout costs at all)

It also checks that evaluation computes the same bits either way (the module changes training steps only).
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from torch import nn


def _model(args, *, torch_dropout: bool, rate: float):
    from transformers import GPT2Config, GPT2LMHeadModel

    from dmea_dist.modeling.model import DMEAModel

    config = GPT2Config(vocab_size=args.vocab, n_positions=128, n_embd=args.d_model, n_layer=args.layers,
                        n_head=args.heads, resid_pdrop=rate, embd_pdrop=rate, attn_pdrop=rate,
                        activation_function="gelu_pytorch_tanh", bos_token_id=0, eos_token_id=0)
    torch.manual_seed(0)
    model = DMEAModel(GPT2LMHeadModel(config), bottleneck=args.d_model // 2)
    model.backbone.loss_type = "ForCausalLM"  # (transformers cannot tell it from the class name and warns)
    if torch_dropout:  # undo what DMEAModel installed
        for parent in model.backbone.modules():
            for name, child in list(parent.named_children()):
                if isinstance(child, nn.Dropout):
                    setattr(parent, name, nn.Dropout(child.p))
        model.backbone.config._attn_implementation = "sdpa"
    path = model.add_modules(generator=torch.Generator().manual_seed(0))
    model.set_trainable(path)
    return model, path


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--reps", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--d-model", type=int, default=64)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--vocab", type=int, default=620)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--seq", type=int, default=96)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)

    gen = torch.Generator().manual_seed(1)
    ids = torch.randint(0, args.vocab, (args.batch, args.seq), generator=gen)
    lengths = torch.randint(args.seq // 3, args.seq + 1, (args.batch,), generator=gen)
    mask = (torch.arange(args.seq)[None] < lengths[:, None]).long()
    labels = ids.masked_fill(mask == 0, -100)

    variants = {"torch": _model(args, torch_dropout=True, rate=0.1),
                "dmea": _model(args, torch_dropout=False, rate=0.1),
                "no dropout": _model(args, torch_dropout=False, rate=0.0)}
    optimizers = {name: torch.optim.AdamW([p for p in m.parameters() if p.requires_grad], lr=1e-3)
                  for name, (m, _) in variants.items()}

    def step(name):
        model, path = variants[name]
        model.train()
        loss = model(ids, attention_mask=mask, labels=labels, path=path).loss
        optimizers[name].zero_grad(set_to_none=True)
        loss.backward()
        optimizers[name].step()

    times: dict[str, list[float]] = {name: [] for name in variants}
    names = list(variants)
    for rep in range(args.warmup + args.reps):
        for name in names[rep % 3:] + names[:rep % 3]:
            start = time.perf_counter()
            step(name)
            if rep >= args.warmup:
                times[name].append(time.perf_counter() - start)

    fresh = {name: _model(args, torch_dropout=name == "torch", rate=0.1) for name in ("torch", "dmea")}
    with torch.no_grad():
        evals = [m.eval()(ids, attention_mask=mask, labels=labels, path=path).logits
                 for m, path in fresh.values()]
    print(f"{args.layers} layers, d_model {args.d_model}, {args.heads} heads, batch {args.batch} x {args.seq} "
          f"(padded), dropout 0.1, torch threads {torch.get_num_threads()}, {args.reps} reps after "
          f"{args.warmup} warm-up; one trainable module per layer")
    print("| variant | median step ms | quartiles ms |")
    print("| --- | --- | --- |")
    median = {}
    for name, ts in times.items():
        median[name] = statistics.median(ts)
        q1, _, q3 = statistics.quantiles(ts, n=4)
        print(f"| {name} | {median[name] * 1e3:.1f} | {q1 * 1e3:.1f}-{q3 * 1e3:.1f} |")
    print(f"torch / dmea: {median['torch'] / median['dmea']:.2f}x; dropout's share of a step: torch "
          f"{1 - median['no dropout'] / median['torch']:.0%}, dmea {1 - median['no dropout'] / median['dmea']:.0%}")
    print(f"evaluation logits identical: {torch.equal(evals[0], evals[1])}")


if __name__ == "__main__":
    main()
