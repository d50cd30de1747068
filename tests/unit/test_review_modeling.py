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
    import shutil

    from dmea_dist import serving
    from dmea_dist.modeling.io import save_path_modules
    from tests.conftest import REPO_ROOT

    def backbone(*args, **kwargs):
        return DMEAModel.from_config(tiny_gpt2_config, bottleneck=8, seed=0)

    model = backbone()
    path_a = model.add_modules(generator=torch.Generator().manual_seed(1))
    model.set_path("a", path_a)
    generator = torch.Generator().manual_seed(2)

    def train(path):
        with torch.no_grad():
            for param in model.trainable_parameters(path):
                param.add_(0.3 * torch.randn(param.shape, generator=generator))

    train(path_a)
    run_dir = tmp_path / "run"
    save_path_modules(model, "a", run_dir / "tasks/000-a/modules")
    new = model.add_modules(layers=[1, 2])
    model.set_path("b", [path_a[0], *new])  # shares layer 0 with a, and trains it
    train(model.path_of("b"))
    save_path_modules(model, "b", run_dir / "tasks/001-b/modules")
    shutil.copy(REPO_ROOT / "configs/quickstart.yaml", run_dir / "config.yaml")
    monkeypatch.setattr(serving, "_tokenizer", lambda directory: [None] * tiny_gpt2_config.vocab_size)
    monkeypatch.setattr(serving, "_backbone", backbone)
    monkeypatch.setattr(serving, "Formatter", lambda tokenizer, max_length: None)

    ids = torch.tensor([[5, 6, 7, 8]])
    with torch.no_grad():
        expected = model(ids, task_id="b").logits
        for tasks in (None, ["a"]):
            served = serving.load_task_model(run_dir, task="b", tasks=tasks)
            got = served.models["b"](ids, path=served.paths["b"]).logits
            torch.testing.assert_close(got, expected, rtol=0, atol=0)
