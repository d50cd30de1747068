"""Tokenizer with reserved tokens, LAMOL formatting, truncation, batching, parsing."""

import pytest
import torch

from dmea_dist.data.formatting import (
    IGNORE,
    MALFORMED,
    BatchStream,
    Formatter,
    collate,
    encode_task,
    left_pad,
)
from dmea_dist.data.tokenizer import (
    ANS_TOKEN,
    SpecialTokenIds,
    load_tokenizer,
    task_token,
    train_bpe_tokenizer,
)

TEXTS = [
    "inform(name='red lion';area='north')",
    "the red lion is in the north of town",
    "inform(name='blue bell';food='thai')",
    "blue bell serves thai food",
] * 20


@pytest.fixture(scope="module")
def tokenizer():
    return train_bpe_tokenizer(TEXTS, vocab_size=400, max_tasks=130)


def test_reserved_tokens_are_single_ids(tokenizer):
    special = SpecialTokenIds.from_tokenizer(tokenizer)
    assert len(special.tasks) == 130  # 100+ tasks need no resize later
    assert len(set(special.tasks) | {special.ans, special.eos}) == 132
    for i in (0, 57, 129):
        assert tokenizer(task_token(i), add_special_tokens=False)["input_ids"] == [special.tasks[i]]
    assert tokenizer(ANS_TOKEN, add_special_tokens=False)["input_ids"] == [special.ans]
    assert special.pad == special.eos


def test_a_gpt2_tokenizer_whose_unk_is_its_eos_gets_its_reserved_tokens(tmp_path):
    """GPT-2's unk token is <|endoftext|>, its eos: that is no missing reserved token (configs/gpt2.yaml)."""
    from tokenizers import pre_tokenizers
    from transformers import GPT2Tokenizer

    from dmea_dist.data.tokenizer import load_pretrained_tokenizer

    vocab = {c: i for i, c in enumerate(sorted(pre_tokenizers.ByteLevel.alphabet()))}
    vocab["<|endoftext|>"] = len(vocab)
    GPT2Tokenizer(vocab=vocab, merges=[]).save_pretrained(tmp_path / "gpt2")  # a byte-level gpt2, offline
    gpt2 = load_pretrained_tokenizer(str(tmp_path / "gpt2"), max_tasks=4)
    assert gpt2.unk_token_id == gpt2.eos_token_id == vocab["<|endoftext|>"]
    special = Formatter(gpt2, max_length=32).special
    assert special.eos == vocab["<|endoftext|>"] and len({special.ans, special.eos, *special.tasks}) == 6
    assert gpt2(ANS_TOKEN + task_token(3), add_special_tokens=False)["input_ids"] == [special.ans, special.tasks[3]]
    with pytest.raises(ValueError, match="lacks the reserved special tokens"):  # a tokenizer without them
        SpecialTokenIds.from_tokenizer(GPT2Tokenizer(vocab=vocab, merges=[]))


def test_tokenizer_save_load_roundtrip(tokenizer, tmp_path):
    tokenizer.save_pretrained(tmp_path)
    again = load_tokenizer(tmp_path)
    text = "the red lion serves thai food"
    assert again(text)["input_ids"] == tokenizer(text)["input_ids"]
    assert SpecialTokenIds.from_tokenizer(again) == SpecialTokenIds.from_tokenizer(tokenizer)


