"""The gradient-scaled DeepSpeed step against an independent plain-PyTorch reference.

Every case runs the real DeepSpeed engine (CPU, gloo) in freshly spawned
processes, one per rank, each with its own data shard, for ZeRO 1, 2 and 3 at
world size 1 and 2. The reference, in this process and in float64, computes
each group's gradient with torch.autograd.grad as the mean over the ranks'
shards, eta from the paper's formula written out here, the combined update,
gradient clipping, and torch.optim.AdamW; parameters after several steps must
agree to 1e-6. The same runs check scale=False against the plain summed
gradient, that the reported eta, norms and losses are the reference's and
identical on every rank, and that bad steps (a closure that bypasses the
engine, a loss without grad, ...) raise a named error and leave no trace.
Separately: adapters-only checkpoints resume exactly; bad configs and
parameter lists are rejected before any setup.
"""

from __future__ import annotations

import math
import os

import pytest
import torch
import torch.multiprocessing as mp
import torch.nn.functional as F
from torch import nn

pytestmark = pytest.mark.integration

ROUTES = {"new": "new", "replay:a": "a", "replay:b": "b"}  # group key -> route (path)
PROGRESS = [0.0, 0.35, 1.2]  # epochs at each of the steps
HP = dict(lr=2e-2, betas=(0.9, 0.999), eps=1e-6, weight_decay=0.01, clip=1.0, clamp=(0.2, 5.0))
N_IN, N_HIDDEN, N_CLASSES, BATCH = 6, 16, 4, 5


class TinyRouted(nn.Module):
    """Frozen input layer; trainable shared layer, one adapter per route, head; an idle trainable layer."""

    def __init__(self):
        super().__init__()
        self.frozen = nn.Linear(N_IN, N_HIDDEN)
        self.shared = nn.Linear(N_HIDDEN, N_HIDDEN)
        self.adapters = nn.ModuleDict({r: nn.Linear(N_HIDDEN, N_HIDDEN) for r in ROUTES.values()})
        self.idle = nn.Linear(N_HIDDEN, N_HIDDEN)  # trainable, reached by no route: zero gradient
        self.head = nn.Linear(N_HIDDEN, N_CLASSES)
        self.frozen.requires_grad_(False)

    def forward(self, x, y, route):
        h = torch.tanh(self.frozen(x))  # (batch, hidden)
        h = torch.tanh(self.shared(h))
        h = h + torch.tanh(self.adapters[route](h))
        return F.cross_entropy(self.head(h), y)


def _trainable(model):
    return [p for p in model.parameters() if p.requires_grad]


# Per stage, settings that make DeepSpeed take its less trivial paths: several reduce buckets
# (reduce_bucket_size 100, the model has 1428 trainable elements), overlapped reduction at ZeRO-2, and
# at ZeRO-3 every parameter really partitioned (persistence threshold 0).
ZERO = {
    1: {"stage": 1},
    2: {"stage": 2, "overlap_comm": True, "contiguous_gradients": True, "reduce_bucket_size": 100},
    3: {"stage": 3, "stage3_param_persistence_threshold": 0, "reduce_bucket_size": 100},
}


def _ds_config(stage):
    return {
        "train_micro_batch_size_per_gpu": BATCH,
        "gradient_accumulation_steps": 1,
        "gradient_clipping": HP["clip"],
        "steps_per_print": 10**9,
        "optimizer": {"type": "AdamW", "params": {
            "lr": HP["lr"], "betas": list(HP["betas"]), "eps": HP["eps"],
            "weight_decay": HP["weight_decay"], "torch_adam": True}},
        "zero_optimization": dict(ZERO[stage]),
    }


def _make_case(world_size):
    """Initial weights and data[rank][step][group] = (x, y); group norms deliberately differ."""
    gen = torch.Generator().manual_seed(1234)
    torch.manual_seed(1234)
    state = TinyRouted().state_dict()
    input_scale = {"new": 1.0, "replay:a": 0.3, "replay:b": 3.0}
    data = [[{key: (torch.randn(BATCH, N_IN, generator=gen) * input_scale[key],
                    torch.randint(0, N_CLASSES, (BATCH,), generator=gen))
              for key in ROUTES} for _ in PROGRESS] for _ in range(world_size)]
    return state, data


