"""Generalized advantage estimation for PPO with a critic: pure functions over tensors.

Shapes: ``B`` responses, ``T`` response tokens (right-padded); ``mask`` is 1.0 on real response
tokens and 0.0 on padding. ``values[b, t]`` is the critic's estimate of the state *before*
response token ``t`` (the prefix up to token ``t - 1``), as in verl's critic.

Outcome rewards become per-token rewards with :func:`token_level_rewards` (the score on the last
token, an optional per-token KL penalty everywhere, verl's ``use_kl_in_reward``); :func:`gae` turns
them and the values into advantages and returns (Schulman et al., arXiv 1506.02438, Eq. 16);
VAPO's decoupled and length-adaptive lambdas (arXiv 2504.05118, Sec. 3.1-3.2) are
:func:`decoupled_gae` and :func:`length_adaptive_lambda`.
"""

from __future__ import annotations

import torch


def token_level_rewards(
    scores: torch.Tensor, mask: torch.Tensor, kl: torch.Tensor | None = None, kl_coef: float = 0.0
) -> torch.Tensor:
    """``[B, T]`` per-token rewards: ``-kl_coef * kl[b, t]`` on every response token, plus the
    outcome ``scores[b]`` on the response's last token (verl's ``apply_kl_penalty`` then the
    reward manager's last-token placement).

    >>> token_level_rewards(torch.tensor([1.0, 0.0]), torch.tensor([[1., 1., 0.], [1., 1., 1.]]))
    tensor([[0., 1., 0.],
            [0., 0., 0.]])
    """
    lengths = mask.sum(-1).long()  # [B]
    if bool((lengths == 0).any()):
        raise ValueError("every response needs at least one token (an empty row has no last token for its score)")
    rewards = torch.zeros_like(mask, dtype=torch.float32)  # [B, T]
    if kl is not None and kl_coef:
        rewards = rewards - kl_coef * kl.float() * mask
    rows = torch.arange(mask.shape[0])
    rewards[rows, lengths - 1] += scores.float()
    return rewards


def gae(
    rewards: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, gamma: float, lam: float | torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """GAE advantages and returns (arXiv 1506.02438, Eq. 16), backwards over each response.

    ``delta_t = r_t + gamma V_{t+1} - V_t`` with ``V`` past the last token = 0 (the episode ends
    there), ``A_t = delta_t + gamma lam A_{t+1}``, ``returns_t = A_t + V_t``. Padding is skipped
    (verl's ``compute_gae_advantage_return``): it neither bootstraps nor carries advantage.

    Args:
        rewards: ``[B, T]`` per-token rewards (:func:`token_level_rewards`).
        values: ``[B, T]`` critic values of the states before each token.
        mask: ``[B, T]``.
        gamma: discount (1.0 for LLM reasoning, as verl, VAPO).
        lam: a float, or ``[B]`` per-response lambdas (VAPO's length-adaptive lambda).
    Returns:
        ``(advantages [B, T], returns [B, T])``, zero on padding.
    """
    b, t_len = rewards.shape
    mask = mask.float()
    lam_t = torch.as_tensor(lam, dtype=torch.float32).expand(b) if not torch.is_tensor(lam) or lam.dim() == 0 \
        else lam.float()  # [B]
    values = values.float() * mask
    next_value = torch.zeros(b)  # [B]: V of the state after the current token
    running = torch.zeros(b)  # [B]: A_{t+1}
    advantages = torch.zeros(b, t_len)
    for t in reversed(range(t_len)):
        m = mask[:, t]
        delta = rewards[:, t] + gamma * next_value - values[:, t]
        adv_t = delta + gamma * lam_t * running
        running = adv_t * m + running * (1 - m)  # padding carries the later token's advantage through
        next_value = values[:, t] * m + next_value * (1 - m)
        advantages[:, t] = adv_t * m
    returns = (advantages + values) * mask
    return advantages, returns


def length_adaptive_lambda(lengths: torch.Tensor, alpha: float) -> torch.Tensor:
    """VAPO's length-adaptive policy lambda (arXiv 2504.05118, Eq. 7): ``1 - 1 / (alpha l)``,
    so that the TD errors of a response of length ``l`` weigh in about equally (the sum of the
    lambda geometric series equals ``alpha l``). Clamped to ``[0, 1]``: a response shorter than
    ``1 / alpha`` tokens gets ``lam = 0`` (one-step TD), where the formula would go negative.

    >>> length_adaptive_lambda(torch.tensor([10., 40., 200.]), 0.05)
    tensor([0.0000, 0.5000, 0.9000])
    """
    if alpha <= 0:
        raise ValueError(f"alpha must be > 0, got {alpha}")
    return (1.0 - 1.0 / (alpha * lengths.float().clamp(min=1e-6))).clamp(0.0, 1.0)


def decoupled_gae(
    rewards: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, *, gamma: float,
    actor_lam: float | torch.Tensor, critic_lam: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """VAPO's decoupled GAE (arXiv 2504.05118, Sec. 3.1): the policy's advantages with
    ``actor_lam``, the critic's regression targets (returns) with ``critic_lam`` (VAPO: 1.0, an
    unbiased Monte-Carlo target that does not decay the reward over long responses).
    With equal lambdas this is :func:`gae`. Returns ``(advantages, returns)``, each ``[B, T]``."""
    advantages, _ = gae(rewards, values, mask, gamma, actor_lam)
    _, returns = gae(rewards, values, mask, gamma, critic_lam)
    return advantages, returns


def masked_whiten(x: torch.Tensor, mask: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    """``(x - mean) / std`` over the valid tokens of the whole batch (verl's ``masked_whiten``,
    unbiased variance), zero on padding."""
    mask = mask.float()
    n = mask.sum().clamp(min=1)
    mean = (x * mask).sum() / n
    var = (((x - mean) * mask) ** 2).sum() / (n - 1).clamp(min=1)
    return (x - mean) * torch.rsqrt(var + eps) * mask


def explained_variance(values: torch.Tensor, returns: torch.Tensor, mask: torch.Tensor) -> float:
    """``1 - Var(returns - values) / Var(returns)`` over valid tokens: 1 = the critic predicts the
    returns, 0 = no better than their mean (what VAPO watches during value pretraining)."""
    mask = mask.float()
    n = mask.sum().clamp(min=1)

    def var(x: torch.Tensor) -> torch.Tensor:
        mean = (x * mask).sum() / n
        return (((x - mean) * mask) ** 2).sum() / n

    total = var(returns)
    if float(total) == 0.0:
        return float("nan")
    return float(1.0 - var(returns - values) / total)
