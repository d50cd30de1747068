"""Token rows (`model.token_rows: trained`): rows of tokens the backbone never trained, owned by a task.

The reference for what the rows compute is independent of the hooks that
apply them: a copy of the backbone with the rows written into its tied
embedding matrix, run by transformers alone.
"""

from __future__ import annotations

import copy
import json
import os

import pytest
import torch

from dmea_dist.distributed.generation_pool import apply_model_state, model_state
from dmea_dist.method.adaptation import set_trainable, trained_state
from dmea_dist.modeling.io import (
    ModuleFileError,
    load_modules,
    load_path_modules,
    modules_state,
    put_modules_state,
    save_modules,
    save_path_modules,
)
from dmea_dist.modeling.model import DMEAModel

UNTRAINED = list(range(80, 95))  # the tokens "pretraining never saw" in these tests


@pytest.fixture
def config(tiny_gpt2_config):
    tiny_gpt2_config.bos_token_id = tiny_gpt2_config.eos_token_id = 95
    tiny_gpt2_config.dmea_untrained_tokens = UNTRAINED
    return tiny_gpt2_config


def build(config, seed=0) -> DMEAModel:
    return DMEAModel.from_config(config, seed=seed).double().eval()


def two_tasks(config) -> tuple[DMEAModel, list[int], list[int]]:
    """Tasks a and b, a path each, rows claimed and moved away from the backbone's."""
    model = build(config)
    path_a, path_b = model.add_modules(), model.add_modules()
    model.set_path("a", path_a)
    model.set_path("b", path_b)
    model.claim_token_rows("a", [3, 81, 82, 90])
    model.claim_token_rows("b", [82, 84, 91])
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for task in ("a", "b"):
            (rows,) = model.token_rows_parameters(task)
            rows.add_(torch.randn(rows.shape, generator=generator, dtype=rows.dtype))
        for layer, module_id in enumerate(path_a + path_b):
            for param in model.module_parameters(layer % model.n_layers, module_id):
                param.add_(0.3 * torch.randn(param.shape, generator=generator, dtype=param.dtype))
    return model, path_a, path_b


def written_into_backbone(model: DMEAModel, tasks=None) -> DMEAModel:
    """The reference: the same modules on a backbone whose embedding matrix holds the rows (of `tasks`; default
    every task's), without rows."""
    reference = copy.deepcopy(model)
    with torch.no_grad():
        weight = reference.backbone.get_input_embeddings().weight
        for task in list(reference.token_rows.owners) if tasks is None else tasks:
            (rows,) = reference.token_rows_parameters(task)
            weight[torch.tensor(reference.token_rows.ids_of(task))] = rows
    reference.clear_token_rows()
    assert reference.backbone.get_output_embeddings().weight is weight  # tied: the head scores with the rows
    return reference


IDS = torch.tensor([[81, 5, 82, 84, 90, 7, 91], [3, 84, 84, 2, 81, 11, 40]])


def test_rows_embed_and_score_as_if_written_into_the_backbone(config):
    model, path_a, path_b = two_tasks(config)
    reference = written_into_backbone(model)
    for path in (path_a, path_b):
        got = model(IDS, path=path).logits
        torch.testing.assert_close(got, reference(IDS, path=path).logits, rtol=0, atol=1e-10)
    mixed = model(IDS, paths=[path_a, path_b]).logits
    torch.testing.assert_close(mixed, reference(IDS, paths=[path_a, path_b]).logits, rtol=0, atol=1e-10)
    prompt = IDS[:, :3]
    kwargs = {"max_new_tokens": 6, "do_sample": False, "pad_token_id": 95}
    assert torch.equal(model.generate(prompt, path=path_a, **kwargs), reference.generate(prompt, path=path_a, **kwargs))
    # and the rows act: without them the same model computes something else
    model.clear_token_rows()
    assert (model(IDS, path=path_a).logits - reference(IDS, path=path_a).logits).abs().max() > 1e-3


def test_each_untrained_token_goes_to_the_first_task_that_uses_it(config):
    model = build(config)
    model.set_path("a", model.add_modules())
    assert model.claim_token_rows("a", [3, 81, 82, 90]) == [81, 82, 90]  # 3 was trained: never claimed
    assert model.claim_token_rows("b", [82, 84, 91]) == [84, 91]  # 82 is a's already
    assert model.claim_token_rows("a", [83]) == [81, 82, 90]  # a re-run stage keeps what the task holds
    assert model.claim_token_rows("c", [1, 2, 82]) == []
    assert model.token_rows.owners == {"a": [81, 82, 90], "b": [84, 91]}
    start = model.backbone.get_input_embeddings().weight[torch.tensor([84, 91])]
    assert torch.equal(model.token_rows_parameters("b")[0], start)  # the rows start as the backbone's
    with pytest.raises(ValueError, match="belong to another task"):
        model.put_token_rows("c", torch.tensor([90]), torch.zeros(1, model.d_model, dtype=torch.float64))


