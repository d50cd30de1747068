"""How adaptation mixes streams: step plans (ACM's alternation), pseudo-sample budgets, batch streams, warnings."""

from __future__ import annotations

from collections import Counter

import pytest
import torch

from dmea_dist.data.formatting import BatchStream, Example
from dmea_dist.method.adaptation import step_plan
from dmea_dist.method.generation import (
    PseudoSamples,
    pseudo_sample_counts,
    pseudo_sample_plan,
    stand_in_count,
    yield_warnings,
)


def test_alternate_takes_one_replay_batch_per_step_round_robin():
    keys = ["new", "replay:a", "replay:b", "replay:c"]
    plan = step_plan(keys, 30, mixing="alternate", seed=0)
    assert all(row[0] == "new" and len(row) == 2 for row in plan)
    # every round of three steps visits each replayed task once (ACM: equal shares)
    for start in range(0, 30, 3):
        assert sorted(row[1] for row in plan[start:start + 3]) == ["replay:a", "replay:b", "replay:c"]
    orders = {tuple(row[1] for row in plan[s:s + 3]) for s in range(0, 30, 3)}
    assert len(orders) > 1, "the order is reshuffled every round"
    assert plan == step_plan(keys, 30, mixing="alternate", seed=0)
    assert plan != step_plan(keys, 30, mixing="alternate", seed=1)


def test_transfer_streams_rotate_beside_replay_not_instead_of_it():
    keys = ["new", "transfer:x", "replay:a", "replay:b"]
    plan = step_plan(keys, 20, mixing="alternate", seed=0)
    assert all(len(row) == 3 and row[0] == "new" for row in plan)
    counts = Counter(k for row in plan for k in row[1:])
    assert counts == {"replay:a": 10, "replay:b": 10, "transfer:x": 20}


def test_all_takes_every_stream_every_step():
    keys = ["new", "transfer:x", "replay:a"]
    assert step_plan(keys, 4, mixing="all", seed=0) == [keys] * 4
    assert step_plan(["new"], 3, mixing="alternate", seed=0) == [["new"]] * 3
    with pytest.raises(ValueError, match="mixing"):
        step_plan(keys, 1, mixing="interleave", seed=0)


def test_pseudo_sample_budget_is_gamma_n_in_total_by_default():
    # LAMOL/ACM: ceil(0.2 * 400) = 80 in all, split over the old tasks
    assert pseudo_sample_counts(0.2, 400, 4) == 20
    assert pseudo_sample_counts(0.2, 400, 3) == 26
    assert pseudo_sample_counts(0.2, 400, 3, budget="per_task") == 80
    assert pseudo_sample_counts(0.2, 10, 5) == 1  # at least one each
    assert pseudo_sample_counts(0.0, 400, 3) == 0 and pseudo_sample_counts(0.2, 400, 0) == 0


def test_a_selected_task_does_not_take_its_samples_from_the_replay_budget():
    """ACM's budget is gamma * N over the tasks it replays: DMEA's transfer draws come on top, not out of it."""
    # the new task trains restaurant's whole path and selects e2e and restaurant (ABCDE's hotel): 80 for
    # restaurant's replay alone, 80 / 2 for each selected task; restaurant is drawn once, at the larger count
    plan = pseudo_sample_plan(0.2, 400, replay=["restaurant"], transfer=["e2e", "restaurant"])
    assert plan == {"restaurant": 80, "e2e": 40}
    # "all" (the split before 2026-12-08): one 80 over both, so the replayed task got 40
    assert pseudo_sample_plan(0.2, 400, replay=["restaurant"], transfer=["e2e", "restaurant"], split="all") == \
        {"restaurant": 40, "e2e": 40}
    # two replayed and one selected task that is neither: the replayed share 80 / 2 whatever is selected
    assert pseudo_sample_plan(0.2, 400, replay=["a", "b"], transfer=["c"]) == {"a": 40, "b": 40, "c": 80}
    assert pseudo_sample_plan(0.2, 400, replay=["a", "b"], transfer=[]) == {"a": 40, "b": 40}  # acm: as before
    assert pseudo_sample_plan(0.2, 400, replay=["a"], transfer=["c"], budget="per_task") == {"a": 80, "c": 80}
    assert pseudo_sample_plan(0.0, 400, replay=["a"], transfer=["c"]) == {"a": 0, "c": 0}
    with pytest.raises(ValueError, match="pseudo_split"):
        pseudo_sample_plan(0.2, 400, replay=["a"], transfer=[], split="even")
    # a stand-in for a selected task the gate dropped: a selected task's share (80 / 2), or "all"'s one share
    plan = pseudo_sample_plan(0.2, 400, replay=["a"], transfer=["b", "c"])
    assert stand_in_count(plan, 0.2, 400, transfer=["b", "c"]) == 40
    old_plan = pseudo_sample_plan(0.2, 400, replay=["a"], transfer=["b", "c"], split="all")
    assert stand_in_count(old_plan, 0.2, 400, transfer=["b", "c"], split="all") == 26  # 80 // 3


