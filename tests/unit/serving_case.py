"""A run folder of two recorded tasks that share a module, for the serving tests."""

from __future__ import annotations

import shutil

import torch

from dmea_dist.modeling.model import DMEAModel


def two_task_run(tiny_gpt2_config, tmp_path, monkeypatch):
    """(run folder, model) of tasks a and b, b reusing a's layer-0 module and training it further (as DMEA's
    expansion does when it reuses a module); `serving` is patched to build the backbone from the config.
    The model holds both tasks as trained: a's layer-0 module as b left it."""
    from dmea_dist import serving
    from dmea_dist.modeling.io import save_path_modules
    from tests.conftest import REPO_ROOT

    def backbone(*args, **kwargs):
        return DMEAModel.from_config(tiny_gpt2_config, bottleneck=8, seed=0)

    model = backbone()
    generator = torch.Generator().manual_seed(2)

    def train(path):
        with torch.no_grad():
            for param in model.trainable_parameters(path):
                param.add_(0.3 * torch.randn(param.shape, generator=generator))

    path_a = model.add_modules(generator=torch.Generator().manual_seed(1))
    model.set_path("a", path_a)
    train(path_a)
    run_dir = tmp_path / "run"
    save_path_modules(model, "a", run_dir / "tasks/000-a/modules")
    model.set_path("b", [path_a[0], *model.add_modules(layers=[1, 2])])
    train(model.path_of("b"))
    save_path_modules(model, "b", run_dir / "tasks/001-b/modules")
    shutil.copy(REPO_ROOT / "configs/quickstart.yaml", run_dir / "config.yaml")
    monkeypatch.setattr(serving, "_tokenizer", lambda directory: [None] * tiny_gpt2_config.vocab_size)
    monkeypatch.setattr(serving, "_backbone", backbone)
    monkeypatch.setattr(serving, "Formatter", lambda tokenizer, max_length: None)
    return run_dir, model
