"""Benchmark metrics against hand-computed values."""

import math
from math import comb

import pytest

from rlspec.evals.metrics import (
    aes_against,
    maj_at_k,
    majority_answer,
    mean_pass_at_1,
    mean_pass_at_k,
    mean_tokens,
    pass_at_k,
    summarize_problems,
    truncation_rate,
)


def test_pass_at_k_hand_values():
    # Chen et al. Eq. 1: 1 - C(n-c, k) / C(n, k)
    assert pass_at_k(4, 1, 2) == pytest.approx(1 - 3 / 6)  # C(3,2)=3, C(4,2)=6
    assert pass_at_k(5, 2, 2) == pytest.approx(1 - 3 / 10)  # C(3,2)=3, C(5,2)=10
    assert pass_at_k(10, 3, 5) == pytest.approx(1 - 21 / 252)  # C(7,5)=21, C(10,5)=252
    assert pass_at_k(4, 0, 2) == 0.0
    assert pass_at_k(4, 3, 2) == 1.0  # n - c = 1 < k: every pair holds a correct sample
    assert pass_at_k(4, 1, 1) == pytest.approx(0.25)  # pass@1 = c / n
    assert pass_at_k(4, 4, 4) == 1.0


def test_pass_at_k_stable_for_large_n():
    # the product form must agree with the exact binomials where those are representable
    n, c, k = 200, 17, 50
    assert pass_at_k(n, c, k) == pytest.approx(1 - comb(n - c, k) / comb(n, k), rel=1e-12)


@pytest.mark.parametrize("args", [(2, 1, 3), (2, 3, 1), (4, 1, 0), (4, -1, 1), (4.0, 1, 1)])
def test_pass_at_k_rejects_bad_input(args):
    with pytest.raises(ValueError):
        pass_at_k(*args)


def test_mean_pass_at_1_and_k():
    verdicts = [[True, False, False, False], [True, True, False, False], [False] * 4]
    assert mean_pass_at_1(verdicts) == pytest.approx((1 / 4 + 2 / 4 + 0) / 3)
    # pass@2: problem 1: 1 - C(3,2)/C(4,2) = 1/2; problem 2: 1 - C(2,2)/C(4,2) = 5/6; problem 3: 0
    assert mean_pass_at_k(verdicts, 2) == pytest.approx((1 / 2 + 5 / 6 + 0) / 3)
    with pytest.raises(ValueError, match="problem 1 has no samples"):
        mean_pass_at_1([[True], []])


def test_majority_answer_ties_and_missing():
    assert majority_answer(["4", "3", "3", "4"]) == 0  # 2-2 tie: "4" came first
    assert majority_answer([None, "7", "5", "5"]) == 2  # "5" has 2 votes
    assert majority_answer(["\\frac{1}{2}", "\\frac{1} {2}", "3"]) == 0  # whitespace ignored
    assert majority_answer([None, None]) is None
    assert majority_answer([None, "9"]) == 1  # a missing answer does not vote


def test_maj_at_k_hand_values():
    answers = [
        ["4", "3", "3", "4"],  # tie -> "4" (sample 0, correct)
        ["5", "6", "6", None],  # "6" wins (sample 1, wrong) although sample 0 is right
        [None, None, None, None],  # no answer at all -> wrong
        ["2", "2", "1", "1"],  # tie -> "2" (sample 0, wrong)
    ]
    verdicts = [
        [True, False, False, True],
        [True, False, False, False],
        [False] * 4,
        [False, False, True, True],
    ]
    assert maj_at_k(answers, verdicts) == pytest.approx(1 / 4)


def test_mean_tokens_and_truncation():
    tokens = [[10, 20], [30, 40]]
    verdicts = [[True, False], [False, False]]
    out = mean_tokens(tokens, verdicts)
    assert out["mean_tokens"] == pytest.approx(25.0)
    assert out["mean_tokens_correct"] == pytest.approx(10.0)
    assert out["mean_tokens_incorrect"] == pytest.approx(30.0)  # (20 + 30 + 40) / 3
    assert math.isnan(mean_tokens([[5]], [[False]])["mean_tokens_correct"])
    assert truncation_rate([[True, False], [False, False]]) == 0.25


def test_summarize_problems_and_aes():
    def s(correct, answer, tokens, reason="stop"):
        return {"correct": correct, "answer": answer, "tokens": tokens, "finish_reason": reason}

    records = [
        {"samples": [s(True, "1", 10), s(False, "2", 30, "length")]},
        {"samples": [s(False, "7", 20), s(False, "7", 40)]},
    ]
    m = summarize_problems(records, 2)
    assert m["pass@1"] == pytest.approx(0.25)
    assert m["pass@2"] == pytest.approx(0.5)
    assert m["maj@2"] == pytest.approx(0.5)  # problem 1: 1-1 tie -> "1" (correct); problem 2: "7" wrong
    assert m["mean_tokens"] == pytest.approx(25.0)
    assert m["truncation_rate"] == pytest.approx(0.25)
    assert m["num_samples"] == 4.0
    # AES (O1-Pruner): dLen = (50 - 25)/50 = .5, dAcc = (.25 - .2)/.2 = .25 -> .5 + 3 * .25 = 1.25
    assert aes_against(m, {"pass@1": 0.2, "mean_tokens": 50.0}) == pytest.approx(1.25)
    # dAcc = (.25 - .5)/.5 = -.5 -> .5 - 5 * .5 = -2.0
    assert aes_against(m, {"pass@1": 0.5, "mean_tokens": 50.0}) == pytest.approx(-2.0)
    assert aes_against(m, {"pass@1": 0.0, "mean_tokens": 50.0}) is None
