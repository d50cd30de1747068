"""Per-row routing: several tasks in one batch compute what each task's own batch computes."""

from __future__ import annotations

import pytest
import torch

from dmea_dist.modeling.model import DMEAModel


def _model(config) -> DMEAModel:
    """Three tasks sharing some modules: a: [0,0,0], b: [1,0,1], c: [1,2,2]; `up` made non-zero."""
    model = DMEAModel.from_config(config, bottleneck=8, seed=0).eval()
    for _ in range(3):
        model.add_modules()
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for pool in model.pools:
            for module in pool.values():
                for adapter in (module.attn, module.mlp):
                    adapter.up.weight.copy_(torch.randn(adapter.up.weight.shape, generator=generator) * 0.5)
    model.set_path("a", [0, 0, 0])
    model.set_path("b", [1, 0, 1])
    model.set_path("c", [1, 2, 2])
    return model


def _batch(n: int, vocab: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Left-padded prompts of different lengths (pad id 0 under a zero mask)."""
    generator = torch.Generator().manual_seed(2)
    ids = torch.randint(1, vocab - 1, (n, 9), generator=generator)
    mask = torch.ones_like(ids)
    for row in range(n):
        pad = row % 4
        ids[row, :pad], mask[row, :pad] = 0, 0
    return ids, mask


ROW_TASKS = ["b", "a", "c", "c", "a", "b", "b", "a"]


def test_per_row_logits_equal_per_task_forwards(tiny_gpt2_config):
    model = _model(tiny_gpt2_config)
    ids, mask = _batch(len(ROW_TASKS), tiny_gpt2_config.vocab_size)
    with torch.no_grad():
        mixed = model(ids, mask, paths=[model.path_of(t) for t in ROW_TASKS]).logits
        for task in "abc":
            rows = [i for i, t in enumerate(ROW_TASKS) if t == task]
            own = model(ids[rows], mask[rows], task_id=task).logits
            torch.testing.assert_close(mixed[rows], own, rtol=0, atol=1e-5)
            # and the paths matter: another task's path gives other logits for these rows
            other = model(ids[rows], mask[rows], task_id="a" if task != "a" else "c").logits
            assert (other - own).abs().max() > 1e-2


def test_rows_without_a_path_run_the_plain_backbone(tiny_gpt2_config):
    model = _model(tiny_gpt2_config)
    ids, mask = _batch(4, tiny_gpt2_config.vocab_size)
    with torch.no_grad():
        mixed = model(ids, mask, paths=[None, model.path_of("c"), None, model.path_of("a")]).logits
        plain = model(ids[[0, 2]], mask[[0, 2]]).logits
    torch.testing.assert_close(mixed[[0, 2]], plain, rtol=0, atol=1e-5)


def test_generate_with_per_row_paths_matches_per_task_generate(tiny_gpt2_config):
    model = _model(tiny_gpt2_config)
    ids, mask = _batch(len(ROW_TASKS), tiny_gpt2_config.vocab_size)
    args = dict(max_new_tokens=6, do_sample=False, pad_token_id=0, eos_token_id=tiny_gpt2_config.eos_token_id)
    mixed = model.generate(ids, attention_mask=mask, paths=[model.path_of(t) for t in ROW_TASKS], **args)
    for task in "abc":
        rows = [i for i, t in enumerate(ROW_TASKS) if t == task]
        own = model.generate(ids[rows], attention_mask=mask[rows], path=model.path_of(task), **args)
        assert mixed[rows].tolist() == own.tolist()


def test_route_batch_restores_the_previous_route_and_checks_sizes(tiny_gpt2_config):
    model = _model(tiny_gpt2_config)
    ids, mask = _batch(3, tiny_gpt2_config.vocab_size)
    with torch.no_grad(), model.route(model.path_of("c")):
        before = model(ids, mask).logits
        with model.route_batch([model.path_of("a"), model.path_of("b"), model.path_of("a")]):
            with pytest.raises(ValueError, match="set for 3 rows but the batch has 2"):
                model(ids[:2], mask[:2])
        torch.testing.assert_close(model(ids, mask).logits, before, rtol=0, atol=0)
    with pytest.raises(ValueError, match="one module id per layer"):
        with model.route_batch([[0, 0]]):
            pass
    with pytest.raises(ValueError, match="not several"):
        model(ids, mask, path=[0, 0, 0], paths=[[0, 0, 0]] * 3)


def test_left_padded_generate_equals_each_row_decoded_alone_without_padding_or_cache(tiny_gpt2_config):
    """An independent reference for batched evaluation: each row's prompt without its padding, decoded greedily
    by full forwards (no KV cache, positions from 0) along its own path. A batch that took position ids from
    the padded width instead of the attention mask, or routed a row along another row's path, differs."""
    model = _model(tiny_gpt2_config)
    with torch.no_grad():  # positions that matter to the argmax (at init they are too small to change it)
        model.backbone.transformer.wpe.weight.normal_(0.0, 1.0, generator=torch.Generator().manual_seed(3))
    ids, mask = _batch(len(ROW_TASKS), tiny_gpt2_config.vocab_size)
    eos, steps = tiny_gpt2_config.eos_token_id, 6
    out = model.generate(ids, attention_mask=mask, paths=[model.path_of(t) for t in ROW_TASKS], max_new_tokens=steps,
                         do_sample=False, pad_token_id=0, eos_token_id=eos)[:, ids.shape[1]:].tolist()
    for row, task in enumerate(ROW_TASKS):
        tokens = ids[row][mask[row].bool()].tolist()
        expected = []
        for _ in range(steps):
            with torch.no_grad():
                logits = model(torch.tensor([tokens + expected]), task_id=task).logits[0, -1]
            expected.append(int(logits.double().argmax()))
            if expected[-1] == eos:
                break
        assert out[row][:len(expected)] == expected, f"row {row} (task {task})"