def test_a_saved_bpe_loads_as_auto_tokenizer_loads_it_and_other_classes_still_go_through_it(tokenizer, tmp_path):
    """load_tokenizer reads a run's BPE without AutoTokenizer (whose import delays the driver's start, ~2 s);
    checked against AutoTokenizer's own load of the same folder. A folder that names another class still
    gets that class."""
    import json

    from transformers import AutoTokenizer

    tokenizer.save_pretrained(tmp_path / "bpe")
    ours, auto = load_tokenizer(tmp_path / "bpe"), AutoTokenizer.from_pretrained(str(tmp_path / "bpe"))
    assert type(ours) is type(auto)
    text = f"{task_token(7)}inform(name='red lion') {ANS_TOKEN} the red lion<|endoftext|> unseen words ünï"
    assert ours(text)["input_ids"] == auto(text)["input_ids"]
    assert ours.decode(ours(text)["input_ids"]) == auto.decode(auto(text)["input_ids"])
    assert ours.get_vocab() == auto.get_vocab() and ours.special_tokens_map == auto.special_tokens_map
    assert (ours.padding_side, ours.pad_token_id, len(ours)) == (auto.padding_side, auto.pad_token_id, len(auto))

    tokenizer.save_pretrained(tmp_path / "gpt2")
    config_file = tmp_path / "gpt2" / "tokenizer_config.json"
    config = json.loads(config_file.read_text())
    config_file.write_text(json.dumps({**config, "tokenizer_class": "GPT2Tokenizer"}))
    assert type(load_tokenizer(tmp_path / "gpt2")).__name__ == "GPT2Tokenizer"


def test_qa_and_lm_examples(tokenizer):
    fmt = Formatter(tokenizer, max_length=64)
    sp = fmt.special
    qa = fmt.qa_example("inform(name='red lion')", "", "the red lion")
    sep = qa.input_ids.index(sp.ans)
    assert qa.labels[: sep + 1] == [IGNORE] * (sep + 1)  # no loss on the prompt
    assert qa.labels[sep + 1:] == qa.input_ids[sep + 1:]
    assert qa.input_ids[-1] == sp.eos
    assert tokenizer.decode(qa.input_ids[sep + 1:-1]).strip() == "the red lion"

    lm = fmt.lm_example("inform(name='red lion')", "", "the red lion", task_index=3)
    assert lm.input_ids[0] == sp.tasks[3]
    assert lm.labels[0] == IGNORE and lm.labels[1:] == lm.input_ids[1:]
    assert lm.input_ids[1:] == qa.input_ids  # same body, plus the generation token


def test_truncation_keeps_the_answer(tokenizer):
    fmt = Formatter(tokenizer, max_length=24)
    long_context = " ".join(["inform(name='red lion';area='north')"] * 10)
    ex = fmt.lm_example(long_context, "", "blue bell serves thai food", task_index=0)
    assert len(ex.input_ids) <= 24
    sep = ex.input_ids.index(fmt.special.ans)
    assert tokenizer.decode(ex.input_ids[sep + 1:-1]).strip() == "blue bell serves thai food"
    assert fmt.truncated == 1
    # an answer longer than the budget is itself cut, and still ends with eos
    ex = fmt.qa_example("x", "", " ".join(["the red lion"] * 30))
    assert len(ex.input_ids) <= 24 and ex.input_ids[-1] == fmt.special.eos


def test_parse_generated_roundtrip_and_malformed(tokenizer):
    fmt = Formatter(tokenizer, max_length=64)
    lm = fmt.lm_example("inform(name='blue bell')", "", "blue bell serves thai food", task_index=0)
    assert fmt.parse_generated(lm.input_ids[1:]) == ("inform(name='blue bell')", "blue bell serves thai food")
    body = lm.input_ids[1:]
    sp = fmt.special
    assert fmt.parse_generated([i for i in body if i != sp.ans]) is None  # no separator
    # cut at the length limit (no end token): kept up to where it stops, as LAMOL/ACM keep it
    assert fmt.parse_generated(body[:-1]) == ("inform(name='blue bell')", "blue bell serves thai food")
    assert fmt.parse_generated(body[:-3])[0] == "inform(name='blue bell')"
    sep = body.index(sp.ans)
    assert fmt.parse_generated(body[:sep + 2] + [sp.ans] + body[sep + 2:]) is None  # two separators
    assert fmt.parse_generated(body[:2] + [sp.tasks[1]] + body[2:]) is None  # a generation token inside
    assert fmt.parse_generated(body + [sp.ans, 5]) == fmt.parse_generated(body)  # nothing after the end counts
    assert fmt.parse_generated([sp.ans] + body) is None  # empty context
    assert fmt.parse_generated(body[: body.index(sp.ans) + 1] + [sp.eos]) is None  # empty answer
    # and why each was dropped
    no_sep = [i for i in body if i != sp.ans]
    assert fmt.split_generated(no_sep) == "no_separator_ended"
    assert fmt.split_generated(no_sep[:-1]) == "no_separator_cut"  # no end token: cut at the length limit
    assert fmt.split_generated(body[:sep + 2] + [sp.ans] + body[sep + 2:]) == "several_separators"
    assert fmt.split_generated(body[:2] + [sp.tasks[1]] + body[2:]) == "task_token"
    assert fmt.split_generated(body[sep:]) == "empty_input"
    assert fmt.split_generated(body[: sep + 1] + [sp.eos]) == "empty_answer"
    assert fmt.split_generated(body) == fmt.parse_generated(body)


