"""Unit tests for rlspec.rollout.sampling against hand-computed values."""

from __future__ import annotations

import math

import pytest
import torch

from rlspec.rollout.base import SamplingParams
from rlspec.rollout.sampling import (
    apply_temperature,
    apply_top_k,
    apply_top_p,
    sample_from_logits,
    sample_from_probs,
    sample_next_tokens,
    token_logprobs,
)

NEG = float("-inf")


def test_temperature_divides_and_zero_is_identity():
    x = torch.tensor([[2.0, -1.0, 0.5]])
    assert torch.equal(apply_temperature(x, 0.5), torch.tensor([[4.0, -2.0, 1.0]]))
    assert torch.equal(apply_temperature(x, 2.0), torch.tensor([[1.0, -0.5, 0.25]]))
    assert torch.equal(apply_temperature(x, 0.0), x)  # greedy: untouched
    with pytest.raises(ValueError, match="temperature"):
        apply_temperature(x, -1.0)


def test_top_k_keeps_k_largest_and_ties():
    x = torch.tensor([[1.0, 3.0, 2.0, 0.0]])
    assert torch.equal(apply_top_k(x, 2), torch.tensor([[NEG, 3.0, 2.0, NEG]]))
    assert torch.equal(apply_top_k(x, 1), torch.tensor([[NEG, 3.0, NEG, NEG]]))
    assert torch.equal(apply_top_k(x, 0), x)  # off
    assert torch.equal(apply_top_k(x, 10), x)  # k >= V: off
    ties = torch.tensor([[1.0, 2.0, 2.0, 0.0], [5.0, 4.0, 3.0, 2.0]])
    assert torch.equal(apply_top_k(ties, 2), torch.tensor([[NEG, 2.0, 2.0, NEG], [5.0, 4.0, NEG, NEG]]))
    assert torch.equal(apply_top_k(ties, 1), torch.tensor([[NEG, 2.0, 2.0, NEG], [5.0, NEG, NEG, NEG]]))


def test_top_p_keeps_smallest_nucleus():
    # probabilities 0.2, 0.5, 0.3 (unsorted on purpose)
    x = torch.log(torch.tensor([[0.2, 0.5, 0.3]]))
    # p = 0.7: 0.5 (mass above 0) kept, 0.3 (mass above 0.5 < 0.7) kept, 0.2 (mass above 0.8) dropped
    out = apply_top_p(x, 0.7)
    assert torch.isinf(out[0, 0]) and torch.equal(out[0, 1:], x[0, 1:])
    # p = 0.5: the mass above 0.3 is already 0.5 >= 0.5 -> only the top token stays
    out = apply_top_p(x, 0.5)
    assert torch.isinf(out[0, 0]) and torch.isinf(out[0, 2]) and out[0, 1] == x[0, 1]
    # p = 0.81: 0.2 has mass 0.8 above it < 0.81 -> kept
    assert torch.equal(apply_top_p(x, 0.81), x)
    # tiny p keeps the most probable token only; p = 1 is off
    assert torch.isfinite(apply_top_p(x, 1e-6)).tolist() == [[False, True, False]]
    assert torch.equal(apply_top_p(x, 1.0), x)
    # rows are independent
    two = torch.log(torch.tensor([[0.6, 0.4], [0.4, 0.6]]))
    assert torch.isfinite(apply_top_p(two, 0.5)).tolist() == [[True, False], [False, True]]
    with pytest.raises(ValueError, match="top_p"):
        apply_top_p(x, 0.0)


@pytest.mark.parametrize("p", [0.5, 0.95, 0.999])
def test_top_p_from_candidates_keeps_the_sorted_nucleus(p):
    """Large vocabularies look for the nucleus among the top TOP_P_CANDIDATES tokens, and sort
    only the rows whose candidates hold < p of the mass: the same nucleus as sorting every row,
    for peaked rows, flat rows (the sort) and a batch mixing them; a row's result is its own."""
    from rlspec.rollout.sampling import TOP_P_CANDIDATES, _top_p_by_sort

    g = torch.Generator().manual_seed(0)
    vocab = 20 * TOP_P_CANDIDATES
    scales = torch.tensor([0.05, 1.0, 3.0, 8.0, 20.0])[:, None]  # flat ... peaked rows
    logits = torch.randn(5, vocab, generator=g) * scales
    out = apply_top_p(logits, p)
    ref = _top_p_by_sort(logits, p)
    assert torch.equal(torch.isfinite(out), torch.isfinite(ref))
    assert torch.equal(out[torch.isfinite(out)], logits[torch.isfinite(out)])
    kept = torch.isfinite(out).sum(-1)
    assert kept[0] > TOP_P_CANDIDATES and kept[-1] < TOP_P_CANDIDATES  # both paths ran
    for i in range(5):
        assert torch.equal(apply_top_p(logits[i : i + 1], p), out[i : i + 1])
    three = apply_top_p(logits.view(5, 1, vocab).expand(5, 2, vocab), p)  # [n, positions, V] (verification)
    assert torch.equal(three, out[:, None].expand(5, 2, vocab))


