"""Time of one pretraining step of the quick start's tiny backbone, by threads and batch size.

The shape of `configs/quickstart.yaml`'s backbone (4 layers, d=64, 4 heads, 64-token windows) with a
vocabulary of 730 (its 600-token BPE plus the special and generation tokens), trained as
`modeling.pretrain.pretrain_lm` trains it (AdamW, clipping, no dropout). Each setting runs in a fresh process,
so its thread count is the process's own. It answers whether a cold quick start could pretrain faster on the
same cores: one process at 2 threads against one at 1 thread with half the batch (what each of two
data-parallel processes would do).

    python benchmarks/bench_pretrain_step.py
    python benchmarks/bench_pretrain_step.py --settings 2x32,1x32,1x16 --steps 50
    python benchmarks/bench_pretrain_step.py --settings 2x32 --variants fp32,bf16,fused,fp32   # alternating

Variants: fp32 (what pretrain_lm does), bf16 (the forward under CPU autocast to bfloat16: AVX-512 BF16 and
AMX do bf16 products in hardware), fused (AdamW's fused CPU kernel instead of its per-tensor loop).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys

# the quick start's backbone as dmea_dist.run.tiny_backbone builds it (its GELU is torch's fused tanh kernel
# since 22b55dd; GPT2Config's default, gelu_new, costs ~20% more a step), pretrained without dropout
MODEL = {"n_layer": 4, "n_embd": 64, "n_head": 4, "n_positions": 128, "activation_function": "gelu_pytorch_tanh",
         "resid_pdrop": 0.0, "embd_pdrop": 0.0, "attn_pdrop": 0.0}

STEP = r"""
import contextlib, json, sys, time, torch
from transformers import GPT2Config, GPT2LMHeadModel
threads, batch, steps, vocab = (int(a) for a in sys.argv[1:5])
variant = sys.argv[6]
torch.set_num_threads(threads)
torch.manual_seed(0)
cfg = GPT2Config(vocab_size=vocab, bos_token_id=0, eos_token_id=0, **json.loads(sys.argv[5]))
model = GPT2LMHeadModel(cfg)
model.loss_type = "ForCausalLM"
opt = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.01, fused=True if variant == "fused" else None)
autocast = (lambda: torch.autocast("cpu", dtype=torch.bfloat16)) if variant == "bf16" else contextlib.nullcontext
x = torch.randint(0, vocab, (batch, 64))
for i in range(steps + 10):
    if i == 10:
        start = time.perf_counter()
    with autocast():
        loss = model(input_ids=x, labels=x).loss
    opt.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    opt.step()
print((time.perf_counter() - start) / steps * 1000)
"""


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--settings", default="2x32,1x32,1x16", help="THREADSxBATCH, comma-separated")
    ap.add_argument("--steps", type=int, default=50, help="timed steps per setting (after 10 untimed)")
    ap.add_argument("--vocab", type=int, default=730)
    ap.add_argument("--variants", default="fp32", help="fp32, bf16 or fused, comma-separated, run in this order")
    args = ap.parse_args()
    variants = args.variants.split(",")
    unknown = sorted(set(variants) - {"fp32", "bf16", "fused"})
    if unknown:
        ap.error(f"--variants: unknown {unknown}; choose from fp32, bf16, fused")
    print("| threads | batch (64-token windows) | variant | ms per step |")
    print("| --- | --- | --- | --- |")
    for setting in args.settings.split(","):
        threads, batch = setting.split("x")
        for variant in variants:
            out = subprocess.run([sys.executable, "-c", STEP, threads, batch, str(args.steps), str(args.vocab),
                                  json.dumps(MODEL), variant],
                                 capture_output=True, text=True, check=True)
            print(f"| {threads} | {batch} | {variant} | {float(out.stdout.strip().splitlines()[-1]):.1f} |",
                  flush=True)


if __name__ == "__main__":
    main()
