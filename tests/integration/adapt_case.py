"""One tiny DMEA adaptation job through the DeepSpeed engine, on the CPU or a GPU.

Used by tests/integration/test_engine.py (engines are released) and
tests/integration/test_gpu.py. DeepSpeed fixes its accelerator once per
process and the suite forces the CPU one, so the GPU side runs as a child:

    DS_ACCELERATOR=cuda python -m tests.integration.adapt_case OUT.pt [--stages 1,2,3]

writes {stage: adapt_tiny(stage, "cuda")} to OUT.pt.
"""

from __future__ import annotations

import argparse
import random

import torch


def tiny_case(stage: int, device: str, *, rows: bool = False):
    """(model, job, engine settings): a new path (bottom layers new, top reused from a trained old task)
    with one knowledge-transfer and one replayed stream, scaled. `rows`: tokens 80-94 count as untrained
    and the new task trains the rows of those its data uses (model.token_rows "trained")."""
    from transformers import GPT2Config

    from dmea_dist.config import deepspeed_config
    from dmea_dist.data.formatting import IGNORE, Example
    from dmea_dist.kernels import EngineSettings
    from dmea_dist.method.adaptation import AdaptJob
    from dmea_dist.modeling.model import DMEAModel

    config = GPT2Config(vocab_size=96, n_positions=64, n_embd=32, n_layer=4, n_head=4, resid_pdrop=0.0,
                        embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=95, eos_token_id=95)
    model = DMEAModel.from_config(config, seed=0)
    gen = torch.Generator().manual_seed(0)
    old = model.add_modules(generator=gen)
    with torch.no_grad():  # the replayed task's modules are trained ones, not the identity
        for p in model.trainable_parameters(old):
            p.add_(0.1 * torch.randn(p.shape, generator=gen))
    new = model.add_modules(layers=[0, 1], generator=gen) + old[2:]
    model.to(device)

    rng = random.Random(0)

    def examples(n: int, answer_from: int):
        qa, lm = [], []
        for _ in range(n):
            length = rng.randrange(10, 20)
            ids = [rng.randrange(90) for _ in range(length)]
            qa.append(Example(ids, [IGNORE] * answer_from + ids[answer_from:]))
            lm.append(Example(ids, [IGNORE] + ids[1:]))
        return qa, lm

    sources = [("new", examples(16, 6), new), ("transfer:a", examples(8, 4), new), ("replay:a", examples(8, 4), old)]
    if rows:
        model.backbone.config.dmea_untrained_tokens = list(range(80, 95))
        model.claim_token_rows("b", {t for example in sources[0][1][1] for t in example.input_ids})
    job = AdaptJob(sources=sources, trainable=new, epochs=1.0, lm_lambda=0.25, scale=True, progress="epochs",
                   batch_size=4, pad_id=95, seed=0, rows="b" if rows else None)
    zero = {"stage": stage}
    if rows and stage == 3:  # every parameter really partitioned: the rows must be gathered where they are used
        zero["stage3_param_persistence_threshold"] = 0
    ds = deepspeed_config({"zero_optimization": zero}, lr=1e-2, weight_decay=0.0, eps=1e-6,
                          grad_clip=1.0, micro_batch=4)
    return model, job, EngineSettings(ds_config=ds, clamp=(0.1, 10.0))


def adapt_tiny(stage: int, device: str) -> dict:
    """Run `tiny_case`: the trained modules (CPU tensors), the etas and losses per step."""
    from dmea_dist.method.adaptation import run_adapt_job, trained_state

    model, job, settings = tiny_case(stage, device)
    result = run_adapt_job(model, job, engine_factory=settings.factory())
    return {"modules": trained_state(model, job.trainable)["modules"], "etas": result.etas,
            "losses": result.losses, "device": str(next(model.parameters()).device)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out")
    parser.add_argument("--stages", default="1,2,3")
    args = parser.parse_args()
    torch.save({int(s): adapt_tiny(int(s), "cuda") for s in args.stages.split(",")}, args.out)


if __name__ == "__main__":
    main()
