"""Review findings in dmea_dist/method, dmea_dist/engine and the evaluation metrics: each test shows one bug, fixed."""

from __future__ import annotations

from fractions import Fraction

from dmea_dist.method.generation import pseudo_sample_counts


def test_pseudo_sample_budget_is_the_ceiling_of_gamma_n_not_of_its_float_rounding():
    """ceil(0.07 * 100) gave 8: the float product is 7.000000000000001. The budget is ceil(gamma * N) of the
    numbers the user wrote; the reference below computes it in exact rationals."""
    for gamma, n_train, n_tasks in [(0.07, 100, 1), (0.07, 300, 2), (0.14, 50, 1), (0.29, 100, 1), (0.2, 400, 3)]:
        exact = -(-Fraction(str(gamma)) * n_train // 1)  # ceil, exactly
        assert pseudo_sample_counts(gamma, n_train, n_tasks, budget="per_task") == exact
        assert pseudo_sample_counts(gamma, n_train, n_tasks) == max(1, exact // n_tasks)