def test_token_logprobs_hand_values():
    logits = torch.tensor([[0.0, math.log(3.0)]])  # softmax = [0.25, 0.75]
    tok = torch.tensor([1])
    assert token_logprobs(logits, tok, 1.0).item() == pytest.approx(math.log(0.75), abs=1e-6)
    assert token_logprobs(logits, tok, 0.0).item() == pytest.approx(math.log(0.75), abs=1e-6)  # greedy: T=1
    # T = 0.5: logits [0, 2 ln 3] -> softmax [1/10, 9/10]
    assert token_logprobs(logits, tok, 0.5).item() == pytest.approx(math.log(0.9), abs=1e-6)
    assert token_logprobs(logits, torch.tensor([0]), 0.5).item() == pytest.approx(math.log(0.1), abs=1e-6)
    assert token_logprobs(logits, tok, 1.0).dtype == torch.float32


def test_inverse_cdf_sampling_hand_values():
    # cdf = [0.25, 0.75, 1.0]: u in [0, 0.25) -> 0, [0.25, 0.75) -> 1, [0.75, 1) -> 2
    probs = torch.tensor([[0.25, 0.5, 0.25]]).expand(6, 3)
    u = torch.tensor([0.0, 0.2499, 0.25, 0.7499, 0.75, 0.9999999])
    assert sample_from_probs(probs, u).tolist() == [0, 0, 1, 1, 2, 2]
    # zero-probability tokens have empty intervals, also at the ends; rows need not sum to 1
    zeros = torch.tensor([[0.0, 2.0, 0.0, 2.0, 0.0]]).expand(4, 5)
    assert sample_from_probs(zeros, torch.tensor([0.0, 0.4999, 0.5, 1.0 - 2**-24])).tolist() == [1, 1, 3, 3]


def test_sample_from_logits_frequencies_and_masking():
    probs = torch.tensor([0.7, 0.3, 0.0])
    logits = torch.log(probs).expand(20000, 3)  # token 2 has logit -inf
    gen = torch.Generator().manual_seed(0)
    draws = sample_from_logits(logits, gen)
    assert draws.shape == (20000,) and draws.dtype == torch.long
    assert (draws == 2).sum().item() == 0
    assert (draws == 0).float().mean().item() == pytest.approx(0.7, abs=0.02)


def test_sample_from_logits_is_reproducible_with_a_generator():
    logits = torch.randn(64, 50, generator=torch.Generator().manual_seed(3))
    a = sample_from_logits(logits, torch.Generator().manual_seed(7))
    b = sample_from_logits(logits, torch.Generator().manual_seed(7))
    c = sample_from_logits(logits, torch.Generator().manual_seed(8))
    assert torch.equal(a, b)
    assert not torch.equal(a, c)


def test_sample_next_tokens_greedy_and_prefilter_logprobs():
    logits = torch.tensor([[0.0, math.log(3.0), -1.0], [2.0, 0.0, 1.0]])
    toks, lps = sample_next_tokens(logits, SamplingParams(temperature=0.0))
    assert toks.tolist() == [1, 0]
    assert torch.allclose(lps, torch.log_softmax(logits, -1)[[0, 1], [1, 0]])
    # top_k = 1 samples the argmax but reports the logprob *before* filtering (not 0)
    top1 = SamplingParams(temperature=1.0, top_k=1)
    toks_k1, lps_k1 = sample_next_tokens(logits, top1, torch.Generator().manual_seed(0))
    assert toks_k1.tolist() == [1, 0]
    assert torch.allclose(lps_k1, lps)
    # temperature 2: logprob of log_softmax(logits / 2)
    _, lps_t2 = sample_next_tokens(logits, SamplingParams(temperature=2.0, top_k=1), torch.Generator().manual_seed(0))
    assert torch.allclose(lps_t2, torch.log_softmax(logits / 2, -1)[[0, 1], [1, 0]])


def test_sample_next_tokens_respects_top_p_support():
    # row probs [0.5, 0.3, 0.2]: with top_p = 0.7 token 0 (p=0.2 here) must never be drawn
    logits = torch.log(torch.tensor([[0.2, 0.5, 0.3]])).expand(5000, 3)
    toks, lps = sample_next_tokens(logits, SamplingParams(temperature=1.0, top_p=0.7), torch.Generator().manual_seed(1))
    assert (toks == 0).sum().item() == 0
    # renormalised nucleus: P(1) = 0.5 / 0.8
    assert (toks == 1).float().mean().item() == pytest.approx(0.625, abs=0.03)
    expected = torch.log(torch.tensor([0.2, 0.5, 0.3]))[toks]
    assert torch.allclose(lps, expected, atol=1e-6)
