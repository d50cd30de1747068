"""Task metrics against values computed by hand or by independent code in this file.

Strings use lowercase ASCII words of at most three letters (or words the Porter
stemmer leaves alone) and no punctuation, so whitespace splitting here gives the
same tokens as rouge-score's and sacrebleu's tokenizers.
"""

from __future__ import annotations

import math
from collections import Counter

import pytest
from sacrebleu.metrics import BLEU

from dmea_dist.evaluation.metrics import (
    bleu_score,
    exact_match,
    normalize_answer,
    rouge_scores,
    score_task,
)


# ------------------------------------------------------------ reference code
def _ngrams(tokens: list[str], n: int) -> Counter:
    return Counter(tuple(tokens[k : k + n]) for k in range(len(tokens) - n + 1))


def _f1(overlap: int, n_pred: int, n_ref: int) -> float:
    if overlap == 0:
        return 0.0
    precision, recall = overlap / n_pred, overlap / n_ref
    return 2 * precision * recall / (precision + recall)


def _rouge_n(pred: str, ref: str, n: int) -> float:
    p, r = _ngrams(pred.split(), n), _ngrams(ref.split(), n)
    return _f1(sum((p & r).values()), sum(p.values()), sum(r.values()))


def _lcs(a: list[str], b: list[str]) -> int:
    table = [[0] * (len(b) + 1) for _ in range(len(a) + 1)]
    for x in range(len(a)):
        for y in range(len(b)):
            table[x + 1][y + 1] = (table[x][y] + 1 if a[x] == b[y]
                                   else max(table[x][y + 1], table[x + 1][y]))
    return table[-1][-1]


def _rouge_l(pred: str, ref: str) -> float:
    a, b = pred.split(), ref.split()
    return _f1(_lcs(a, b), len(a), len(b))


def _corpus_bleu(hyps: list[str], refs: list[list[str]]) -> float:
    """Papineni et al. BLEU-4, no smoothing (every order must have a match)."""
    correct, total = [0] * 4, [0] * 4
    sys_len = ref_len = 0
    for hyp, input_refs in zip(hyps, refs, strict=True):
        h = hyp.split()
        sys_len += len(h)
        lens = [len(r.split()) for r in input_refs]
        ref_len += min(lens, key=lambda n: (abs(n - len(h)), n))  # closest, ties to shorter
        for n in range(1, 5):
            max_ref = Counter()
            for r in input_refs:
                max_ref |= _ngrams(r.split(), n)  # per n-gram max count over references
            hyp_counts = _ngrams(h, n)
            correct[n - 1] += sum((hyp_counts & max_ref).values())
            total[n - 1] += sum(hyp_counts.values())
    bp = 1.0 if sys_len >= ref_len else math.exp(1 - ref_len / sys_len)
    return 100 * bp * math.exp(sum(math.log(c / t) for c, t in zip(correct, total, strict=True)) / 4)


# ---------------------------------------------------------------------- ROUGE
def test_rouge_single_reference_by_hand():
    # pred unigrams: the x2, cat, sat, on, mat; ref: the x2, cat, is, on, mat -> overlap 5 of 6.
    # bigrams overlap {the cat, on the, the mat} = 3 of 5; LCS "the cat on the mat" = 5.
    scores = rouge_scores(["the cat sat on the mat"], [["the cat is on the mat"]])
    assert scores["rouge1"] == pytest.approx(100 * 5 / 6)
    assert scores["rouge2"] == pytest.approx(100 * 3 / 5)
    assert scores["rougeL"] == pytest.approx(100 * 5 / 6)
    assert scores["rouge_avg"] == pytest.approx(100 * (5 / 6 + 3 / 5 + 5 / 6) / 3)


@pytest.mark.parametrize(
    ("pred", "ref"),
    [
        ("a red car is in the lot", "the car in the lot is red"),
        ("one two six two one", "two one six one two two"),
        ("we saw it go by the old mill", "the old man saw it go"),
        ("zz", "yy xx"),
    ],
)
def test_rouge_matches_independent_counts(pred, ref):
    scores = rouge_scores([pred], [[ref]])
    assert scores["rouge1"] == pytest.approx(100 * _rouge_n(pred, ref, 1))
    assert scores["rouge2"] == pytest.approx(100 * _rouge_n(pred, ref, 2))
    assert scores["rougeL"] == pytest.approx(100 * _rouge_l(pred, ref))


def test_rouge_averages_over_inputs():
    preds = ["a red car is in the lot", "we saw it go by the old mill"]
    refs = [["the car in the lot is red"], ["the old man saw it go"]]
    scores = rouge_scores(preds, refs)
    expected = sum(_rouge_l(p, r[0]) for p, r in zip(preds, refs, strict=True)) / 2
    assert scores["rougeL"] == pytest.approx(100 * expected)


def test_rouge_uses_porter_stemming():
    # "running" -> "run", "runs" -> "run", "dogs" -> "dog": a full match only with stemming.
    assert rouge_scores(["running dogs"], [["runs dog"]])["rouge1"] == pytest.approx(100.0)
    # The irregular "ran" is not reduced to "run".
    assert rouge_scores(["ran"], [["running"]])["rouge1"] == 0.0


