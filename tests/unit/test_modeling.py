"""DMEAModel: routing, mixing, freezing, generation, capture, save/load.

Every numerical check compares against `manual_forward`, a from-scratch GPT-2
forward in float64 written with plain tensor ops over the backbone's weights
(Conv1D weights are (in, out)), with the adapter increments added by hand.
"""

from __future__ import annotations

import copy
import hashlib
import json
import math

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from transformers import GPT2LMHeadModel

from dmea_dist.modeling.adapters import mixing_weights
from dmea_dist.modeling.io import (
    ModuleFileError,
    load_modules,
    load_path_modules,
    save_backbone,
    save_modules,
    save_path_modules,
)
from dmea_dist.modeling.model import DMEAModel

ATOL = 1e-10


@pytest.fixture
def config(tiny_gpt2_config):
    # Valid special ids for generate(); 95 is the last id of the tiny vocabulary.
    tiny_gpt2_config.bos_token_id = tiny_gpt2_config.eos_token_id = 95
    return tiny_gpt2_config


def build(config, seed=0):
    return DMEAModel.from_config(config, seed=seed).double().eval()


def perturb(model, layer, module_id, seed):
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in model.module_parameters(layer, module_id):
            param.copy_(torch.randn(param.shape, generator=generator, dtype=param.dtype) * 0.5)


def model_with_two_paths(config):
    """Two perturbed modules per layer; returns the model, path A and path B."""
    model = build(config)
    first, second = model.add_modules(), model.add_modules()
    for layer in range(model.n_layers):
        perturb(model, layer, first[layer], seed=10 + layer)
        perturb(model, layer, second[layer], seed=20 + layer)
    path_a = [first[0], second[1], first[2]]
    path_b = [second[0], first[1], second[2]]
    return model, path_a, path_b


def adapter_by_hand(model, layer, module_id, site, h):
    adapter = getattr(model.get_module(layer, module_id), site)
    hidden = torch.relu(h @ adapter.down.weight.T + adapter.down.bias)
    return hidden @ adapter.up.weight.T + adapter.up.bias


def route_delta(model, path):
    return lambda layer, site, h: adapter_by_hand(model, layer, path[layer], site, h)


