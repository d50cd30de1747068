"""Task metrics: ROUGE, BLEU and exact match over generated answers.

Every function takes `predictions` (one string per input) and `references`
(a non-empty list of reference strings per input) and returns numbers on a
0..100 scale. Everything runs offline on packaged libraries (rouge-score,
sacrebleu); nothing is downloaded.

Key decisions:
- ROUGE is rouge-score's `RougeScorer(["rouge1", "rouge2", "rougeL"],
  use_stemmer=True)`, F-measure. Against several references we use its
  `score_multi` (rouge-score 0.1.2): for *each metric separately* it keeps the
  reference with the highest F-measure, so ROUGE-1 and ROUGE-L of one input
  may come from different references. Scores are averaged over inputs
  (macro average), as the LAMOL/ACM/DMEA papers report.
- rouge-score's tokenizer lowercases and keeps only `[a-z0-9]` runs, so
  non-ASCII letters are dropped ("café" -> "caf"); fine for the English
  corpora here, wrong for other scripts. An empty prediction or reference
  scores 0.
- BLEU is sacrebleu's corpus BLEU with its defaults (13a tokenizer, exp
  smoothing, case-sensitive). sacrebleu wants reference *streams* of equal
  length; inputs with fewer references are padded with `None`, which
  sacrebleu 2.6 drops per segment. Padding with "" would be wrong: sacrebleu
  keeps "" as a zero-length reference, which changes the closest reference
  length and hence the brevity penalty.
- Exact match normalises both sides (lowercase, delete Unicode punctuation,
  collapse whitespace, strip) and counts a hit if any reference matches.
  Articles are kept (unlike SQuAD's normaliser): the answers here are
  generated sentences, not spans.
- A plain string in place of an input's reference list is taken as that one
  reference (a string is a sequence of characters, which nobody means).
"""

from __future__ import annotations

import re
import unicodedata
from collections.abc import Sequence

from sacrebleu.metrics import BLEU

METRICS = ("rouge", "bleu", "em")
ROUGE_TYPES = ("rouge1", "rouge2", "rougeL")

_WHITESPACE = re.compile(r"\s+")


def _check_inputs(
    predictions: Sequence[str], references: Sequence[Sequence[str] | str]
) -> list[list[str]]:
    """Validate the pair and return references as a list of lists of strings."""
    if len(predictions) != len(references):
        raise ValueError(
            f"got {len(predictions)} predictions but {len(references)} reference lists; "
            "pass exactly one list of references per prediction"
        )
    if len(predictions) == 0:
        raise ValueError("nothing to score: predictions and references are empty")
    refs: list[list[str]] = []
    for index, (prediction, input_refs) in enumerate(zip(predictions, references, strict=True)):
        if not isinstance(prediction, str):
            raise TypeError(
                f"prediction {index} is {type(prediction).__name__}, expected str"
            )
        if isinstance(input_refs, str):
            input_refs = [input_refs]
        input_refs = list(input_refs)
        if not input_refs:
            raise ValueError(
                f"input {index} has no references; every input needs at least one"
            )
        for ref in input_refs:
            if not isinstance(ref, str):
                raise TypeError(
                    f"reference of input {index} is {type(ref).__name__}, expected str"
                )
        refs.append(input_refs)
    return refs


def rouge_scores(
    predictions: Sequence[str], references: Sequence[Sequence[str]]
) -> dict[str, float]:
    """ROUGE-1/2/L F-measure (Porter stemming), 0..100, averaged over inputs.

    Each prediction is scored against all its references and, per metric, the
    best reference (highest F-measure) counts: rouge-score's `score_multi`.
    Returns `rouge1`, `rouge2`, `rougeL` and `rouge_avg` (mean of the three).
    """
    # imported here, not with this module: it imports nltk (~1.4 s), which only scoring needs
    from rouge_score import rouge_scorer

    refs = _check_inputs(predictions, references)
    scorer = rouge_scorer.RougeScorer(list(ROUGE_TYPES), use_stemmer=True)
    totals = dict.fromkeys(ROUGE_TYPES, 0.0)
    for prediction, input_refs in zip(predictions, refs, strict=True):
        best = scorer.score_multi(input_refs, prediction)
        for rouge_type in ROUGE_TYPES:
            totals[rouge_type] += best[rouge_type].fmeasure
    result = {key: 100.0 * total / len(refs) for key, total in totals.items()}
    result["rouge_avg"] = sum(result[key] for key in ROUGE_TYPES) / len(ROUGE_TYPES)
    return result


def bleu_score(predictions: Sequence[str], references: Sequence[Sequence[str]]) -> float:
    """Corpus BLEU (sacrebleu defaults), 0..100, any number of references per input."""
    refs = _check_inputs(predictions, references)
    n_streams = max(len(input_refs) for input_refs in refs)
    # sacrebleu reads references as streams: stream k holds the k-th reference of
    # every input; shorter lists are padded with None, which sacrebleu skips.
    streams = [
        [input_refs[k] if k < len(input_refs) else None for input_refs in refs]
        for k in range(n_streams)
    ]
    return float(BLEU().corpus_score(list(predictions), streams).score)


def normalize_answer(text: str) -> str:
    """Lowercase, delete Unicode punctuation, collapse whitespace, strip."""
    text = text.lower()
    text = "".join(ch for ch in text if not unicodedata.category(ch).startswith("P"))
    return _WHITESPACE.sub(" ", text).strip()


def exact_match(predictions: Sequence[str], references: Sequence[Sequence[str]]) -> float:
    """Percentage of predictions equal to any of their references after normalisation."""
    refs = _check_inputs(predictions, references)
    hits = 0
    for prediction, input_refs in zip(predictions, refs, strict=True):
        normalized = normalize_answer(prediction)
        hits += any(normalized == normalize_answer(ref) for ref in input_refs)
    return 100.0 * hits / len(refs)


def score_task(
    metric: str, predictions: Sequence[str], references: Sequence[Sequence[str]]
) -> dict[str, float]:
    """Score one task with its metric; `primary` holds the number the R matrix uses.

    `metric` is "rouge" (primary: rougeL), "bleu" (primary: bleu) or "em"
    (primary: em).
    """
    if metric not in METRICS:
        raise ValueError(
            f"unknown task metric {metric!r}; accepted values: {', '.join(METRICS)}"
        )
    if metric == "rouge":
        result = rouge_scores(predictions, references)
        result["primary"] = result["rougeL"]
    elif metric == "bleu":
        bleu = bleu_score(predictions, references)
        result = {"bleu": bleu, "primary": bleu}
    else:
        em = exact_match(predictions, references)
        result = {"em": em, "primary": em}
    return result
