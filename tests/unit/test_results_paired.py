"""benchmarks/results_sequences.py's paired comparison, against differences worked out by hand."""

from __future__ import annotations

import math

import pytest

from tests.unit.bench_script import load_script


@pytest.fixture(scope="module")
def results():
    return load_script("results_sequences")


def s(a, bwt):
    return {"A": a, "bwt": bwt}


def test_paired_differences_match_a_hand_computation(results):
    rows = [("ABCDE", 0, "dmea", s(23.26, -3.31)), ("ABCDE", 0, "acm", s(22.28, -3.86)),
            ("EDCBA", 0, "dmea", s(29.11, -0.17)), ("EDCBA", 0, "acm", s(29.66, -1.18)),
            ("ABCDE", 1, "dmea", s(24.82, -1.87)), ("ABCDE", 1, "acm", s(26.60, -1.09)),
            ("EDCBA", 1, "dmea", s(27.11, -2.85)), ("EDCBA", 1, "acm", s(23.16, -6.42)),
            ("EDCBA", 2, "acm", s(30.0, 0.0)),            # no dmea run of this order and seed: unpaired
            ("qs", 0, "dmea", s(67.12, -1.09)), ("qs", 0, "acm", s(66.85, None))]
    out = results.paired(rows)
    assert set(out) == {("rnnlg", "acm"), ("qs", "acm")}
    acm = out[("rnnlg", "acm")]
    # acm - dmea per pair: A_T -0.98, +0.55, +1.78, -3.95; BWT -0.55, -1.01, +0.78, -3.57
    a = [-0.98, 0.55, 1.78, -3.95]
    m = sum(a) / 4
    sd = math.sqrt(sum((x - m) ** 2 for x in a) / 3)
    assert acm["n"] == 4
    assert acm["A"][0] == pytest.approx(m) and acm["A"][1] == pytest.approx(sd)
    assert acm["A"][2] == 2  # dmea ahead on A_T in ABCDE s0 and EDCBA s1
    assert acm["bwt"][0] == pytest.approx((-0.55 - 1.01 + 0.78 - 3.57) / 4) and acm["bwt"][2] == 3
    qs = out[("qs", "acm")]
    assert qs["n"] == 1 and qs["A"][0] == pytest.approx(66.85 - 67.12) and qs["A"][1] is None
    assert qs["bwt"] == (None, None, 0)  # a missing figure is left out, not counted as zero
    assert (acm["n_A"], acm["n_bwt"], qs["n_A"], qs["n_bwt"]) == (4, 4, 1, 0)  # "ahead in k of n" per figure


def test_reference_method_can_be_chosen(results):
    rows = [("qs", 0, "dmea", s(1.0, 0.0)), ("qs", 0, "dmea-no-gs", s(3.0, 1.0))]
    assert results.paired(rows, reference="dmea-no-gs")[("qs", "dmea")]["A"][0] == pytest.approx(-2.0)


def test_fidelity_is_split_by_the_generated_tasks_family(results):
    records = [{"metrics": {"pseudo.fidelity.synth.restaurant.00": 0.8,
                            "pseudo.real_fidelity.synth.restaurant.00": 0.9}},
               {"metrics": {"pseudo.fidelity.synth.restaurant.00": 0.7, "pseudo.fidelity.synth.listops.00": 0.0,
                            "pseudo.real_fidelity.synth.listops.00": 0.0, "pseudo.yield.synth.listops.00": 0.8}},
               {"metrics": {"pseudo.fidelity.e2e": 0.5}}]
    assert results.fidelity_by_family({"records": records}) == {
        "restaurant": [(0.8, 0.9), (0.7, None)], "listops": [(0.0, 0.0)], "e2e": [(0.5, None)]}
