"""The expansion's initialisation decides: similarity and static (ACM) starts choose different paths.

A tiny random GPT-2 with one earlier task whose modules add noise to the new
task's hidden states, so the new task's data pulls every layer's mixture
towards the new module (which trains during the warm-up).
With the coefficients learning on the adapters' scale (a budget of about
lr * steps per logit), the path is decided by where the logits start.
"""

from __future__ import annotations

import copy

import pytest
import torch

from dmea_dist.data.formatting import BatchStream, Example
from dmea_dist.method import expansion
from dmea_dist.modeling.model import DMEAModel


@pytest.fixture
def setting(tiny_gpt2_config):
    model = DMEAModel.from_config(tiny_gpt2_config, bottleneck=8, seed=0)
    with torch.no_grad():  # a random tied head at std 0.02 caps every logit near 0: give it a usable scale
        model.backbone.transformer.wte.weight.mul_(50.0)
    model.set_path("a", model.add_modules(generator=torch.Generator().manual_seed(0)))
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():  # task a's modules: unrelated to the new task, they only perturb it
        for layer in range(model.n_layers):
            for adapter in (model.get_module(layer, 0).attn, model.get_module(layer, 0).mlp):
                adapter.up.weight.normal_(0.0, 3.0, generator=g)
    examples = []
    for _ in range(32):  # a fixed mapping the adapters can learn: answer = first token + 1
        x = torch.randint(0, 80, (6,), generator=g).tolist()
        ids = x + [90, x[0] + 1, 95]
        examples.append(Example(ids, [-100] * 7 + ids[7:]))
    train = BatchStream(examples, examples, batch_size=8, pad_id=95, seed="t")
    common = dict(candidate=0, train=train, val_batches=train.epoch(0), epochs=8, warmup_epochs=4,
                  entropy_weight=0.0, lr=3e-2, lm_lambda=0.0, seed=0)
    old = [model.module_ids(layer) for layer in range(model.n_layers)]
    return model, old, common


def _search(model, old, common, *, init, coefficient_lr, similarity=0.0, mix_ini=0.15):
    logits = expansion.initial_logits(old_modules=old, paths=model.paths, similarities={"a": similarity},
                                      beta=0.3, init=init, mix_ini=mix_ini)
    return expansion.search_candidate(copy.deepcopy(model), init=logits, coefficient_lr=coefficient_lr, **common)


def test_similarity_and_static_initialisation_choose_differently(setting):
    model, old, common = setting
    # budget: 16 trainable steps x 0.005 = ~0.08 per logit, a gap of ~0.16 can close
    unrelated = _search(model, old, common, init="similarity", coefficient_lr=5e-3, similarity=0.0)
    static = _search(model, old, common, init="static", coefficient_lr=5e-3)
    assert unrelated.n_new == model.n_layers, unrelated.logits  # starts level: the data's pull decides, new
    assert static.n_new == 0, static.logits  # starts 0.3 apart for the old module: stays there
    assert unrelated.path != static.path


def test_the_data_pulls_towards_the_new_module_given_budget(setting):
    """Control: the static start is not stuck for another reason; with a larger budget it moves too."""
    model, old, common = setting
    assert _search(model, old, common, init="static", coefficient_lr=5e-2).n_new == model.n_layers


def test_a_similar_task_keeps_its_modules(setting):
    model, old, common = setting
    related = _search(model, old, common, init="similarity", coefficient_lr=5e-3, similarity=0.9)
    assert related.n_new == 0, related.logits  # old 0.27, new -0.27: the budget cannot close it