def test_collate_and_left_pad():
    from dmea_dist.data.formatting import Example

    batch = collate([Example([5, 6, 7], [IGNORE, 6, 7]), Example([8], [8])], pad_id=0)
    assert batch["input_ids"].tolist() == [[5, 6, 7], [8, 0, 0]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0]]
    assert batch["labels"].tolist() == [[IGNORE, 6, 7], [8, IGNORE, IGNORE]]
    lp = left_pad([[1, 2, 3], [4]], pad_id=0)
    assert lp["input_ids"].tolist() == [[1, 2, 3], [0, 0, 4]]
    assert lp["attention_mask"].tolist() == [[1, 1, 1], [0, 0, 1]]


def test_batches_hold_one_task_and_shards_are_disjoint(tokenizer):
    fmt = Formatter(tokenizer, max_length=64)
    rows = [{"context": f"inform(name='n{i}')", "question": "", "answer": [f"name {i}", "alt"]} for i in range(10)]
    qa, lm = encode_task(fmt, rows, task_index=2)
    assert len(qa) == len(lm) == 10
    assert all(ex.input_ids[0] == fmt.special.tasks[2] for ex in lm)
    qa_all, _ = encode_task(fmt, rows, task_index=2, references="all")
    assert len(qa_all) == 20
    seen = []
    for rank in range(2):
        for qb, lb in BatchStream(qa, lm, batch_size=4, pad_id=fmt.special.pad, seed=0, shard=(rank, 2)).epoch(0):
            assert qb["input_ids"].shape[0] == lb["input_ids"].shape[0]
            assert torch.all(lb["input_ids"][:, 0] == fmt.special.tasks[2])
            seen += [tuple(r[r != fmt.special.pad].tolist()) for r in qb["input_ids"]]
    assert len(seen) == len(set(seen)) == 10  # the ranks' shares of the global batches: all, once