def manual_forward(model, ids, delta=None):
    """(logits, block inputs) of GPT-2 from scratch; `delta(layer, site, h)` adds adapters."""
    t = model.backbone.transformer
    d, n_head = model.d_model, model.backbone.config.n_head
    batch, seq = ids.shape
    h = t.wte.weight[ids] + t.wpe.weight[:seq]  # (batch, seq, d)
    causal = torch.ones(seq, seq, dtype=torch.bool).tril()
    inputs = []
    for layer, block in enumerate(t.h):
        inputs.append(h)
        attn, mlp = block.attn, block.mlp  # wrappers forward attribute reads to the originals
        x = F.layer_norm(h, (d,), block.ln_1.weight, block.ln_1.bias, block.ln_1.eps)
        q, k, v = (x @ attn.c_attn.weight + attn.c_attn.bias).split(d, dim=-1)
        q, k, v = (z.view(batch, seq, n_head, d // n_head).transpose(1, 2) for z in (q, k, v))
        scores = (q @ k.transpose(-1, -2)) / math.sqrt(d // n_head)
        probs = scores.masked_fill(~causal, float("-inf")).softmax(-1)
        a = (probs @ v).transpose(1, 2).reshape(batch, seq, d)
        a = a @ attn.c_proj.weight + attn.c_proj.bias
        if delta is not None:
            a = a + delta(layer, "attn", a)
        h = h + a
        x = F.layer_norm(h, (d,), block.ln_2.weight, block.ln_2.bias, block.ln_2.eps)
        m = F.gelu(x @ mlp.c_fc.weight + mlp.c_fc.bias, approximate="tanh")
        m = m @ mlp.c_proj.weight + mlp.c_proj.bias
        if delta is not None:
            m = m + delta(layer, "mlp", m)
        h = h + m
    h = F.layer_norm(h, (d,), t.ln_f.weight, t.ln_f.bias, t.ln_f.eps)
    return h @ t.wte.weight.T, inputs


def ids_for(config, seed=0, batch=2, seq=9):
    return torch.randint(0, config.vocab_size, (batch, seq), generator=torch.Generator().manual_seed(seed))


# ----------------------------------------------------------------- routing


def test_no_modules_is_exactly_the_backbone(config):
    model = build(config)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        reference = GPT2LMHeadModel(config).double().eval()
    ids = ids_for(config)
    assert model.pool_sizes() == [0, 0, 0]
    assert torch.equal(model(ids).logits, reference(ids).logits)
    assert torch.allclose(model(ids).logits, manual_forward(model, ids)[0], atol=ATOL)


def test_fresh_module_is_the_identity(config):
    model = build(config)
    ids = ids_for(config)
    plain = model(ids).logits
    path = model.add_modules()
    assert path == [0, 0, 0] and model.pool_sizes() == [1, 1, 1]
    assert torch.equal(model(ids, path=path).logits, plain)


def test_routing_is_per_layer_correct(config):
    model, path_a, path_b = model_with_two_paths(config)
    ids = ids_for(config)
    plain = model(ids).logits
    for path in (path_a, path_b):
        expected, _ = manual_forward(model, ids, route_delta(model, path))
        assert torch.allclose(model(ids, path=path).logits, expected, atol=ATOL)
    logits_a = model(ids, path=path_a).logits
    assert not torch.allclose(logits_a, model(ids, path=path_b).logits, atol=1e-3)
    assert not torch.allclose(logits_a, plain, atol=1e-3)
    # the route ends with the call; a stored task path routes the same way
    assert torch.equal(model(ids).logits, plain)
    model.set_path("task.a", path_a)
    assert torch.equal(model(ids, task_id="task.a").logits, logits_a)


def test_route_context_nests_and_restores(config):
    model, path_a, path_b = model_with_two_paths(config)
    ids = ids_for(config)
    logits_a = model(ids, path=path_a).logits
    with model.route(path_a):
        with model.route(path_b):
            inner = model(ids).logits
        assert torch.equal(model(ids).logits, logits_a)
    assert torch.equal(inner, model(ids, path=path_b).logits)
    with model.route(path_a), model.route(None):
        assert torch.allclose(model(ids).logits, manual_forward(model, ids)[0], atol=ATOL)


def test_path_validation_errors(config):
    model, path_a, _ = model_with_two_paths(config)
    with pytest.raises(ValueError, match="one module id per layer"):
        model.set_path("t", path_a[:2])
    with pytest.raises(ValueError, match="layer 1 has no module 7"):
        model.set_path("t", [0, 7, 0])
    with pytest.raises(ValueError, match="no path stored for task 'missing'"):
        model.path_of("missing")
    with pytest.raises(ValueError, match="either path or task_id"):
        model(ids_for(config), path=path_a, task_id="t")


# ------------------------------------------------------------------ mixing


def test_mixing_with_one_hot_logits_equals_routing(config):
    model, path_a, path_b = model_with_two_paths(config)
    ids = ids_for(config)
    candidates = [[a, b] for a, b in zip(path_a, path_b, strict=True)]
    picks = [0, 1, 1]  # candidate index per layer
    logits = [torch.nn.Parameter(torch.tensor([1e4, 0.0] if k == 0 else [0.0, 1e4])) for k in picks]
    with model.mixing(candidates, logits):
        mixed = model(ids).logits
    chosen = [candidates[layer][k] for layer, k in enumerate(picks)]
    assert torch.allclose(mixed, model(ids, path=chosen).logits, atol=ATOL)


def test_mixing_with_equal_logits_averages_adapters(config):
    model, path_a, path_b = model_with_two_paths(config)
    model.add_modules(layers=[2])  # layer 2 gets three candidates
    ids = ids_for(config)
    candidates = [[path_a[0], path_b[0]], [path_a[1]], [0, 1, 2]]
    logits = [torch.nn.Parameter(torch.zeros(len(c), dtype=torch.float64)) for c in candidates]
    perturb(model, 2, 2, seed=99)

    def average(layer, site, h):
        outs = [adapter_by_hand(model, layer, m, site, h) for m in candidates[layer]]
        return sum(outs) / len(outs)

    with model.mixing(candidates, logits):
        mixed = model(ids).logits
    assert torch.allclose(mixed, manual_forward(model, ids, average)[0], atol=ATOL)
    weights = mixing_weights(logits)
    assert [w.shape[0] for w in weights] == [2, 1, 3]
    assert torch.allclose(weights[2], torch.full((3,), 1 / 3, dtype=torch.float64))


def test_mixing_gradient_reaches_logits_and_validates(config):
    model, path_a, path_b = model_with_two_paths(config)
    ids = ids_for(config)
    candidates = [[a, b] for a, b in zip(path_a, path_b, strict=True)]
    logits = [torch.nn.Parameter(torch.zeros(2, dtype=torch.float64)) for _ in candidates]
    for _ in range(2):  # a fresh graph on every call: two backward passes work
        with model.mixing(candidates, logits):
            model(ids, labels=ids).loss.backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in logits)
    with pytest.raises(ValueError, match=r"logits\[1\] must have shape \(2,\)"):
        with model.mixing(candidates, [logits[0], torch.zeros(3), logits[2]]):
            pass
    with pytest.raises(ValueError, match="layer 0 has no module 5"):
        with model.mixing([[5], [0], [0]], [torch.zeros(1)] * 3):
            pass


# ------------------------------------------------------- freezing, training


def test_only_the_path_trains_and_backbone_stays_frozen(config):
    model, path_a, path_b = model_with_two_paths(config)
    assert not any(p.requires_grad for p in model.backbone.parameters())
    backbone_before = {k: v.clone() for k, v in model.backbone.state_dict().items()}
    pools_before = {k: v.clone() for k, v in model.pools.state_dict().items()}
    model.set_trainable(path_a)
    trainable = [p for p in model.parameters() if p.requires_grad]
    assert [id(p) for p in trainable] == [id(p) for p in model.trainable_parameters(path_a)]
    optimizer = torch.optim.SGD(trainable, lr=0.1)
    model.train()
    model(ids_for(config), path=path_a, labels=ids_for(config)).loss.backward()
    optimizer.step()
    for key, value in model.backbone.state_dict().items():
        assert torch.equal(value, backbone_before[key]), key
    on_path = {f"{layer}.{m}." for layer, m in enumerate(path_a)}
    for key, value in model.pools.state_dict().items():
        changed = not torch.equal(value, pools_before[key])
        assert changed == any(key.startswith(prefix) for prefix in on_path), key
    model.set_trainable(None)
    assert not any(p.requires_grad for p in model.parameters())


def enable_checkpointing(backbone):
    # transformers 5 renamed gradient_checkpointing_enable (the old name warns)
    enable = getattr(backbone, "activation_checkpointing_enable", None)
    (enable or backbone.gradient_checkpointing_enable)()


def test_gradient_checkpointing_inside_route(config):
    model, path_a, _ = model_with_two_paths(config)
    ids = ids_for(config)
    model.set_trainable(path_a)
    model.train()
    with model.route(path_a):
        model(ids, labels=ids).loss.backward()
    expected = [p.grad.clone() for p in model.trainable_parameters(path_a)]
    model.zero_grad()
    enable_checkpointing(model.backbone)
    with pytest.raises(RuntimeError, match="inside `with model.route"):
        model(ids, path=path_a)
    with model.route(path_a):  # recomputation during backward still sees the route
        model(ids, labels=ids).loss.backward()
    got = [p.grad for p in model.trainable_parameters(path_a)]
    assert all(torch.allclose(g, e, atol=ATOL) for g, e in zip(got, expected, strict=True))


def test_deepcopy_routes_through_its_own_modules(config):
    model, path_a, _ = model_with_two_paths(config)
    ids = ids_for(config)
    before = model(ids, path=path_a).logits
    clone = copy.deepcopy(model)
    perturb(clone, 1, path_a[1], seed=123)
    assert torch.equal(model(ids, path=path_a).logits, before)
    expected, _ = manual_forward(clone, ids, route_delta(clone, path_a))
    assert torch.allclose(clone(ids, path=path_a).logits, expected, atol=ATOL)


# -------------------------------------------------------------- generation


def greedy_without_cache(model, ids, path, steps, eos):
    for _ in range(steps):
        logits = model(ids, path=path, use_cache=False).logits  # full recompute each step
        token = logits[:, -1].argmax(-1, keepdim=True)
        ids = torch.cat([ids, token], dim=1)
        if token.item() == eos:
            break
    return ids


def test_generate_inside_route_uses_the_path_and_the_cache(config):
    model, path_a, _ = model_with_two_paths(config)
    prompt = ids_for(config, batch=1, seq=4)
    # an explicit mask: without one, generate() masks prompt tokens equal to pad_token_id
    kwargs = dict(attention_mask=torch.ones_like(prompt), max_new_tokens=10, do_sample=False,
                  pad_token_id=config.eos_token_id)
    with model.route(path_a):
        routed = model.backbone.generate(prompt, **kwargs)
    reference = greedy_without_cache(model, prompt, path_a, 10, eos=config.eos_token_id)
    assert torch.equal(routed, reference)
    assert torch.equal(model.generate(prompt, path=path_a, **kwargs), routed)
    plain = model.backbone.generate(prompt, **kwargs)
    assert torch.equal(plain, greedy_without_cache(model, prompt, None, 10, config.eos_token_id))
    assert not torch.equal(plain, routed)


# ------------------------------------------------------------------ modules


def test_drop_modules_and_ids_are_never_reused(config):
    model = build(config)
    first, second, third = model.add_modules(), model.add_modules(), model.add_modules()
    model.set_path("t1", first)
    model.set_path("t2", [second[0], first[1], third[2]])
    with pytest.raises(ValueError, match="paths of tasks \\['t1'\\]"):
        model.drop_modules(0, [first[0]])
    model.drop_modules(2, [second[2]])
    assert model.module_ids(2) == [0, 2]
    assert model.drop_unused() == 3  # layer 0: module 2; layer 1: modules 1, 2
    assert [model.module_ids(layer) for layer in range(3)] == [[0, 1], [0], [0, 2]]
    assert model.add_modules(layers=[1, 2]) == [3, 3]
    with pytest.raises(ValueError, match="layer must be an int"):
        model.add_modules(layers=[3])
    model.register_module("extra", torch.nn.Identity())  # nn.Module's own add_module still works
    assert isinstance(model.extra, torch.nn.Identity)


def test_capture_block_inputs(config):
    model, path_a, _ = model_with_two_paths(config)
    ids = ids_for(config)
    with model.capture_block_inputs() as record:
        model(ids, path=path_a)
    t = model.backbone.transformer
    assert [tuple(x.shape) for x in record.layers] == [(2, 9, model.d_model)] * 3
    assert torch.equal(record.layers[0], t.wte(ids) + t.wpe(torch.arange(9)))
    _, inputs = manual_forward(model, ids, route_delta(model, path_a))
    for got, expected in zip(record.layers, inputs, strict=True):
        assert not got.requires_grad
        assert torch.allclose(got, expected, atol=ATOL)
    assert all(len(block._forward_pre_hooks) == 0 for block in t.h)


# -------------------------------------------------------------------- files


def test_save_load_round_trip(config, tmp_path):
    model, path_a, path_b = model_with_two_paths(config)
    model.add_modules(layers=[0])
    model.set_path("task.a", path_a)
    model.set_path("task.b", path_b)
    save_modules(model, tmp_path / "mods")
    manifest = json.loads((tmp_path / "mods" / "manifest.json").read_text())
    assert manifest["paths"] == {"task.a": path_a, "task.b": path_b}
    assert manifest["modules"] == [[0, 1, 2], [0, 1], [0, 1]]
    assert manifest["next_ids"] == [3, 2, 2] and manifest["format_version"] == 1
    assert (manifest["n_layer"], manifest["d_model"], manifest["bottleneck"]) == (3, 32, 2)

    restored = build(config)
    restored.add_modules()  # replaced by the load
    load_modules(restored, tmp_path / "mods")
    ids = ids_for(config)
    assert restored.paths == model.paths and restored.pool_sizes() == [3, 2, 2]
    for task_id in ("task.a", "task.b"):
        assert torch.equal(restored(ids, task_id=task_id).logits, model(ids, task_id=task_id).logits)
    assert restored.add_modules() == [3, 2, 2]


def test_per_task_save_and_load(config, tmp_path):
    model, path_a, path_b = model_with_two_paths(config)
    model.set_path("task.a", path_a)
    model.set_path("task.b", path_b)
    save_path_modules(model, "task.b", tmp_path / "b")
    assert len(load_file(str(tmp_path / "b" / "modules.safetensors"))) == 3 * 8
    served = build(config)
    assert load_path_modules(served, tmp_path / "b") == "task.b"
    assert served.paths == {"task.b": path_b}
    assert [served.module_ids(layer) for layer in range(3)] == [[m] for m in path_b]
    ids = ids_for(config)
    assert torch.equal(served(ids, task_id="task.b").logits, model(ids, task_id="task.b").logits)
    with pytest.raises(ModuleFileError, match="load it with load_path_modules"):
        load_modules(build(config), tmp_path / "b")


def test_load_errors_name_the_file(config, tmp_path):
    model, path_a, _ = model_with_two_paths(config)
    model.set_path("task.a", path_a)
    save_modules(model, tmp_path / "m")
    wide = DMEAModel.from_config(config, bottleneck=4).double()
    with pytest.raises(ModuleFileError, match=r"manifest\.json: bottleneck is 2 but the model has 4"):
        load_modules(wide, tmp_path / "m")
    weights = tmp_path / "m" / "modules.safetensors"
    tensors = load_file(str(weights))
    tensors["layers.1.modules.0.mlp.up.weight"] = torch.zeros(32, 3, dtype=torch.float64)
    save_file(tensors, str(weights))
    manifest = tmp_path / "m" / "manifest.json"  # as if saved so: its checksum matches the new file
    manifest.write_text(manifest.read_text().replace(json.loads(manifest.read_text())["weights_sha256"],
                                                     hashlib.sha256(weights.read_bytes()).hexdigest()))
    with pytest.raises(ModuleFileError, match=r"modules\.safetensors: layers\.1\.modules\.0\.mlp\.up\.weight has shape \(32, 3\)"):
        load_modules(build(config), tmp_path / "m")
    with pytest.raises(ModuleFileError, match="not found"):
        load_modules(build(config), tmp_path / "nowhere")


def test_from_pretrained_grows_vocabulary_once(config, tmp_path):
    original = GPT2LMHeadModel(config).eval()
    original.save_pretrained(tmp_path / "ckpt")
    model = DMEAModel.from_pretrained(str(tmp_path / "ckpt"), vocab_size=100)
    again = DMEAModel.from_pretrained(str(tmp_path / "ckpt"), vocab_size=100)
    wte = model.backbone.transformer.wte.weight
    assert wte.shape == (100, 32) and model.backbone.config.vocab_size == 100
    assert model.backbone.lm_head.weight is wte  # still tied
    assert torch.equal(wte[:96], original.transformer.wte.weight)
    assert torch.equal(wte, again.backbone.transformer.wte.weight)  # seeded: reproducible
    new_rows = wte[96:]
    gaps = torch.cdist(new_rows, new_rows) + torch.eye(4) * 1e9
    assert gaps.min() > 0.1 * wte[:96].norm(dim=1).mean()  # reserved tokens are distinct
    assert not any(p.requires_grad for p in model.parameters())
    ids = ids_for(config)
    with torch.no_grad():
        assert torch.allclose(model(ids).logits[..., :96], original(ids).logits, atol=1e-5)
    with pytest.raises(ValueError, match="smaller than the checkpoint's 96"):
        DMEAModel.from_pretrained(str(tmp_path / "ckpt"), vocab_size=90)


def test_save_backbone_reloads_exactly(config, tmp_path):
    model, path_a, _ = model_with_two_paths(config)
    save_backbone(model, tmp_path / "backbone")
    reloaded = DMEAModel.from_pretrained(str(tmp_path / "backbone")).double().eval()
    save_modules(model, tmp_path / "mods")
    load_modules(reloaded, tmp_path / "mods")
    plain_keys = {k.replace(".base.", "."): v for k, v in model.backbone.state_dict().items()}
    reloaded_keys = {k.replace(".base.", "."): v for k, v in reloaded.backbone.state_dict().items()}
    assert plain_keys.keys() == reloaded_keys.keys()
    assert all(torch.equal(v, reloaded_keys[k]) for k, v in plain_keys.items())
    # identical weights; BLAS may take another kernel path for the reloaded buffers
    ids = ids_for(config)
    assert torch.allclose(reloaded(ids).logits, model(ids).logits, atol=ATOL)
    assert torch.allclose(reloaded(ids, path=path_a).logits, model(ids, path=path_a).logits, atol=ATOL)
