"""Pseudo-sample generation throughput: the batched generator vs one sample per `generate` call.

Same model, same path, same prompt (a task's generation token), same top-k
sampling and token budget; both sides run interleaved in one process and
the script prints samples/s of each and their ratio (target >= 5x).

    .venv/bin/python benchmarks/bench_generation.py [--samples 64] [--batch 32] [--layers 4 --width 128]
        [--requests 40 --per-request 1]

Second table: one generate call of `--requests` small requests (one task each,
`--per-request` samples, half of them on a second path), as ACM makes late in
a long sequence: all of them in one call (pieces shared across tasks,
`kernels.run_generate_requests`) against one call per request, as before
batching across tasks; seconds per call and the ratio.

The model is a randomly initialised GPT-2 with one module per layer, so no
sample ends early on either side: every sample costs the full token budget.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from transformers import GPT2Config

from dmea_dist.data.formatting import Formatter
from dmea_dist.data.tokenizer import train_bpe_tokenizer
from dmea_dist.kernels import DecodingSettings, GenerateRequest, run_generate_requests
from dmea_dist.method.generation import generate_pseudo_samples
from dmea_dist.modeling.model import DMEAModel


def one_at_a_time(model, formatter, *, path, n, top_k, max_new_tokens) -> int:
    special = formatter.special
    for _ in range(n):
        prompt = torch.tensor([[special.tasks[0]]])
        model.generate(prompt, path=path, attention_mask=torch.ones_like(prompt), do_sample=True, top_k=top_k,
                       max_new_tokens=max_new_tokens, eos_token_id=special.eos, pad_token_id=special.pad)
    return n


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--samples", type=int, default=64)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--width", type=int, default=128)
    parser.add_argument("--max-new-tokens", type=int, default=48)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--requests", type=int, default=40, help="small requests in the second table (0: skip)")
    parser.add_argument("--per-request", type=int, default=1)
    args = parser.parse_args()

    texts = [f"inform(name='place {i}';area='north') place {i} is in the north" for i in range(200)]
    tokenizer = train_bpe_tokenizer(texts, vocab_size=500, max_tasks=max(4, args.requests))
    config = GPT2Config(vocab_size=len(tokenizer), n_positions=256, n_embd=args.width, n_layer=args.layers,
                        n_head=4, bos_token_id=tokenizer.eos_token_id, eos_token_id=tokenizer.eos_token_id)
    model = DMEAModel.from_config(config, seed=0).eval()
    path = model.add_modules()
    formatter = Formatter(tokenizer, max_length=args.max_new_tokens + 1)
    # the same forbidden-eos budget on both sides: random weights rarely emit eos early
    common = dict(path=path, top_k=20, max_new_tokens=args.max_new_tokens)

    # warm-up of both sides: a first batched call pays more than a first single one (one run of
    # --repeats 1 --samples 16 measured 8.2 samples/s batched, against ~120 once warm)
    one_at_a_time(model, formatter, n=2, **common)
    generate_pseudo_samples(model, formatter, task_id="t", task_index=0, n=min(args.samples, args.batch),
                            batch_size=args.batch, max_rounds=1, seed=0, **common)
    batched, single = [], []
    for _ in range(args.repeats):  # interleaved, so drift in machine load hits both sides
        start = time.perf_counter()
        out = generate_pseudo_samples(model, formatter, task_id="t", task_index=0, n=args.samples,
                                      batch_size=args.batch, max_rounds=1, seed=0, **common)
        batched.append(out.generated / (time.perf_counter() - start))
        start = time.perf_counter()
        done = one_at_a_time(model, formatter, n=max(4, args.samples // 8), **common)
        single.append(done / (time.perf_counter() - start))
    b, s = statistics.median(batched), statistics.median(single)
    print(f"model: {args.layers} layers, d_model {args.width}, {args.max_new_tokens} new tokens, top-k 20, "
          f"threads {torch.get_num_threads()}")
    print(f"batched generator (batch {args.batch}): {b:8.1f} samples/s")
    print(f"one sample per generate call:  {s:8.1f} samples/s")
    print(f"speed-up: {b / s:.1f}x (target >= 5x)")
    if args.requests:
        many_small_requests(model, formatter, args, path)


def many_small_requests(model, formatter, args, path) -> None:
    other = model.add_modules(layers=[0])  # a second path: the first layer's new module
    second = [other[0], *path[1:]]
    requests = [GenerateRequest(task_id=f"t{k}", task_index=k, path=path if k % 2 else second,
                                n=args.per_request, seed=0) for k in range(args.requests)]
    decoding = DecodingSettings(batch_size=args.batch)
    one_call, per_request = [], []
    for _ in range(args.repeats):  # interleaved
        start = time.perf_counter()
        together = run_generate_requests(model, formatter, requests, decoding)
        one_call.append(time.perf_counter() - start)
        start = time.perf_counter()
        alone = [run_generate_requests(model, formatter, [r], decoding)[0] for r in requests]
        per_request.append(time.perf_counter() - start)
    t, a = statistics.median(one_call), statistics.median(per_request)
    made = (sum(o.generated for o in together), sum(o.generated for o in alone))
    print(f"{args.requests} requests of {args.per_request} sample(s), batch {args.batch}; sequences generated "
          f"{made[0]} (one call) and {made[1]} (per request)")
    print(f"one call for all requests:   {t:8.2f} s")
    print(f"one call per request:        {a:8.2f} s")
    print(f"speed-up: {a / t:.1f}x")


if __name__ == "__main__":
    main()
