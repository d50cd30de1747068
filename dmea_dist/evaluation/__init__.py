"""Task metrics, continual-learning metrics over the R matrix, and reports (pure, offline)."""

from dmea_dist.evaluation.continual import (
    as_matrix,
    average_trajectory,
    backward_transfer,
    final_average,
    forgetting,
    forward_transfer,
    summarize,
)
from dmea_dist.evaluation.metrics import METRICS, bleu_score, exact_match, rouge_scores, score_task
from dmea_dist.evaluation.report import format_matrix_table

__all__ = [
    "METRICS", "as_matrix", "average_trajectory", "backward_transfer", "bleu_score", "exact_match",
    "final_average", "forgetting", "format_matrix_table", "forward_transfer",
    "rouge_scores", "score_task", "summarize",
]