def test_shortfalls_and_low_yield_are_said():
    ok = PseudoSamples("t", rows=[{}] * 10, malformed=0, generated=10, requested=10)
    assert yield_warnings(ok, min_yield=0.9, new_task="n") == []
    low = PseudoSamples("t", rows=[{}] * 10, malformed=5, generated=15, requested=10,
                        reasons={"no_separator_cut": 1, "no_separator_ended": 4})
    (msg,) = yield_warnings(low, min_yield=0.9, new_task="n")
    assert "10 of 15" in msg and "min_yield" in msg
    # the user is told why, most frequent first
    assert msg.endswith("dropped: 4 ended before the answer separator, 1 cut at the length limit before the "
                        "answer separator")
    short = PseudoSamples("t", rows=[{}] * 4, malformed=20, generated=24, requested=10)
    assert any("4 of 10 requested" in m for m in yield_warnings(short, min_yield=0.9, new_task="n"))
    none = PseudoSamples("t", rows=[], malformed=24, generated=24, requested=10)
    assert any("neither replayed nor transferred" in m for m in yield_warnings(none, min_yield=0.9, new_task="n"))


def _examples(n):
    return [Example([i, i + 1], [i, i + 1]) for i in range(n)]


def test_batch_stream_reshuffles_every_epoch_and_is_a_pure_function_of_k():
    qa = _examples(12)
    stream = BatchStream(qa, qa, batch_size=4, pad_id=0, seed="s")
    assert len(stream) == 3
    first = [stream.batch(k)[0]["input_ids"][:, 0].tolist() for k in range(3)]
    second = [stream.batch(k)[0]["input_ids"][:, 0].tolist() for k in range(3, 6)]
    assert sorted(sum(first, [])) == sorted(sum(second, [])) == list(range(12))  # each epoch sees all
    assert first != second  # in another order
    again = BatchStream(qa, qa, batch_size=4, pad_id=0, seed="s")
    assert torch.equal(again.batch(4)[0]["input_ids"], stream.batch(4)[0]["input_ids"])
    # batch_size is the global batch: 2 ranks walk the same global batches and split each one
    shards = [BatchStream(qa, qa, batch_size=4, pad_id=0, seed="s", shard=(r, 2)) for r in range(2)]
    assert [len(s) for s in shards] == [3, 3]
    for k in range(3):
        parts = [s.batch(k)[0]["input_ids"][:, 0].tolist() for s in shards]
        assert sorted(parts[0] + parts[1]) == sorted(stream.batch(k)[0]["input_ids"][:, 0].tolist())


def test_rank_losses_average_to_the_global_batch_loss():
    """Each rank divides its summed loss by the global batch's (weighted) target count / world."""
    from dmea_dist.method.training import lm_cross_entropy

    g = torch.Generator().manual_seed(0)
    examples = [Example(ids, [-100] + ids[1:]) for ids in
                ([1, 2, 3], [4, 5, 6, 7], [8, 9], [1, 3, 5, 7, 9], [2, 4])]
    weights = {5: 5.0}
    logits = {tuple(e.input_ids): torch.randn(len(e.input_ids), 12, generator=g) for e in examples}

    def loss(batch):
        out = torch.nn.utils.rnn.pad_sequence([logits[tuple(r[m.bool()].tolist())] for r, m in
                                              zip(batch["input_ids"], batch["attention_mask"], strict=True)],
                                              batch_first=True)
        return lm_cross_entropy(out, batch["labels"], weights, batch.get("denominator"))

    whole = BatchStream(examples, examples, batch_size=5, pad_id=0, seed="x", token_weights=weights).batch(0)[0]
    for world in (2, 3, 4, 6):  # 6 > 5 examples: one rank's share is empty
        shares = [BatchStream(examples, examples, batch_size=5, pad_id=0, seed="x", shard=(r, world),
                              token_weights=weights).batch(0)[0] for r in range(world)]
        mean = sum(loss(b) for b in shares) / world  # what data-parallel averaging computes
        assert float(mean) == pytest.approx(float(loss(whole)), rel=1e-6)


class _RecordingEngine:
    """Engine fake: reports what DMEAEngine.step reports, eta 1 and nothing clamped when not scaling."""

    virtual_shards = 0
    module = torch.nn.Linear(1, 1)

    def step(self, sub_batches, *, progress, scale, unscaled):
        from dmea_dist.engine import StepStats

        replay = [k for k, _ in sub_batches[1:] if k not in unscaled]
        etas = {k: 10.0 if scale else 1.0 for k in replay}  # scaled: at the upper clamp bound
        return StepStats(losses={k: 1.0 for k, _ in sub_batches}, etas=etas,
                         clamped=dict.fromkeys(replay, scale), sq_norms={}, matched_sq_norms={}, scaled=scale)