def test_an_adaptation_trains_its_own_tasks_rows_only(config):
    model, path_a, path_b = two_tasks(config)
    params = set_trainable(model, path_b, "b")
    (rows_a,), (rows_b,) = model.token_rows_parameters("a"), model.token_rows_parameters("b")
    assert any(p is rows_b for p in params) and not any(p is rows_a for p in params)
    assert rows_b.requires_grad and not rows_a.requires_grad
    loss = model(IDS, path=path_b, labels=IDS).loss
    loss.backward()
    assert rows_b.grad.abs().sum() > 0 and rows_a.grad is None
    state = trained_state(model, path_b, "b")["modules"]
    assert {k for k in state if k.startswith("rows.")} == {"rows.b.ids", "rows.b.weight"}
    set_trainable(model, None)
    assert not rows_b.requires_grad


def _same_outputs(model, other, paths):
    for path in paths:
        torch.testing.assert_close(other(IDS, path=path).logits, model(IDS, path=path).logits, rtol=0, atol=1e-10)


def test_rows_travel_with_the_modules_everywhere_modules_go(config, tmp_path):
    model, path_a, path_b = two_tasks(config)
    # a snapshot's state (search and generation actors, training ranks), into a replica with other rows
    replica = build(config)
    replica.claim_token_rows("z", [93])
    apply_model_state(replica, model_state(model, with_backbone=False))
    assert replica.token_rows.owners == model.token_rows.owners
    _same_outputs(model, replica, [path_a, path_b])
    # modules_state / put_modules_state (adaptation results)
    fresh = build(config)
    put_modules_state(fresh, modules_state(model))
    for task, path in (("a", path_a), ("b", path_b)):
        fresh.set_path(task, path)
    _same_outputs(model, fresh, [path_a, path_b])
    # the "pools" and "path" files (resume, MLflow, serving): a task's file holds every task's rows
    save_modules(model, tmp_path / "pools")
    loaded = build(config)
    load_modules(loaded, tmp_path / "pools")
    _same_outputs(model, loaded, [path_a, path_b])
    save_path_modules(model, "a", tmp_path / "path_a")
    served = build(config)
    assert load_path_modules(served, tmp_path / "path_a") == "a"
    assert served.token_rows.owners == model.token_rows.owners
    _same_outputs(model, served, [path_a])