def _setup_rank(rank, world_size, port):
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world_size),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), DS_ACCELERATOR="cpu")


def _build(stage, state):
    from dmea_dist.engine import build_engine

    model = TinyRouted()
    model.load_state_dict(state)
    return build_engine(model, _trainable(model), ds_config=_ds_config(stage), clamp=HP["clamp"])


def _sub_batches(eng, shard_step):
    # Each closure routes its sub-batch along its own path, through the engine.
    return [(key, lambda x=x, y=y, route=ROUTES[key]: eng(x, y, route))
            for key, (x, y) in shard_step.items()]


def _failed_steps(eng, shard_step):
    """Bad steps, some failing after the new task's backward: each must raise and leave no trace."""
    x, y = shard_step["replay:a"]
    good = _sub_batches(eng, shard_step)

    def no_grad_loss():
        with torch.no_grad():
            return eng(x, y, "a")

    bad = {
        "bypass": (good[:1] + [("replay:a", lambda: eng.module(x, y, "a"))], 0.0),
        "no_grad": (good[:1] + [("replay:a", no_grad_loss)], 0.0),
        "not_scalar": (good[:1] + [("replay:a", lambda: eng(x, y, "a").expand(2))], 0.0),
        "duplicate": (good + good[-1:], 0.0),
        "empty": ([], 0.0),
        "progress": (good, -1.0),
    }
    errors = {}
    for name, (sub_batches, progress) in bad.items():
        try:
            eng.step(sub_batches, progress=progress)
            errors[name] = "no error"
        except (RuntimeError, TypeError, ValueError) as err:
            errors[name] = f"{type(err).__name__}: {err}"
    return errors


def _worker(rank, world_size, port, stage, state, data, out_dir):
    from dataclasses import asdict

    _setup_rank(rank, world_size, port)
    results = {}
    for scale in (True, False):
        eng = _build(stage, state)
        stats, errors = [], None
        for step, progress in enumerate(PROGRESS):
            if step == 1:  # after a real step, so stale ZeRO state would show in the result
                errors = _failed_steps(eng, data[rank][step])
            sub_batches = _sub_batches(eng, data[rank][step])
            stats.append(asdict(eng.step(sub_batches, progress=progress, scale=scale)))
        results[scale] = {"params": eng.trainable_state_dict(), "stats": stats,
                          "stage": eng.zero_stage, "errors": errors}
    torch.save(results, os.path.join(out_dir, f"rank{rank}.pt"))
    _leave_group()


def _leave_group():
    # Leave together: a rank exiting while its peer still talks gloo can abort the peer (SIGABRT).
    import torch.distributed as dist

    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


def _global_group_gradient(model, params, data, step, key):
    """Group `key`'s gradient averaged over the ranks' shards (what DeepSpeed's mean gives)."""
    grads_sum = [torch.zeros_like(p) for p in params]
    loss_sum = 0.0
    for shard in data:
        x, y = shard[step][key]
        loss = model(x.double(), y, ROUTES[key])
        grads = torch.autograd.grad(loss, params, allow_unused=True)
        for total, grad in zip(grads_sum, grads, strict=True):
            if grad is not None:
                total += grad
        loss_sum += float(loss.detach())
    return [g / len(data) for g in grads_sum], loss_sum / len(data)


def _reference_eta(new_sq, replay_sq, progress):
    # The paper's formula, written out independently of dmea_dist.method.scaling.
    if replay_sq == 0.0:
        return 1.0
    eta = (new_sq / replay_sq - 1.0) * math.exp(-progress) + 1.0
    return min(max(eta, HP["clamp"][0]), HP["clamp"][1])


