"""GAE, VAPO's lambdas and the clipped value loss against hand-computed values and a port of verl."""

import pytest
import torch

from rlspec.trainers.gae import (
    decoupled_gae, explained_variance, gae, length_adaptive_lambda, masked_whiten, token_level_rewards,
)
from rlspec.trainers.losses import clipped_value_loss


def verl_gae(token_level_rewards, values, response_mask, gamma, lam):
    """A port of verl's ``compute_gae_advantage_return`` (core_algos.py), before its whitening:
    padding neither bootstraps nor carries the advantage."""
    nextvalues, lastgaelam = 0, 0
    advantages_reversed = []
    for t in reversed(range(token_level_rewards.shape[-1])):
        delta = token_level_rewards[:, t] + gamma * nextvalues - values[:, t]
        lastgaelam_ = delta + gamma * lam * lastgaelam
        nextvalues = values[:, t] * response_mask[:, t] + (1 - response_mask[:, t]) * nextvalues
        lastgaelam = lastgaelam_ * response_mask[:, t] + (1 - response_mask[:, t]) * lastgaelam
        advantages_reversed.append(lastgaelam)
    advantages = torch.stack(advantages_reversed[::-1], dim=1)
    return advantages, advantages + values


def test_token_level_rewards_put_the_score_on_the_last_token_and_the_kl_everywhere():
    mask = torch.tensor([[1.0, 1.0, 1.0], [1.0, 0.0, 0.0]])
    kl = torch.tensor([[0.1, 0.2, 0.3], [0.5, 9.0, 9.0]])
    out = token_level_rewards(torch.tensor([1.0, -1.0]), mask, kl, kl_coef=0.5)
    assert torch.allclose(out, torch.tensor([[-0.05, -0.1, 1.0 - 0.15], [-1.0 - 0.25, 0.0, 0.0]]))
    with pytest.raises(ValueError, match="at least one token"):
        token_level_rewards(torch.tensor([1.0]), torch.zeros(1, 3))


def test_gae_matches_hand_computed_values():
    # row 0: r = [0, 0, 1], V = [.5, .6, .7], gamma 1, lambda .5
    #   t=2: delta = 1 - .7 = .3 -> A = .3; t=1: delta = .7 - .6 = .1 -> A = .1 + .5 * .3 = .25
    #   t=0: delta = .6 - .5 = .1 -> A = .1 + .5 * .25 = .225; returns = A + V
    adv, ret = gae(torch.tensor([[0.0, 0.0, 1.0]]), torch.tensor([[0.5, 0.6, 0.7]]), torch.ones(1, 3), 1.0, 0.5)
    assert torch.allclose(adv, torch.tensor([[0.225, 0.25, 0.3]]))
    assert torch.allclose(ret, torch.tensor([[0.725, 0.85, 1.0]]))
    # row with padding: r = [0, 1, pad], V = [.2, .4, garbage], gamma .9, lambda 1
    #   t=1: delta = 1 - .4 = .6; t=0: delta = .9 * .4 - .2 = .16 -> A = .16 + .9 * .6 = .7
    adv, ret = gae(torch.tensor([[0.0, 1.0, 0.0]]), torch.tensor([[0.2, 0.4, 9.0]]),
                   torch.tensor([[1.0, 1.0, 0.0]]), 0.9, 1.0)
    assert torch.allclose(adv, torch.tensor([[0.7, 0.6, 0.0]]))
    assert torch.allclose(ret, torch.tensor([[0.9, 1.0, 0.0]]))


@pytest.mark.parametrize("gamma,lam", [(1.0, 1.0), (1.0, 0.95), (0.99, 0.9), (0.9, 0.0)])
def test_gae_equals_verls_on_random_ragged_batches(gamma, lam):
    gen = torch.Generator().manual_seed(0)
    lengths = torch.tensor([7, 1, 4, 7, 3])
    mask = (torch.arange(7)[None, :] < lengths[:, None]).float()
    values = torch.randn(5, 7, generator=gen) * mask  # verl's critic masks its values
    rewards = token_level_rewards(torch.randn(5, generator=gen), mask, torch.rand(5, 7, generator=gen), 0.1)
    adv, ret = gae(rewards, values, mask, gamma, lam)
    ref_adv, ref_ret = verl_gae(rewards, values, mask, gamma, lam)
    assert torch.allclose(adv, ref_adv * mask, atol=1e-6)
    assert torch.allclose(ret, ref_ret * mask, atol=1e-6)


