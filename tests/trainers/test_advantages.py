"""Advantage estimators against hand-computed values and loop references."""

import math

import pytest
import torch

from rlspec.errors import ConfigError
from rlspec.trainers.advantages import (
    batch_normalized_advantages,
    compute_advantages,
    dr_grpo_advantages,
    group_mean_std,
    grpo_advantages,
)


def test_grpo_hand_computed():
    # group 0: rewards 1,0,0,0 -> mean .25, unbiased std sqrt(.75/3)=.5
    # group 1: rewards 1,1 -> std 0 -> advantage 0
    rewards = torch.tensor([1.0, 0.0, 0.0, 0.0, 1.0, 1.0])
    groups = torch.tensor([0, 0, 0, 0, 1, 1])
    adv = grpo_advantages(rewards, groups, eps=0.0 + 1e-12)
    expected = torch.tensor([1.5, -0.5, -0.5, -0.5, 0.0, 0.0])
    torch.testing.assert_close(adv, expected, atol=1e-5, rtol=0)


def test_grpo_without_std_is_dr_grpo():
    rewards = torch.tensor([2.0, 0.0, 1.0, 5.0])
    groups = torch.tensor([7, 7, 3, 3])  # non-contiguous ids
    expected = torch.tensor([1.0, -1.0, -2.0, 2.0])
    torch.testing.assert_close(grpo_advantages(rewards, groups, norm_by_std=False), expected)
    torch.testing.assert_close(dr_grpo_advantages(rewards, groups), expected)


def test_singleton_group_has_no_baseline():
    mean, std = group_mean_std(torch.tensor([3.0]), torch.tensor([0]))
    assert mean.item() == 0.0 and std.item() == 1.0


def _loop_grpo(rewards, groups, eps):
    out = []
    for i in range(len(rewards)):
        members = [rewards[j] for j in range(len(rewards)) if groups[j] == groups[i]]
        if len(members) == 1:
            mu, sd = 0.0, 1.0
        else:
            mu = sum(members) / len(members)
            sd = math.sqrt(sum((m - mu) ** 2 for m in members) / (len(members) - 1))
        out.append((rewards[i] - mu) / (sd + eps))
    return torch.tensor(out)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_grpo_vectorised_equals_loop(seed):
    g = torch.Generator().manual_seed(seed)
    groups = torch.randint(0, 5, (40,), generator=g)
    rewards = torch.randint(0, 3, (40,), generator=g).float()
    torch.testing.assert_close(grpo_advantages(rewards, groups), _loop_grpo(rewards.tolist(), groups.tolist(), 1e-6), atol=1e-4, rtol=1e-4)


def test_batch_norm_sequence_weighted_hand_computed():
    # s = [0.5, -0.5, 0, 0]; batch mean 0; unbiased var = 0.5/3 -> std 0.40825
    adv = batch_normalized_advantages(torch.tensor([1.0, 0.0, 1.0, 1.0]), torch.tensor([0, 0, 1, 1]))
    torch.testing.assert_close(adv, torch.tensor([1.224745, -1.224745, 0.0, 0.0]), atol=1e-5, rtol=0)


def test_batch_norm_token_weighted_matches_verl_masked_whiten():
    # verl: scores (R - group mean) tiled over tokens, masked_whiten over all valid tokens.
    rewards = torch.tensor([1.0, 0.0, 1.0, 0.0, 0.0])
    groups = torch.tensor([0, 0, 1, 1, 1])
    lengths = torch.tensor([3, 1, 2, 4, 2])
    adv = batch_normalized_advantages(rewards, groups, response_lengths=lengths)
    # reference, written the verl way
    s = torch.tensor([0.5, -0.5, 2 / 3, -1 / 3, -1 / 3], dtype=torch.float64)
    T = int(lengths.max())
    mask = (torch.arange(T)[None, :] < lengths[:, None]).double()
    vals = s[:, None] * mask
    mean = (vals * mask).sum() / mask.sum()
    var = (((vals - mean) ** 2) * mask).sum() / mask.sum()
    var = var * mask.sum() / (mask.sum() - 1)
    whitened = (vals - mean) * torch.rsqrt(var + 1e-8)
    torch.testing.assert_close(adv.double(), whitened[:, 0], atol=1e-6, rtol=0)
    # long responses weigh more: token weighting differs from the per-sequence version
    assert not torch.allclose(adv, batch_normalized_advantages(rewards, groups))


def test_batch_norm_all_equal_rewards_gives_zero():
    adv = batch_normalized_advantages(torch.ones(6), torch.tensor([0, 0, 0, 1, 1, 1]))
    assert torch.all(adv == 0)


def test_registry_lookup_and_unknown_name():
    rewards = torch.tensor([1.0, 0.0])
    groups = torch.tensor([0, 0])
    torch.testing.assert_close(compute_advantages("grpo", rewards, groups), grpo_advantages(rewards, groups))
    with pytest.raises(ConfigError, match="did you mean 'grpo'|Did you mean 'grpo'"):
        compute_advantages("grpoo", rewards, groups)
