"""Advantage estimators for outcome rewards: one pure function each, registered by name.

Every estimator maps per-response scalar rewards to per-response advantages (all tokens of a
response share its advantage, as in GRPO / REINFORCE++ with outcome rewards).

Shapes: ``B`` = number of responses in the batch (prompts x group size).
"""

from __future__ import annotations

import torch

from rlspec.registry import Registry

ADVANTAGE_ESTIMATORS: Registry = Registry("advantage estimator", "trainer.adv_estimator")


def group_mean_std(rewards: torch.Tensor, group_index: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-response mean and (unbiased) std of the rewards in its group.

    Args:
        rewards: ``[B]`` float rewards.
        group_index: ``[B]`` long, the group (prompt) each response belongs to. Ids need not be
            contiguous or sorted.

    Returns:
        ``(mean, std)``, each ``[B]``. A group of one response has mean 0 and std 1 (verl's
        convention: a singleton group gives no baseline).
    """
    _, inverse, counts = torch.unique(group_index, return_inverse=True, return_counts=True)  # [G], [B], [G]
    num_groups = counts.numel()
    rewards = rewards.double()
    sums = torch.zeros(num_groups, dtype=rewards.dtype).index_add_(0, inverse, rewards)  # [G]
    means = sums / counts  # [G]
    sq_dev = (rewards - means[inverse]) ** 2  # [B]
    sq_sums = torch.zeros(num_groups, dtype=rewards.dtype).index_add_(0, inverse, sq_dev)  # [G]
    stds = torch.sqrt(sq_sums / (counts - 1).clamp(min=1))  # [G], unbiased like torch.std
    singleton = counts == 1
    means = torch.where(singleton, torch.zeros_like(means), means)
    stds = torch.where(singleton, torch.ones_like(stds), stds)
    return means[inverse].float(), stds[inverse].float()


@ADVANTAGE_ESTIMATORS.register("grpo")
def grpo_advantages(
    rewards: torch.Tensor,
    group_index: torch.Tensor,
    *,
    norm_by_std: bool = True,
    eps: float = 1e-6,
    response_lengths: torch.Tensor | None = None,
) -> torch.Tensor:
    """GRPO group-normalised advantage (DeepSeekMath, arXiv 2402.03300, Sec. 4.1.2).

    ``A_i = (R_i - mean_g(R)) / (std_g(R) + eps)``; with ``norm_by_std=False`` it is
    ``R_i - mean_g(R)`` (Dr. GRPO, arXiv 2503.20783, which drops the std to remove the
    difficulty bias). A group whose rewards are all equal gets advantage 0.

    >>> grpo_advantages(torch.tensor([1., 0., 0., 0.]), torch.tensor([0, 0, 0, 0]))
    tensor([ 1.5000, -0.5000, -0.5000, -0.5000])
    """
    del response_lengths  # same signature as the other estimators
    mean, std = group_mean_std(rewards, group_index)  # [B], [B]
    centered = rewards.float() - mean  # [B]
    if not norm_by_std:
        return centered
    return centered / (std + eps)


@ADVANTAGE_ESTIMATORS.register("dr_grpo")
def dr_grpo_advantages(
    rewards: torch.Tensor,
    group_index: torch.Tensor,
    *,
    norm_by_std: bool = False,
    eps: float = 1e-6,
    response_lengths: torch.Tensor | None = None,
) -> torch.Tensor:
    """Dr. GRPO (arXiv 2503.20783, Sec. 3.2): group mean subtracted, no std division."""
    del norm_by_std
    return grpo_advantages(rewards, group_index, norm_by_std=False, eps=eps, response_lengths=response_lengths)


@ADVANTAGE_ESTIMATORS.register("batch_norm")
def batch_normalized_advantages(
    rewards: torch.Tensor,
    group_index: torch.Tensor,
    *,
    norm_by_std: bool = True,
    eps: float = 1e-8,
    response_lengths: torch.Tensor | None = None,
) -> torch.Tensor:
    """DLER batch-wise reward normalisation = REINFORCE++-baseline (DLER arXiv 2510.15110, Eq. 3).

    ``s_i = R_i - mean_g(R)`` (group-mean baseline), then whiten ``s`` over the whole batch:
    ``A_i = (s_i - mean_batch(s)) / sqrt(var_batch(s) + eps)``.

    With ``response_lengths`` given, the batch statistics are **token-weighted** (each response
    counts once per token, with the unbiased token-count correction), which is what DLER's
    released code does through verl's ``masked_whiten``. Without it, every response counts once,
    as the paper writes Eq. 3. ``norm_by_std=False`` only centres.

    >>> batch_normalized_advantages(torch.tensor([1., 0., 1., 1.]), torch.tensor([0, 0, 1, 1]))
    tensor([ 1.2247, -1.2247,  0.0000,  0.0000])
    """
    mean, _ = group_mean_std(rewards, group_index)  # [B]
    s = rewards.double() - mean.double()  # [B]
    if response_lengths is None:
        weights = torch.ones_like(s)  # [B]
    else:
        weights = response_lengths.double().clamp(min=0)  # [B]
    total = weights.sum()
    batch_mean = (s * weights).sum() / total
    if not norm_by_std:
        return (s - batch_mean).float()
    var = ((s - batch_mean) ** 2 * weights).sum() / total
    if total > 1:
        var = var * total / (total - 1)  # unbiased, as torch.var / verl masked_var
    return ((s - batch_mean) * torch.rsqrt(var + eps)).float()


def compute_advantages(
    name: str,
    rewards: torch.Tensor,
    group_index: torch.Tensor,
    *,
    norm_by_std: bool = True,
    response_lengths: torch.Tensor | None = None,
) -> torch.Tensor:
    """Look up estimator ``name`` in the registry and apply it. Returns ``[B]``."""
    estimator = ADVANTAGE_ESTIMATORS.get(name)
    return estimator(rewards, group_index, norm_by_std=norm_by_std, response_lengths=response_lengths)