def test_fixed_pieces_are_the_same_whatever_the_rank_count(tokenizer):
    """`shard_batches`: piece s holds the same examples (with the whole batch's denominator) on 1, 2 or 4
    ranks; each rank gets the pieces it owns; a piece left empty by a short last batch adds nothing."""
    fmt = Formatter(tokenizer, max_length=64)
    rows = [{"context": f"inform(name='n{i}')", "question": "", "answer": [f"name {i}"]} for i in range(10)]
    qa, lm = encode_task(fmt, rows, task_index=0)

    def pieces(world, k):
        out = {}
        for rank in range(world):
            stream = BatchStream(qa, lm, batch_size=6, pad_id=fmt.special.pad, seed=3, shard=(rank, world))
            mine = stream.shard_batches(k, 4)
            assert sorted(mine) == list(range(rank, 4, world))
            out.update(mine)
        return out

    for k in (0, 1, 2):  # batch 1 is the short last one (4 of 6 examples), batch 2 the next epoch's first
        one = pieces(1, k)
        for world in (2, 4):
            other = pieces(world, k)
            assert sorted(other) == [0, 1, 2, 3]
            for s in range(4):
                for part in (0, 1):
                    assert other[s][part].keys() == one[s][part].keys()
                    for key in one[s][part]:
                        assert torch.equal(other[s][part][key], one[s][part][key]), (world, k, s, key)
        whole = BatchStream(qa, lm, batch_size=6, pad_id=fmt.special.pad, seed=3).batch(k)[0]
        n_examples = whole["input_ids"].shape[0]
        real = [s for s in range(4) if torch.isfinite(one[s][0]["denominator"])]
        assert len(real) == min(4, n_examples)  # the empty pieces have denominator inf
        assert all(float(one[s][0]["denominator"]) == float(whole["denominator"]) for s in real)
        assert sum(one[s][0]["input_ids"].shape[0] for s in real) == n_examples
    with pytest.raises(ValueError, match="3 pieces cannot be split evenly over 2 ranks"):
        BatchStream(qa, lm, batch_size=6, pad_id=0, seed=3, shard=(0, 2)).shard_batches(0, 3)


def test_generation_counts_every_dropped_sample_by_why(tokenizer):
    """An untrained model writes mostly malformed samples: each one is counted under one reason."""
    from transformers import GPT2Config, GPT2LMHeadModel

    from dmea_dist.method.generation import generate_pseudo_samples
    from dmea_dist.modeling.model import DMEAModel

    torch.manual_seed(0)
    backbone = GPT2LMHeadModel(GPT2Config(vocab_size=len(tokenizer), n_positions=48, n_embd=16, n_layer=2, n_head=2))
    model = DMEAModel(backbone, bottleneck=4)
    out = generate_pseudo_samples(model, Formatter(tokenizer, max_length=24), task_id="t", task_index=0, path=None,
                                  n=16, seed=0, max_rounds=2)
    assert out.malformed > 0 and sum(out.reasons.values()) == out.malformed
    assert set(out.reasons) <= set(MALFORMED)
    assert "task_token" not in out.reasons  # generation tokens are suppressed while sampling


def test_greedy_after_the_separator_keeps_only_the_best_token_in_rows_past_it():
    """Pseudo answers are greedy once the separator is out (the input is sampled): in a row that contains
    it, every score but the argmax becomes -inf; rows before it keep their scores for top-k sampling."""
    from dmea_dist.method.generation import GreedyAfter

    sep = 7
    input_ids = torch.tensor([[3, 5, sep, 2], [3, 5, 6, 2], [sep, 1, 1, 1]])
    scores = torch.randn(3, 11, generator=torch.Generator().manual_seed(0))
    out = GreedyAfter(sep)(input_ids, scores.clone())
    for row in range(3):
        if sep in input_ids[row].tolist():
            best = int(scores[row].argmax())
            assert out[row, best] == scores[row, best]
            assert torch.isinf(out[row]).sum() == scores.shape[1] - 1 and (out[row][torch.isinf(out[row])] < 0).all()
        else:
            assert torch.equal(out[row], scores[row])