def _reference(state, data, *, scale):
    """Plain PyTorch in float64: per-group global-mean gradients, eta, clip, AdamW."""
    model = TinyRouted().double()
    model.load_state_dict(state)
    params = _trainable(model)
    opt = torch.optim.AdamW(params, lr=HP["lr"], betas=HP["betas"], eps=HP["eps"],
                            weight_decay=HP["weight_decay"])
    history = []
    for step, progress in enumerate(PROGRESS):
        group_grads, losses = {}, {}
        for key in ROUTES:
            group_grads[key], losses[key] = _global_group_gradient(model, params, data, step, key)
        sq = {key: float(sum((g * g).sum() for g in gs)) for key, gs in group_grads.items()}
        etas = {key: _reference_eta(sq["new"], sq[key], progress) if scale else 1.0
                for key in list(ROUTES)[1:]}
        update = [g.clone() for g in group_grads["new"]]
        for key, eta in etas.items():
            update = [u + eta * g for u, g in zip(update, group_grads[key], strict=True)]
        total = math.sqrt(sum(float((u * u).sum()) for u in update))
        coef = HP["clip"] / (total + 1e-6)  # DeepSpeed's and torch's clip rule
        if coef < 1.0:
            update = [u * coef for u in update]
        for p, u in zip(params, update, strict=True):
            p.grad = u  # the idle layer gets zeros, as in ZeRO (torch would skip a None)
        opt.step()
        history.append({"losses": losses, "etas": etas, "sq_norms": sq, "clipped": coef < 1.0})
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    return dict(zip(names, [p.detach() for p in params], strict=True)), history


def _run_engine(worker, stage, world_size, state, data, tmp_path):
    from dmea_dist.engine import free_port

    mp.spawn(worker, args=(world_size, free_port(), stage, state, data, str(tmp_path)),
             nprocs=world_size, join=True)
    return [torch.load(tmp_path / f"rank{r}.pt") for r in range(world_size)]


@pytest.mark.parametrize("world_size", [1, 2])
@pytest.mark.parametrize("stage", [1, 2, 3])
def test_scaled_step_matches_plain_pytorch(stage, world_size, tmp_path):
    state, data = _make_case(world_size)
    ranks = _run_engine(_worker, stage, world_size, state, data, tmp_path)
    assert ranks[0][True]["stage"] == stage
    # Bad steps raise a named error; the reference comparison below shows they left no trace.
    errors = ranks[0][True]["errors"]
    assert "RuntimeError: sub-batch 'replay:a': the closure did not run a forward" in errors["bypass"]
    assert "ValueError: sub-batch 'replay:a': its loss does not depend" in errors["no_grad"]
    assert "TypeError: sub-batch 'replay:a': the closure must return a scalar" in errors["not_scalar"]
    assert "ValueError: group key 'replay:b' appears twice" in errors["duplicate"]
    assert "ValueError: step needs at least one sub-batch" in errors["empty"]
    assert "ValueError: progress must be" in errors["progress"]

    for scale in (True, False):
        expected_params, history = _reference(state, data, scale=scale)
        got = ranks[0][scale]
        assert set(got["params"]) == set(expected_params)
        for name, expected in expected_params.items():
            torch.testing.assert_close(got["params"][name].double(), expected, rtol=0, atol=1e-6,
                                       msg=lambda m, name=name, scale=scale: f"scale={scale} {name}: {m}")
        for step, (stats, ref) in enumerate(zip(got["stats"], history, strict=True)):
            assert stats["scaled"] is scale
            assert list(stats["losses"]) == list(ROUTES)
            for key in ROUTES:
                assert stats["losses"][key] == pytest.approx(ref["losses"][key], rel=1e-5)
            assert stats["etas"] == pytest.approx(ref["etas"], rel=1e-5), f"step {step}"
            if scale:
                assert stats["sq_norms"] == pytest.approx(ref["sq_norms"], rel=1e-5), f"step {step}"
            else:
                assert stats["sq_norms"] == {}
        # eta is identical on every rank: it comes from the all-reduced gradients.
        for other in ranks[1:]:
            assert other[scale]["stats"] == got["stats"]

    # The case really exercises scaling (far from the plain sum), the clamp and clipping.
    _, history = _reference(state, data, scale=True)
    etas = [eta for h in history for eta in h["etas"].values()]
    assert any(abs(eta - 1.0) > 0.5 for eta in etas) and HP["clamp"][0] in etas, etas
    assert any(h["clipped"] for h in history), history
    scaled, plain = ranks[0][True]["params"], ranks[0][False]["params"]
    assert max(float((scaled[n] - plain[n]).abs().max()) for n in scaled) > 1e-3