def test_rouge_multi_reference_takes_best_per_metric():
    # Against "d c b a": R1 = 1, R2 = 0, LCS = 1 -> L = 1/4.
    # Against "a b x y": R1 = 1/2, R2 = 1/3, LCS "a b" -> L = 1/2.
    # Per metric, the better reference wins, so R1 and R2 come from different ones.
    scores = rouge_scores(["a b c d"], [["d c b a", "a b x y"]])
    assert scores["rouge1"] == pytest.approx(100.0)
    assert scores["rouge2"] == pytest.approx(100 / 3)
    assert scores["rougeL"] == pytest.approx(50.0)
    single = rouge_scores(["a b c d"], [["a b x y"]])
    assert single["rouge1"] == pytest.approx(50.0)


def test_rouge_accepts_a_string_as_one_reference():
    assert rouge_scores(["the cat"], ["the cat"])["rougeL"] == pytest.approx(100.0)


# ----------------------------------------------------------------------- BLEU
def test_bleu_perfect_match_is_100():
    preds = ["the cat sat on the mat", "a b c d e"]
    assert bleu_score(preds, [[p] for p in preds]) == pytest.approx(100.0)


def test_bleu_by_hand():
    # Clipped matches 5/6, 3/5, 2/4, 1/3; equal lengths so no brevity penalty.
    value = bleu_score(["the cat sat on the mat"], [["the cat sat on a mat"]])
    assert value == pytest.approx(100 * (5 / 6 * 3 / 5 * 2 / 4 * 1 / 3) ** 0.25)


def test_bleu_variable_reference_count_matches_independent_computation():
    hyps = ["the cat sat on the mat", "a b c d"]
    refs = [["the cat sat on a mat", "a cat sat on the mat"], ["a b c d e f g h"]]
    expected = _corpus_bleu(hyps, refs)
    assert bleu_score(hyps, refs) == pytest.approx(expected)
    # Order of inputs with fewer references does not matter.
    assert bleu_score(hyps[::-1], refs[::-1]) == pytest.approx(expected)
    # Padding with "" instead of None would add a zero-length reference and
    # drop the brevity penalty: the padding is what makes the value right.
    padded_wrong = BLEU().corpus_score(hyps, [[refs[0][0], refs[1][0]], [refs[0][1], ""]])
    assert padded_wrong.score != pytest.approx(expected)


def test_bleu_brevity_penalty_against_independent_computation():
    hyps = ["the cat sat", "a b c d e"]
    refs = [["the cat sat on the mat"], ["a b c d e f"]]
    assert bleu_score(hyps, refs) == pytest.approx(_corpus_bleu(hyps, refs))


# ----------------------------------------------------------------- exact match
def test_normalize_answer():
    assert normalize_answer("  The  Cat,\tsat.\n") == "the cat sat"
    assert normalize_answer("\u201cQuoted\u201d \u2014 text!") == "quoted text"
    assert normalize_answer("don't") == "dont"


def test_exact_match_normalises_and_matches_any_reference():
    preds = ["The cat sat.", "  hello   WORLD! ", "cats", "b"]
    refs = [["the cat sat"], ["hello world"], ["cat"], ["a", "B!"]]
    assert exact_match(preds, refs) == pytest.approx(75.0)


# ------------------------------------------------------------------ dispatch
def test_score_task_dispatch_and_primary():
    preds, refs = ["the cat sat on the mat"], [["the cat is on the mat"]]
    rouge = score_task("rouge", preds, refs)
    assert rouge["primary"] == rouge["rougeL"] == pytest.approx(100 * 5 / 6)
    assert set(rouge) == {"rouge1", "rouge2", "rougeL", "rouge_avg", "primary"}
    bleu = score_task("bleu", preds, refs)
    assert bleu == {"bleu": bleu_score(preds, refs), "primary": bleu_score(preds, refs)}
    assert score_task("em", ["The mat"], [["the mat"]]) == {"em": 100.0, "primary": 100.0}


def test_score_task_rejects_unknown_metric():
    with pytest.raises(ValueError, match="rouge, bleu, em"):
        score_task("meteor", ["a"], [["a"]])


@pytest.mark.parametrize("metric", ["rouge", "bleu", "em"])
def test_length_mismatch_names_both_lengths(metric):
    with pytest.raises(ValueError, match="3 predictions but 2 reference"):
        score_task(metric, ["a", "b", "c"], [["a"], ["b"]])


def test_bad_inputs_are_named():
    with pytest.raises(ValueError, match="input 1 has no references"):
        exact_match(["a", "b"], [["a"], []])
    with pytest.raises(ValueError, match="nothing to score"):
        bleu_score([], [])
    with pytest.raises(TypeError, match="prediction 0"):
        rouge_scores([None], [["a"]])
    with pytest.raises(TypeError, match="reference of input 0"):
        bleu_score(["a"], [[None]])
