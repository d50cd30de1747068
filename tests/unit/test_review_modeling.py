"""Review findings in dmea_dist/modeling (and what loads its files): each test shows one bug, fixed."""

from __future__ import annotations

import torch
from transformers import GPT2LMHeadModel

from dmea_dist.modeling.model import DMEAModel


def test_growing_a_checkpoint_keeps_the_untrained_tokens_it_recorded(tiny_gpt2_config, tmp_path):
    """A run's own backbone (tokens 80-94 untrained, recorded in its config) grown for a tokenizer with more
    tokens: the old untrained rows are still untrained and must stay claimable, beside the new ones."""
    tiny_gpt2_config.dmea_untrained_tokens = list(range(80, 95))
    GPT2LMHeadModel(tiny_gpt2_config).save_pretrained(tmp_path / "backbone")
    model = DMEAModel.from_pretrained(str(tmp_path / "backbone"), vocab_size=100)
    assert model.untrained_tokens == [*range(80, 95), *range(96, 100)]
    model.add_modules()
    assert model.claim_token_rows("t", [3, 81, 97]) == [81, 97]


def test_serving_tasks_named_in_any_order_gives_each_task_its_recorded_modules(tiny_gpt2_config, tmp_path,
                                                                               monkeypatch):
    """Task b reuses task a's layer-0 module and trains it further; each task's folder holds its modules as
    recorded. Asking for b (and a beside it) loaded a's stale copy of the shared module over b's: b then
    answered with weights it never had."""
    from dmea_dist import serving
    from tests.unit.serving_case import two_task_run

    run_dir, model = two_task_run(tiny_gpt2_config, tmp_path, monkeypatch)
    ids = torch.tensor([[5, 6, 7, 8]])
    with torch.no_grad():
        expected = model(ids, task_id="b").logits
        for tasks in (None, ["a"]):
            served = serving.load_task_model(run_dir, task="b", tasks=tasks)
            got = served.models["b"](ids, path=served.paths["b"]).logits
            torch.testing.assert_close(got, expected, rtol=0, atol=0)