def test_the_coefficients_stay_where_they_start_during_the_warm_up(setting):
    """ACM's schedule: the first warmup_epochs train the new modules only. A search that ends with the
    warm-up returns its initial logits unchanged; one that goes on moves them."""
    model, old, common = setting
    init = [x.tolist() for x in expansion.initial_logits(old_modules=old, paths=model.paths,
                                                          similarities={"a": 0.5}, beta=0.3)]
    frozen = _search(model, old, {**common, "epochs": 4}, init="similarity", coefficient_lr=5e-2, similarity=0.5)
    assert frozen.logits == init
    moved = _search(model, old, common, init="similarity", coefficient_lr=5e-2, similarity=0.5)
    assert max(abs(a - b) for x, y in zip(moved.logits, init, strict=True) for a, b in zip(x, y, strict=True)) > 1e-3


def test_the_entropy_penalty_sharpens_the_mixture(setting):
    """entropy_weight adds the mixtures' entropy to the loss: from the same level start, the penalised
    search ends with sharper mixtures (lower entropy) than the unpenalised one."""
    model, old, common = setting

    def entropy(result):
        return float(expansion.mixing_entropy([torch.tensor(x) for x in result.logits]))

    plain = _search(model, old, common, init="similarity", coefficient_lr=5e-2, similarity=0.0)
    penalised = _search(model, old, {**common, "entropy_weight": 1.0}, init="similarity", coefficient_lr=5e-2,
                        similarity=0.0)
    level = model.n_layers * float(torch.log(torch.tensor(2.0)))  # two choices per layer, level start
    assert entropy(penalised) < entropy(plain) - 0.05 * level, (entropy(penalised), entropy(plain), level)


def test_grad_clip_zero_means_no_clipping_in_the_search(setting):
    """train.grad_clip=0 turns clipping off (as in adaptation): the new modules train as with a bound no
    gradient reaches, bit for bit; clip_grad_norm_ at 0 would zero every gradient and leave them untrained."""
    model, old, common = setting
    off = _search(model, old, {**common, "grad_clip": 0.0}, init="similarity", coefficient_lr=5e-3)
    unbounded = _search(model, old, {**common, "grad_clip": 1e9}, init="similarity", coefficient_lr=5e-3)
    assert off.new_modules and off.new_modules.keys() == unbounded.new_modules.keys()
    for key, value in off.new_modules.items():
        assert torch.equal(value, unbounded.new_modules[key]), key
    ups = [v for k, v in off.new_modules.items() if k.endswith("up.weight")]
    assert ups and all(float(v.abs().max()) > 0 for v in ups)  # trained away from the zero start


def test_the_search_trains_with_the_answer_separators_weight(setting):
    """The search's training loss weights the separator as adaptation's does: on samples where it is a
    target, the same search with and without the weight ends with different coefficients."""
    model, old, common = setting
    g = torch.Generator().manual_seed(2)
    examples = []
    for _ in range(16):  # LM-style samples: the separator (90) is a target
        x = torch.randint(0, 80, (6,), generator=g).tolist()
        ids = x + [90, x[0] + 1, 95]
        examples.append(Example(ids, [-100] + ids[1:]))
    train = BatchStream(examples, examples, batch_size=8, pad_id=95, seed="t")
    common = {**common, "train": train, "val_batches": train.epoch(0), "epochs": 2, "warmup_epochs": 1}
    runs = [_search(model, old, {**common, "token_weights": weights}, init="static", coefficient_lr=5e-3)
            for weights in (None, {90: 5.0})]
    assert runs[0].logits != runs[1].logits


def test_coefficients_without_their_own_rate_train_at_the_adapters_rate(setting):
    """coefficient_lr None (the default) is ACM's: the logits in the adapters' AdamW at their rate, the
    same search as one given that rate explicitly, and not the same as one at another rate."""
    model, old, common = setting
    default = _search(model, old, common, init="similarity", coefficient_lr=None, similarity=0.5)
    same = _search(model, old, common, init="similarity", coefficient_lr=common["lr"], similarity=0.5)
    other = _search(model, old, common, init="similarity", coefficient_lr=common["lr"] / 3, similarity=0.5)
    assert default.logits == same.logits
    assert default.logits != other.logits
