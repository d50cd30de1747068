"""eval.all_tasks: unseen tasks are scored before they are trained, against the untrained backbone (FWT)."""

from __future__ import annotations

import numpy as np
import pytest

from dmea_dist.driver import run_sequence
from tests.integration.tiny_run import tiny_config

pytestmark = pytest.mark.integration


def test_forward_transfer_is_computed_and_reported(tmp_path):
    config = tiny_config(tmp_path, data={"tasks": ["synth.hotel.00", "synth.hotel.01"]},
                         eval={"all_tasks": True}, method={"name": "adapter"})
    printed = []
    result = run_sequence(config, run_dir=tmp_path / "run", progress=False, echo=printed.append)
    R = result.R
    assert np.isfinite(R).all()  # the upper triangle too: task 1 scored after task 0
    import json

    record = json.loads(next((tmp_path / "run" / "tasks").glob("000-*/record.json")).read_text())
    baseline = record["params"]["baseline_scores"]
    assert set(baseline) == {"synth.hotel.00", "synth.hotel.01"}
    assert result.metrics["fwt"] == pytest.approx(R[0, 1] - baseline["synth.hotel.01"])
    assert "fwt=" in "\n".join(printed)
    # the baseline is the bare backbone's score: computed again here with transformers' GPT-2 alone, one
    # greedy answer per test input, no modules, no batching
    assert baseline["synth.hotel.01"] == pytest.approx(_bare_backbone_score(config, tmp_path / "run",
                                                                            "synth.hotel.01"), abs=1e-6)


def _bare_backbone_score(config, run_dir, task: str) -> float:
    import torch
    from transformers import GPT2LMHeadModel

    from dmea_dist.data.formatting import Formatter
    from dmea_dist.data.registry import load_task
    from dmea_dist.data.tokenizer import load_tokenizer
    from dmea_dist.evaluation.metrics import score_task

    tokenizer = load_tokenizer(run_dir / "tokenizer")
    backbone = GPT2LMHeadModel.from_pretrained(run_dir / "backbone").eval()
    fmt = Formatter(tokenizer, max_length=config.model.max_length)
    rows = load_task(task, data_root=None, synth_seed=config.data.synth_seed,
                     synth_sizes=config.data.synth_sizes)["test"].to_list()[: config.eval.max_samples]
    answers = []
    for row in rows:
        prompt = torch.tensor([fmt.prompt_ids(row["context"], row["question"])])
        with torch.no_grad():
            out = backbone.generate(prompt, attention_mask=torch.ones_like(prompt), do_sample=False,
                                    max_new_tokens=config.eval.max_new_tokens, eos_token_id=fmt.special.eos,
                                    pad_token_id=fmt.special.pad,
                                    suppress_tokens=[fmt.special.ans, *fmt.special.tasks])
        answers.append(fmt.decode_answer(out[0, prompt.shape[1]:].tolist()))
    return score_task(config.eval.metric, answers, [r["answer"] for r in rows])["primary"]