def _checkpoint_worker(rank, world_size, port, stage, state, data, out_dir):
    _setup_rank(rank, world_size, port)
    ckpt = os.path.join(out_dir, "ckpt")
    eng = _build(stage, state)
    eng.step(_sub_batches(eng, data[rank][0]), progress=PROGRESS[0])
    eng.save_checkpoint(ckpt, tag="after-step-0")
    saved = eng.trainable_state_dict()
    eng.step(_sub_batches(eng, data[rank][1]), progress=PROGRESS[1])

    # A fresh engine whose trainable weights differ: loading must restore weights and AdamW state.
    other = {k: v + 0.5 if not k.startswith("frozen.") else v for k, v in state.items()}
    resumed = _build(stage, other)
    resumed.load_checkpoint(ckpt, tag="after-step-0")
    loaded = resumed.trainable_state_dict()
    resumed.step(_sub_batches(resumed, data[rank][1]), progress=PROGRESS[1])
    torch.save({"saved": saved, "loaded": loaded, "continued": eng.trainable_state_dict(),
                "resumed": resumed.trainable_state_dict()}, os.path.join(out_dir, f"rank{rank}.pt"))
    _leave_group()


@pytest.mark.parametrize("stage", [1, 3])
def test_checkpoint_holds_adapters_only_and_resumes(stage, tmp_path):
    state, data = _make_case(1)
    (result,) = _run_engine(_checkpoint_worker, stage, 1, state, data, tmp_path)
    for name, tensor in result["saved"].items():
        torch.testing.assert_close(result["loaded"][name], tensor, rtol=0, atol=0)
        torch.testing.assert_close(result["resumed"][name], result["continued"][name], rtol=0, atol=0)
    for path in (tmp_path / "ckpt" / "after-step-0").glob("*model_states.pt"):
        states = torch.load(path, weights_only=False)
        assert not any(k.startswith("frozen.") for k in states["module"]), list(states["module"])
        assert set(states["module"]) == set(result["saved"])
        assert not states["frozen_param_fragments"]


@pytest.mark.parametrize("change, match", [
    (lambda c: c["zero_optimization"].update(stage=0), r"\['stage'\] is 0"),
    (lambda c: c.update(gradient_accumulation_steps=2), "gradient_accumulation_steps"),
    (lambda c: c.update(bf16={"enabled": True}), r"\['bf16'\]\['enabled'\]"),
    (lambda c: c.pop("optimizer"), "no 'optimizer' section"),
    (lambda c: c["optimizer"]["params"].pop("torch_adam"), "torch_adam"),
])
def test_bad_ds_config_is_named_before_any_setup(change, match):
    from dmea_dist.engine import build_engine
    from dmea_dist.errors import ConfigError

    config = _ds_config(1)
    change(config)
    model = TinyRouted()
    with pytest.raises(ConfigError, match=match):
        build_engine(model, _trainable(model), ds_config=config)


@pytest.mark.parametrize("pick, match", [
    (lambda m: _trainable(m) + [m.frozen.weight], "frozen"),
    (lambda m: _trainable(m)[1:], "'shared.weight' requires grad but is not in params"),
    (lambda m: _trainable(m) + [nn.Parameter(torch.ones(2))], "not a parameter of the model"),
    (lambda m: _trainable(m) + _trainable(m)[:1], "listed twice"),
])
def test_params_must_be_exactly_the_trainable_ones(pick, match):
    from dmea_dist.engine import build_engine

    model = TinyRouted()
    with pytest.raises(ValueError, match=match):
        build_engine(model, pick(model), ds_config=_ds_config(1))