@pytest.mark.parametrize("scale", [True, False])
def test_eta_and_clamp_rate_are_recorded_only_for_scaled_steps(scale):
    """Unscaled runs (acm, lamol, the ablation) printed 'eta at clamp 0%' from the engine's placeholder eta 1."""
    from dmea_dist.method.adaptation import Source, adapt

    qa = _examples(8)
    sources = [Source(key, BatchStream(qa, qa, batch_size=4, pad_id=0, seed=key), path=None)
               for key in ("new", "replay:a")]
    result = adapt(_RecordingEngine(), sources=sources, epochs=2, lm_lambda=1.0, scale=scale)
    assert result.steps == 4 and len(result.losses["replay:a"]) == 4
    if scale:
        assert result.etas == {"replay:a": [10.0] * 4} and result.clamp_rate() == 1.0
    else:
        assert result.etas == {} and result.clamp_hits == {} and result.clamp_rate() is None


class _Toy(torch.nn.Module):
    """A bigram model: each token's logits are its embedding row (what the engine's forward runs)."""

    def __init__(self, vocab: int = 12):
        super().__init__()
        self.emb = torch.nn.Embedding(vocab, vocab)
        torch.nn.init.normal_(self.emb.weight, generator=torch.Generator().manual_seed(0))

    def forward(self, input_ids, attention_mask=None, path=None):
        from types import SimpleNamespace

        return SimpleNamespace(logits=self.emb(input_ids))


class _LossEngine:
    """Engine fake that runs every sub-batch's closure (through itself, as DeepSpeed's forward) and reports
    the losses; and which groups the step was told to leave unscaled."""

    virtual_shards = 0

    def __init__(self):
        self.module = _Toy()
        self.unscaled = []

    def __call__(self, *args, **kwargs):
        return self.module(*args, **kwargs)

    def step(self, sub_batches, *, progress, scale, unscaled):
        from dmea_dist.engine import StepStats

        self.unscaled.append(sorted(unscaled))
        return StepStats(losses={k: float(closure().detach()) for k, closure in sub_batches}, etas={}, clamped={},
                         sq_norms={}, matched_sq_norms={}, scaled=False)


def test_adaptation_losses_weight_the_answer_separator_as_a_weighted_mean():
    """The loss an adaptation step trains on, against a float64 computation by hand: each target's
    NLL weighted by its token's weight (the separator x5), divided by the summed weights of the targets."""
    from dmea_dist.method.adaptation import Source, adapt

    examples = [Example(ids, [-100] + ids[1:]) for ids in ([1, 5, 3, 5, 2], [4, 5, 6], [7, 8, 5, 9], [2, 5])]
    weights = {5: 5.0}
    engine = _LossEngine()
    sources = [Source("new", BatchStream(examples, examples, batch_size=4, pad_id=0, seed="w",
                                         token_weights=weights), path=None)]
    result = adapt(engine, sources=sources, epochs=1, lm_lambda=0.0, scale=False, token_weights=weights)
    table = engine.module.emb.weight.detach().double()
    total = norm = 0.0
    for ex in examples:
        for t in range(len(ex.input_ids) - 1):
            target = ex.labels[t + 1]
            w = weights.get(target, 1.0)
            total -= w * float(torch.log_softmax(table[ex.input_ids[t]], dim=-1)[target])
            norm += w
    assert result.losses["new"] == [pytest.approx(total / norm, rel=1e-5)]


def test_only_replay_streams_are_scaled_transfer_streams_are_added_as_they_are():
    from dmea_dist.method.adaptation import Source, adapt

    qa = _examples(8)
    sources = [Source(key, BatchStream(qa, qa, batch_size=4, pad_id=0, seed=key), path=None)
               for key in ("new", "transfer:a", "replay:b")]
    engine = _LossEngine()
    engine.module = _Toy(vocab=16)
    adapt(engine, sources=sources, epochs=2, lm_lambda=0.0, scale=True, mixing="all")
    assert engine.unscaled == [["transfer:a"]] * 4


def test_a_request_made_in_pieces_keeps_what_was_asked_not_what_came_out():
    """The pieces of a generate call are merged into what the request asked for: a shortfall stays visible."""
    from dmea_dist.kernels import GenerateRequest, merge_pseudo_samples

    request = GenerateRequest(task_id="t", task_index=0, path=None, n=10, seed=0)
    parts = [PseudoSamples("t", rows=[{}] * 3, malformed=5, generated=8, requested=6, reasons={"x": 5}),
             PseudoSamples("t", rows=[{}] * 1, malformed=6, generated=7, requested=4, reasons={"x": 6})]
    out = merge_pseudo_samples(request, parts)
    assert (out.requested, len(out.rows), out.generated, out.well_formed, out.reasons) == (10, 4, 15, 4, {"x": 11})
    assert any("4 of 10 requested" in w for w in yield_warnings(out, min_yield=0.0, new_task="n"))