def test_one_separator_moves_the_end_tokens_probability_onto_the_separator_until_it_is_out():
    """Checked on probabilities computed apart from the processor: before a row's separator p(sep) becomes
    p(sep) + p(end) and p(end) 0; after it the reverse; right after the separator, or before any input token,
    both are 0 and the rest renormalised; every other token keeps its share."""
    from dmea_dist.method.generation import OneSeparator

    gen, sep, end = 1, 7, 9

    def expected(probs, into, out_of):
        probs = probs.clone()
        if into is None:  # both barred
            probs[[sep, end]] = 0.0
            return probs / probs.sum()
        probs[into] += probs[out_of]
        probs[out_of] = 0.0
        return probs

    input_ids = torch.tensor([[gen, 3, 5, 6], [gen, sep, 6, 2], [gen, 5, 6, sep]])
    scores = torch.randn(3, 11, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    scores[2, 4] = float("-inf")  # a suppressed token stays suppressed
    before = torch.softmax(scores, dim=-1)
    after = torch.softmax(OneSeparator(sep, end, prompt_length=1)(input_ids, scores.clone()), dim=-1)
    for row, (into, out_of) in enumerate([(sep, end), (end, sep), (None, None)]):
        torch.testing.assert_close(after[row], expected(before[row], into, out_of), rtol=0, atol=1e-12)
    first = torch.softmax(OneSeparator(sep, end, prompt_length=1)(input_ids[:, :1], scores.clone()), dim=-1)
    for row in range(3):  # no input token yet
        torch.testing.assert_close(first[row], expected(before[row], None, None), rtol=0, atol=1e-12)


def test_pseudo_samples_that_end_keep_exactly_one_separator_with_pseudo_separator_one(tokenizer):
    """A model that often ends before writing the separator: free sampling keeps none of its samples (they
    end without one); with "one" no sample ends without a separator or holds two, so some are kept."""
    from transformers import GPT2Config, GPT2LMHeadModel

    from dmea_dist.kernels import DecodingSettings, GenerateRequest, run_generate_requests
    from dmea_dist.method.generation import generate_pseudo_samples
    from dmea_dist.modeling.model import DMEAModel

    fmt = Formatter(tokenizer, max_length=24)
    torch.manual_seed(0)
    backbone = GPT2LMHeadModel(GPT2Config(vocab_size=len(tokenizer), n_positions=48, n_embd=16, n_layer=2, n_head=2,
                                          bos_token_id=fmt.special.eos, eos_token_id=fmt.special.eos))
    with torch.no_grad():  # every position leans towards the end token
        row = backbone.transformer.wte.weight[fmt.special.eos]
        backbone.transformer.ln_f.bias += 0.3 * row / row.norm() ** 2
    model = DMEAModel(backbone, bottleneck=4)
    outs = {separator: generate_pseudo_samples(model, fmt, task_id="t", task_index=0, path=None, n=16, seed=0,
                                               max_rounds=2, answer="sampled", separator=separator)
            for separator in ("free", "one")}
    assert not outs["free"].rows and outs["free"].reasons.get("no_separator_ended", 0) > outs["free"].generated // 2
    assert outs["one"].rows
    # what ends has one separator (an input or answer can still be only whitespace, which strips to empty)
    assert not {"no_separator_ended", "several_separators"} & set(outs["one"].reasons)
    # and through the kernel every stage and the Ray generation pool call, from its DecodingSettings
    request = GenerateRequest(task_id="t", task_index=0, path=None, n=16, seed=0)
    kept = {separator: run_generate_requests(model, fmt, [request], DecodingSettings(
        pseudo_answer="sampled", pseudo_separator=separator, batch_size=16))[0].rows for separator in ("free", "one")}
    assert not kept["free"] and kept["one"]
    with pytest.raises(ValueError, match="pseudo-sample separator 'both' unknown"):
        generate_pseudo_samples(model, fmt, task_id="t", task_index=0, path=None, n=1, separator="both")


class _TaskEcho:
    """A fake generator: row b writes "<context of its task and path> <|ans|> <answer> <eos>", or, for the
    tasks in `broken`, a sequence without separator; it records every call's rows and routing."""

    def __init__(self, tokenizer, fmt, broken=()):
        self.fmt, self.special, self.broken = fmt, fmt.special, set(broken)
        self.ids = lambda text: tokenizer(text, add_special_tokens=False)["input_ids"]
        self.calls, self.training = [], False

    def eval(self):
        return self

    def train(self, mode=True):
        self.training = mode

    def generate(self, prompt, *, path=None, paths=None, **kwargs):
        tasks = [self.special.tasks.index(int(t)) for t in prompt[:, 0]]
        routes = paths if paths is not None else [path] * len(tasks)
        self.calls.append((tasks, routes, paths is not None))
        rows = []
        for task, route in zip(tasks, routes, strict=True):
            if task in self.broken:
                body = self.ids("red lion")  # no separator: malformed
            else:
                body = self.ids(f"red lion {task} north {route[0]}") + [self.special.ans] + self.ids("thai")
            rows.append([self.special.tasks[task], *body, self.special.eos])
        width = max(len(r) for r in rows)
        return torch.tensor([r + [self.special.pad] * (width - len(r)) for r in rows])


def test_pseudo_samples_of_many_tasks_share_batches_and_keep_their_own_task(tokenizer):
    from dmea_dist.method.generation import SampleWant, generate_pseudo_samples_of

    fmt = Formatter(tokenizer, max_length=40)
    model = _TaskEcho(tokenizer, fmt, broken={3})
    wants = [SampleWant(f"t{k}", k, [k % 5, 0], 1 + k % 2) for k in range(12)]  # 18 samples of 12 tasks
    outs = generate_pseudo_samples_of(model, fmt, wants, batch_size=32, seed=0, max_rounds=3)
    assert [o.task_id for o in outs] == [w.task_id for w in wants]
    for want, out in zip(wants, outs, strict=True):
        if want.task_index == 3:
            assert not out.rows and out.malformed == out.generated > 0  # counted where it failed
            continue
        assert len(out.rows) == want.n == out.generated and out.malformed == 0
        assert all(row["context"] == f"red lion {want.task_index} north {want.path[0]}" for row in out.rows)
    first_tasks, first_routes, mixed = model.calls[0]
    assert mixed and len(set(first_tasks)) == 12  # one generate call for every task
    assert all(route == wants[task].path for task, route in zip(first_tasks, first_routes, strict=True))
    assert all(set(tasks) == {3} for tasks, _, _ in model.calls[1:])  # later rounds re-ask only what is short
    assert len(model.calls) == 3


def test_pseudo_samples_do_not_depend_on_how_the_pieces_are_shared_among_actors(tokenizer):
    """A generate call is cut into pieces of one batch, each seeded by the call and its index: run piece by
    piece (in process), as one run (one actor) or split 1 + 2 (two actors), it makes the same samples."""
    from transformers import GPT2Config, GPT2LMHeadModel

    from dmea_dist.kernels import (
        DecodingSettings,
        GenerateRequest,
        merge_pseudo_samples,
        run_generate_requests,
    )
    from dmea_dist.modeling.model import DMEAModel

    fmt = Formatter(tokenizer, max_length=24)
    torch.manual_seed(0)
    backbone = GPT2LMHeadModel(GPT2Config(vocab_size=len(tokenizer), n_positions=48, n_embd=16, n_layer=2, n_head=2,
                                          bos_token_id=fmt.special.eos, eos_token_id=fmt.special.eos))
    model = DMEAModel(backbone, bottleneck=4)
    decoding = DecodingSettings(pseudo_answer="sampled", pseudo_separator="one", batch_size=4)
    requests = [GenerateRequest(task_id="a", task_index=0, path=None, n=6, seed=3),
                GenerateRequest(task_id="b", task_index=1, path=None, n=4, seed=3)]  # pieces [0, 4) [4, 8) [8, 10)

    def made(groups):
        parts = [run_generate_requests(model, fmt, requests, decoding, parts=group) for group in groups]
        return [merge_pseudo_samples(r, [p[i] for p in parts]) for i, r in enumerate(requests)]

    alone = made([range(0, 1), range(1, 2), range(2, 3)])
    assert sum(len(o.rows) for o in alone) >= 3  # samples to compare
    for groups in ([range(0, 3)], [range(0, 1), range(1, 3)]):
        for a, b in zip(alone, made(groups), strict=True):
            assert (a.rows, a.generated, a.malformed, a.reasons) == (b.rows, b.generated, b.malformed, b.reasons)