def test_a_module_file_that_lost_a_tasks_rows_is_refused_by_name(config, tmp_path):
    model, _, _ = two_tasks(config)
    save_modules(model, tmp_path / "pools")
    manifest = json.loads((tmp_path / "pools" / "manifest.json").read_text())
    manifest["rows"] = [*manifest["rows"], "c"]
    (tmp_path / "pools" / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(ModuleFileError, match="token rows of task 'c'"):
        load_modules(build(config), tmp_path / "pools")


def test_a_tasks_rows_have_one_name_whatever_order_the_tasks_came_in(config, tmp_path):
    """Engine checkpoints hold the rows by parameter name: a model rebuilt from files (resume) or a replica
    must name each task's rows as the model that wrote them did, and keep its ids out of state dicts."""
    model, _, _ = two_tasks(config)
    other = build(config)
    for task in reversed(list(model.token_rows.owners)):
        (rows,) = model.token_rows_parameters(task)
        other.put_token_rows(task, torch.tensor(model.token_rows.ids_of(task)), rows)
    names = {n: p for n, p in model.named_parameters() if n.startswith("token_rows.")}
    other_names = {n: p for n, p in other.named_parameters() if n.startswith("token_rows.")}
    assert set(names) == set(other_names) and len(names) == 2
    for name, param in names.items():
        assert torch.equal(other_names[name], param)
    assert not [k for k in model.state_dict() if k.endswith(".ids")]
    save_modules(model, tmp_path / "with_rows")
    save_modules(build(config), tmp_path / "without")
    versions = [json.loads((tmp_path / d / "manifest.json").read_text())["format_version"]
                for d in ("with_rows", "without")]
    assert versions == [2, 1]  # a reader from before rows refuses them by version, and reads the rest


@pytest.mark.parametrize(("setting", "method", "claimed"), [
    ("trained", "acm", [81, 82, 90, 91]),  # every untrained token the task's data uses
    ("words", "dmea", [81, 82]),  # not the separator (90) nor the task's generation token (91)
    ("auto", "dmea", [81, 82]),  # the default: words
    ("frozen", "dmea", []),
    ("auto", "lamol", []),  # it trains every row of the backbone anyway
])
def test_which_rows_a_task_claims_follows_model_token_rows(config, tmp_path, setting, method, claimed):
    from types import SimpleNamespace

    from dmea_dist.config import load_config
    from dmea_dist.run import Task
    from dmea_dist.stages import _claim_token_rows

    (tmp_path / "run.yaml").write_text("data:\n  tasks: [a]\n")
    run_config = load_config(tmp_path / "run.yaml", [f"model.token_rows={setting}", f"method.name={method}"])
    model = build(config)
    model.set_path("a", model.add_modules())
    lm = [SimpleNamespace(input_ids=[91, 5, 81, 90, 82, 95])]  # generation token, words, separator, end
    task = Task(task_id="a", index=0, rows={}, train=([], lm))
    special = SimpleNamespace(ans=90, eos=95, pad=95, tasks=(91, 92))
    run = SimpleNamespace(config=run_config, tasks=[task], policy=SimpleNamespace(joint=False), model=model)
    assert _claim_token_rows(SimpleNamespace(run=run, special=special), task) == claimed
    assert model.token_rows.owners == ({"a": claimed} if claimed else {})


@pytest.mark.skipif((os.cpu_count() or 1) < 2, reason="a race between two threads needs two cores")
def test_rows_gradient_is_the_same_bits_at_two_threads_as_at_one(config):
    """The rows' gradient, summed over every position a row's token fills, came out in another order on
    every call at two threads (torch's CPU indexing backward adds float32 gradients with atomic adds):
    an in-process run at two threads trained other rows each time and ended at another R matrix. It must
    be the bits a one-thread run gets (Ray workers run at one thread), call after call."""
    from dmea_dist.run import torch_threads

    model = DMEAModel.from_config(config, seed=0).train()  # float32: the race is in float32's kernel
    path = model.add_modules()
    model.set_path("a", path)
    model.claim_token_rows("a", UNTRAINED)
    (rows,) = model.token_rows_parameters("a")
    rows.requires_grad_(True)
    generator = torch.Generator().manual_seed(0)
    # 64 x 48 positions x 32 wide: a gather large enough for torch to split it over threads
    ids = torch.tensor(UNTRAINED)[torch.randint(len(UNTRAINED), (64, 48), generator=generator)]
    upstream = torch.randn(64, 48, config.n_embd, generator=generator)

    def rows_gradient() -> torch.Tensor:
        rows.grad = None
        with model.route(path):
            hidden = model.backbone.transformer.wte(ids)
        (hidden * upstream).sum().backward()
        return rows.grad.clone()

    with torch_threads(1):
        one_thread = rows_gradient()
    with torch_threads(2):
        for _ in range(10):
            assert torch.equal(rows_gradient(), one_thread)


def test_only_rows_of_scores_as_the_model_did_before_the_other_tasks_claimed_rows(config):
    """A later task's trained rows change what an earlier task answers (they compete in the tied head's softmax
    whatever the route); inside `only_rows_of` the model computes what it computed before they existed, and
    after the block the later rows apply again, bit for bit.

    Inside the block, "what it computed" holds to the rounding of one matrix product: the head scores the whole
    row table (here 5 rows) where it scored a's 2, and BLAS picks its kernel by the product's shape. On an AMD
    EPYC (Zen 4) the two round a's logits differently, by 1e-15 in float64 (2026-12-08; bit for bit on the
    Intel Xeon where the test was written). The tolerance below is 1e-12; b's rows move the logits by up to 1.7."""
    model = build(config)
    path = model.add_modules()
    model.claim_token_rows("a", [81, 82])
    with torch.no_grad():
        model.token_rows_parameters("a")[0].add_(1.0)
    before = model(IDS, path=path).logits
    model.claim_token_rows("b", [84, 90, 91])
    with torch.no_grad():
        model.token_rows_parameters("b")[0].mul_(3.0)
    with_b = model(IDS, path=path).logits
    assert (with_b - before).abs().max() > 0.1
    with model.only_rows_of(["a"]):
        torch.testing.assert_close(model(IDS, path=path).logits, before, rtol=0, atol=1e-12)
    torch.testing.assert_close(model(IDS, path=path).logits, with_b, rtol=0, atol=0)


def test_a_scope_sees_exactly_the_rows_of_its_tasks_in_every_row_of_a_shared_batch(config):
    """An earlier task runs in the scope of the tasks up to it: its rows (and any in scope) apply, a later task's
    embed and score as the backbone's own. The reference writes only the scope's rows into the backbone. One batch
    may hold rows of several scopes (`scopes=`, evaluation and serving across tasks): each row computes what it
    computes with its scope alone."""
    model, path_a, path_b = two_tasks(config)
    only_a, every = written_into_backbone(model, ["a"]), written_into_backbone(model)
    with torch.no_grad():
        scoped = model(IDS, path=path_a, scope=["a"]).logits
        torch.testing.assert_close(scoped, only_a(IDS, path=path_a).logits, rtol=0, atol=1e-10)
        assert (scoped - every(IDS, path=path_a).logits).abs().max() > 1e-3  # b's rows would have changed it
        mixed = model(IDS, paths=[path_a, path_b], scopes=[["a"], None]).logits
        torch.testing.assert_close(mixed[0], only_a(IDS[:1], path=path_a).logits[0], rtol=0, atol=1e-10)
        torch.testing.assert_close(mixed[1], every(IDS[1:], path=path_b).logits[0], rtol=0, atol=1e-10)
        torch.testing.assert_close(model(IDS, path=path_a, scope=[]).logits,  # no task's rows: the bare backbone
                                   written_into_backbone(model, [])(IDS, path=path_a).logits, rtol=0, atol=1e-10)
    prompt = torch.tensor([[81], [84]])
    kwargs = dict(max_new_tokens=5, do_sample=False, pad_token_id=0)
    assert torch.equal(model.generate(prompt, paths=[path_a, path_a], scopes=[["a"], None], **kwargs),
                       torch.cat([only_a.generate(prompt[:1], path=path_a, **kwargs),
                                  every.generate(prompt[1:], path=path_a, **kwargs)]))


def test_a_scoped_loss_gives_no_gradient_to_rows_out_of_its_scope(config):
    """Replay of an earlier task trains in its scope: a later task's rows get no gradient from it (they are not
    in its softmax), while without the scope they would."""
    model, path_a, _ = two_tasks(config)
    rows_b = model.token_rows_parameters("b")[0]
    rows_b.requires_grad_(True)

    def gradient(**scope):
        rows_b.grad = None
        model(IDS, path=path_a, **scope).logits.logsumexp(-1).sum().backward()
        return rows_b.grad

    assert gradient(scope=["a"]) is None or not gradient(scope=["a"]).any()
    assert gradient().abs().max() > 0
    assert gradient(scope=["a", "b"]).abs().max() > 0


def test_scopes_must_name_one_scope_per_row(config):
    model, path_a, _ = two_tasks(config)
    with pytest.raises(ValueError, match="one scope per row"):
        model(IDS, path=path_a, scopes=[["a"], ["b"], None])
    with pytest.raises(ValueError, match="either scope or scopes"):
        model(IDS, path=path_a, scope=["a"], scopes=[["a"], None])


def test_a_served_task_answers_in_the_scope_its_folder_recorded(tmp_path, monkeypatch):
    """Served beside a later task whose rows would win its softmax, a task answers exactly what it answers
    alone: each task sees the rows its folder recorded (those of the tasks up to it), not the later task's."""
    import dataclasses
    import shutil

    from transformers import GPT2Config

    from dmea_dist import serving
    from dmea_dist.data.tokenizer import train_bpe_tokenizer
    from tests.conftest import REPO_ROOT

    tokenizer = train_bpe_tokenizer(["alpha beta gamma", "delta epsilon zeta"] * 4, vocab_size=40, max_tasks=2)
    gpt = GPT2Config(vocab_size=len(tokenizer), n_positions=64, n_embd=16, n_layer=2, n_head=2,
                     bos_token_id=tokenizer.eos_token_id, eos_token_id=tokenizer.eos_token_id)
    gpt.dmea_untrained_tokens = list(range(len(tokenizer)))

    def backbone(*args, **kwargs) -> DMEAModel:
        return DMEAModel.from_config(gpt, bottleneck=4, seed=0)

    model, run_dir = backbone(), tmp_path / "run"
    model.set_path("a", model.add_modules())
    model.claim_token_rows("a", tokenizer("alpha beta gamma")["input_ids"])
    save_path_modules(model, "a", run_dir / "tasks/000-a/modules")
    model.set_path("b", model.add_modules())
    model.claim_token_rows("b", tokenizer(" ".join("abcdefghijklmnopqrstuvwxyz"))["input_ids"])  # far rows
    with torch.no_grad():
        model.token_rows_parameters("b")[0].normal_(0, 30, generator=torch.Generator().manual_seed(0))
    save_path_modules(model, "b", run_dir / "tasks/001-b/modules")
    shutil.copy(REPO_ROOT / "configs/quickstart.yaml", run_dir / "config.yaml")
    monkeypatch.setattr(serving, "_tokenizer", lambda directory: tokenizer)
    monkeypatch.setattr(serving, "_backbone", backbone)
    inputs = ["alpha beta", "gamma alpha gamma"]
    alone = serving.load_task_model(run_dir, "a").generate(inputs, max_new_tokens=6)
    beside = serving.load_task_model(run_dir, "a", tasks=["a", "b"])
    assert beside.scopes == {"a": ("a",), "b": ("a", "b")}
    assert beside.generate(inputs, max_new_tokens=6) == alone
    # without scopes b's rows are in a's softmax, and change its answers
    assert dataclasses.replace(beside, scopes={}).generate(inputs, max_new_tokens=6) != alone