def test_lambda_one_gamma_one_gives_monte_carlo_returns():
    mask = torch.tensor([[1.0, 1.0, 1.0, 0.0]])
    rewards = torch.tensor([[-0.1, -0.1, 0.9, 0.0]])
    values = torch.tensor([[0.3, -0.2, 0.5, 0.0]])
    adv, ret = gae(rewards, values, mask, 1.0, 1.0)
    assert torch.allclose(ret, torch.tensor([[0.7, 0.8, 0.9, 0.0]]))  # reward-to-go
    assert torch.allclose(adv, (ret - values) * mask)


def test_length_adaptive_lambda_is_vapos_formula_clamped():
    lam = length_adaptive_lambda(torch.tensor([5.0, 20.0, 40.0, 100.0, 4000.0]), 0.05)
    expected = torch.tensor([0.0, 0.0, 0.5, 0.8, 1 - 1 / 200])  # 1 - 1/(0.05 l), below l = 20 clamped to 0
    assert torch.allclose(lam, expected)
    with pytest.raises(ValueError):
        length_adaptive_lambda(torch.tensor([10.0]), 0.0)


def test_per_row_lambda_equals_each_row_alone():
    gen = torch.Generator().manual_seed(1)
    mask = torch.tensor([[1.0, 1.0, 1.0], [1.0, 1.0, 0.0]])
    rewards, values = torch.randn(2, 3, generator=gen) * mask, torch.randn(2, 3, generator=gen) * mask
    lam = torch.tensor([0.3, 0.9])
    adv, ret = gae(rewards, values, mask, 1.0, lam)
    for i in range(2):
        a, r = gae(rewards[i : i + 1], values[i : i + 1], mask[i : i + 1], 1.0, float(lam[i]))
        assert torch.allclose(adv[i], a[0]) and torch.allclose(ret[i], r[0])


def test_decoupled_gae_takes_advantages_and_returns_from_their_own_lambdas():
    gen = torch.Generator().manual_seed(2)
    mask = torch.ones(3, 5)
    rewards, values = torch.randn(3, 5, generator=gen), torch.randn(3, 5, generator=gen)
    adv, ret = decoupled_gae(rewards, values, mask, gamma=1.0, actor_lam=0.6, critic_lam=1.0)
    assert torch.allclose(adv, gae(rewards, values, mask, 1.0, 0.6)[0])
    assert torch.allclose(ret, gae(rewards, values, mask, 1.0, 1.0)[1])
    assert not torch.allclose(ret, gae(rewards, values, mask, 1.0, 0.6)[1])


def test_masked_whiten_and_explained_variance():
    mask = torch.tensor([[1.0, 1.0, 0.0], [1.0, 1.0, 1.0]])
    x = torch.tensor([[1.0, 2.0, 100.0], [3.0, 4.0, 5.0]])
    w = masked_whiten(x, mask)
    valid = w[mask.bool()]
    assert abs(float(valid.mean())) < 1e-6 and abs(float(valid.std()) - 1.0) < 1e-4
    assert float(w[0, 2]) == 0.0
    assert explained_variance(x, x, mask) == pytest.approx(1.0)
    assert explained_variance(torch.full_like(x, 3.0), x, mask) == pytest.approx(0.0, abs=1e-6)


def test_clipped_value_loss_hand_values_and_zero_gradient_where_clipped():
    returns, old = torch.tensor([[2.0, 2.0]]), torch.tensor([[0.0, 0.0]])
    values = torch.tensor([[1.0, 0.2]], requires_grad=True)
    out = clipped_value_loss(values, old, returns, clip_range=0.5)
    # token 0: unclipped (1-2)^2 = 1, clipped (0.5-2)^2 = 2.25 -> 0.5 * 2.25, clipped
    # token 1: inside the range: both (0.2-2)^2 = 3.24 -> 0.5 * 3.24
    assert torch.allclose(out.loss_mat, torch.tensor([[1.125, 1.62]]))
    assert out.clipped.tolist() == [[True, False]]
    out.loss_mat.sum().backward()
    assert values.grad[0, 0] == 0.0  # the clipped branch does not depend on V
    assert values.grad[0, 1] == pytest.approx(0.2 - 2.0)  # d/dV 0.5 (V - R)^2
    plain = clipped_value_loss(values.detach(), old, returns, clip_range=None)
    assert torch.allclose(plain.loss_mat, torch.tensor([[0.5, 1.62]])) and not plain.clipped.any()
