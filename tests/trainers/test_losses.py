"""Policy loss, aggregation and KL estimators against hand-computed values."""

import math

import pytest
import torch

from rlspec.trainers.losses import (
    LossNormalizer,
    aggregate_loss,
    kl_penalty,
    ppo_clip_policy_loss,
    token_logprobs_and_entropy,
)


def test_ppo_clip_hand_computed_clip_higher():
    # ratios 1.5, 0.5, 1.1, 0.9 ; advantages +1, -1, +1, -1 ; eps_low .2, eps_high .28
    old = torch.zeros(1, 4)
    new = torch.log(torch.tensor([[1.5, 0.5, 1.1, 0.9]]))
    adv = torch.tensor([[1.0, -1.0, 1.0, -1.0]])
    out = ppo_clip_policy_loss(new, old, adv, clip_ratio_low=0.2, clip_ratio_high=0.28)
    # t0: A>0, r=1.5 > 1.28 -> -1.28 ; t1: A<0, r=.5 < .8 -> max(.5, .8) = .8
    # t2: -1.1 (inside) ; t3: max(.9, .9)=.9
    torch.testing.assert_close(out.loss_mat, torch.tensor([[-1.28, 0.8, -1.1, 0.9]]), atol=1e-6, rtol=0)
    assert out.clipped_high.tolist() == [[True, False, False, False]]
    assert out.clipped_low.tolist() == [[False, True, False, False]]


def test_dual_clip_bounds_negative_advantages():
    old = torch.zeros(1, 2)
    new = torch.log(torch.tensor([[20.0, 20.0]]))
    adv = torch.tensor([[-1.0, 1.0]])
    out = ppo_clip_policy_loss(new, old, adv, clip_ratio_low=0.2, clip_ratio_high=0.28, clip_ratio_c=10.0)
    # A<0, r=20: PPO loss = max(20, 0.8)=20, dual clip -> min(20, 10) = 10 ; A>0: -1.28
    torch.testing.assert_close(out.loss_mat, torch.tensor([[10.0, -1.28]]), atol=1e-5, rtol=0)
    assert out.dual_clipped.tolist() == [[True, False]]


def test_gradient_is_zero_when_clipped_and_advantage_times_ratio_otherwise():
    old = torch.zeros(1, 2)
    new = torch.log(torch.tensor([[1.5, 1.1]])).requires_grad_(True)
    adv = torch.tensor([[2.0, 2.0]])
    out = ppo_clip_policy_loss(new, old, adv, clip_ratio_low=0.2, clip_ratio_high=0.28)
    out.loss_mat.sum().backward()
    # d/dlogp of -A * exp(logp) = -A * r  (unclipped) ; 0 when clipped
    torch.testing.assert_close(new.grad, torch.tensor([[0.0, -2.2]]), atol=1e-6, rtol=0)


def test_aggregation_modes_hand_computed():
    loss = torch.tensor([[1.0, 2.0, 3.0], [4.0, 0.0, 0.0]])
    mask = torch.tensor([[1.0, 1.0, 1.0], [1.0, 0.0, 0.0]])
    assert aggregate_loss(loss, mask, "token-mean").item() == pytest.approx(10 / 4)
    assert aggregate_loss(loss, mask, "seq-mean-token-mean").item() == pytest.approx((2 + 4) / 2)
    assert aggregate_loss(loss, mask, "seq-mean-token-sum").item() == pytest.approx((6 + 4) / 2)
    norm = LossNormalizer.of(mask, max_response_length=5)
    assert aggregate_loss(loss, mask, "seq-mean-token-sum-norm", norm).item() == pytest.approx(10 / (2 * 5))
    with pytest.raises(ValueError, match="loss_agg_mode"):
        aggregate_loss(loss, mask, "token-sum")


@pytest.mark.parametrize("mode", ["token-mean", "seq-mean-token-mean", "seq-mean-token-sum", "seq-mean-token-sum-norm"])
def test_micro_batches_sum_to_full_batch(mode):
    g = torch.Generator().manual_seed(0)
    loss = torch.rand(6, 5, generator=g)
    lengths = torch.tensor([5, 1, 3, 2, 4, 5])
    mask = (torch.arange(5)[None] < lengths[:, None]).float()
    full = aggregate_loss(loss, mask, mode)
    norm = LossNormalizer.of(mask)
    parts = sum(aggregate_loss(loss[i : i + 2], mask[i : i + 2], mode, norm) for i in range(0, 6, 2))
    torch.testing.assert_close(parts, full)


def test_kl_estimators_hand_computed():
    logp = torch.tensor([math.log(0.5)])
    ref = torch.tensor([math.log(0.25)])
    d = math.log(2.0)
    assert kl_penalty(logp, ref, "k1").item() == pytest.approx(d)
    assert kl_penalty(logp, ref, "k2").item() == pytest.approx(0.5 * d * d)
    assert kl_penalty(logp, ref, "k3").item() == pytest.approx(0.5 - math.log(0.5) - 1)
    assert kl_penalty(ref, ref, "k3").item() == 0.0
    with pytest.raises(ValueError):
        kl_penalty(logp, ref, "k4")


def test_token_logprobs_and_entropy():
    logits = torch.log(torch.tensor([[[0.5, 0.25, 0.25]]]))
    lp, ent = token_logprobs_and_entropy(logits, torch.tensor([[1]]))
    assert lp.item() == pytest.approx(math.log(0.25))
    assert ent.item() == pytest.approx(-(0.5 * math.log(0.5) + 2 * 0.25 * math.log(0.25)))
    lp_t, _ = token_logprobs_and_entropy(logits, torch.tensor([[0]]), temperature=0.5, with_entropy=False)
    # softmax(log p / .5) = p^2 / sum p^2 = .25 / .375
    assert lp_t.item() == pytest.approx(math.log(0.25 / 0.375))
