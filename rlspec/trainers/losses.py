"""Policy-gradient losses, KL estimators and loss aggregation: pure functions over tensors.

Shapes: ``B`` responses, ``T`` response tokens (right-padded), ``V`` vocabulary.
``mask`` is 1.0 on real response tokens and 0.0 on padding.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

LOSS_AGG_MODES = ("token-mean", "seq-mean-token-mean", "seq-mean-token-sum", "seq-mean-token-sum-norm")
KL_ESTIMATORS = ("k1", "k2", "k3")


@dataclass
class LossNormalizer:
    """Denominators for :func:`aggregate_loss`, fixed for a whole optimizer mini-batch.

    With gradient accumulation a mini-batch is split into micro-batches; each micro-batch's loss
    must be divided by the *mini-batch* totals so that the accumulated gradient equals the one
    of the full mini-batch (verl's ``agg_loss`` global token count, TRL's ``num_items_in_batch``).
    """

    num_tokens: float  # valid response tokens in the mini-batch
    num_seqs: float  # responses in the mini-batch
    max_response_length: float  # constant for seq-mean-token-sum-norm (Dr. GRPO)

    @classmethod
    def of(cls, mask: torch.Tensor, max_response_length: int | None = None) -> "LossNormalizer":
        return cls(
            num_tokens=float(mask.sum().clamp(min=1)),
            num_seqs=float(max(mask.shape[0], 1)),
            max_response_length=float(max_response_length or mask.shape[1]),
        )


def aggregate_loss(
    loss_mat: torch.Tensor, mask: torch.Tensor, mode: str, normalizer: LossNormalizer | None = None
) -> torch.Tensor:
    """Reduce a per-token loss ``[B, T]`` to a scalar.

    Modes (verl's ``loss_agg_mode`` names; TRL's ``loss_type`` equivalents in brackets):
      * ``token-mean`` -- sum over all tokens / number of tokens (DAPO's token-level loss,
        arXiv 2503.14476 Eq. 12) [``dapo``/``bnpo``].
      * ``seq-mean-token-mean`` -- mean over each response's tokens, then mean over responses
        (original GRPO) [``grpo``].
      * ``seq-mean-token-sum`` -- sum over each response's tokens, then mean over responses.
      * ``seq-mean-token-sum-norm`` -- sum over all tokens / (responses x max_response_length)
        (Dr. GRPO's constant normaliser, arXiv 2503.20783) [``dr_grpo``].

    ``normalizer`` holds mini-batch totals for gradient accumulation; by default the
    denominators come from this call's own ``mask``.
    """
    if normalizer is None:
        normalizer = LossNormalizer.of(mask)
    masked = loss_mat * mask  # [B, T]
    if mode == "token-mean":
        return masked.sum() / normalizer.num_tokens
    if mode == "seq-mean-token-mean":
        per_seq = masked.sum(-1) / mask.sum(-1).clamp(min=1)  # [B]
        return per_seq.sum() / normalizer.num_seqs
    if mode == "seq-mean-token-sum":
        return masked.sum() / normalizer.num_seqs
    if mode == "seq-mean-token-sum-norm":
        return masked.sum() / (normalizer.num_seqs * normalizer.max_response_length)
    raise ValueError(f"unknown loss_agg_mode {mode!r}; valid: {', '.join(LOSS_AGG_MODES)}")


@dataclass
class PolicyLossOutput:
    loss_mat: torch.Tensor  # [B, T] per-token loss, before aggregation
    ratio: torch.Tensor  # [B, T] importance ratio pi/pi_old
    clipped_high: torch.Tensor  # [B, T] bool: the upper clip was active (A > 0, r > 1 + eps_high)
    clipped_low: torch.Tensor  # [B, T] bool: the lower clip was active (A < 0, r < 1 - eps_low)
    dual_clipped: torch.Tensor  # [B, T] bool: dual-clip bound active (A < 0, r > c)
    approx_kl: torch.Tensor  # [B, T] log(pi_old / pi), verl's ppo_kl


def ppo_clip_policy_loss(
    logprobs: torch.Tensor,
    old_logprobs: torch.Tensor,
    advantages: torch.Tensor,
    *,
    clip_ratio_low: float = 0.2,
    clip_ratio_high: float = 0.2,
    clip_ratio_c: float | None = None,
) -> PolicyLossOutput:
    """Per-token PPO-clip loss with decoupled clip range (clip-higher) and optional dual clip.

    ``L_t = -min(r_t A_t, clip(r_t, 1 - eps_low, 1 + eps_high) A_t)`` with
    ``r_t = exp(logp_t - logp_old_t)`` (PPO, arXiv 1707.06347 Eq. 7; clip-higher from DAPO,
    arXiv 2503.14476 Eq. 10). With ``clip_ratio_c`` set, negative-advantage tokens are further
    bounded by ``-c * A_t`` (dual-clip PPO, arXiv 1912.09729), as DLER uses with ``c = 10``.

    Args:
        logprobs: ``[B, T]`` current policy log-probs of the taken tokens (with grad).
        old_logprobs: ``[B, T]`` log-probs under the policy that sampled them.
        advantages: ``[B, T]`` or ``[B]`` (broadcast over tokens).
    """
    if advantages.dim() == 1:
        advantages = advantages.unsqueeze(-1)  # [B, 1]
    log_ratio = (logprobs - old_logprobs).clamp(-20.0, 20.0)  # [B, T]; clamp avoids exp overflow
    ratio = torch.exp(log_ratio)  # [B, T]
    unclipped = -advantages * ratio  # [B, T]
    clipped = -advantages * ratio.clamp(1.0 - clip_ratio_low, 1.0 + clip_ratio_high)  # [B, T]
    loss_mat = torch.maximum(unclipped, clipped)  # [B, T]
    clip_active = clipped > unclipped  # [B, T]
    dual_clipped = torch.zeros_like(clip_active)
    if clip_ratio_c is not None:
        if clip_ratio_c <= 1.0:
            raise ValueError(f"clip_ratio_c must be > 1 (dual-clip PPO), got {clip_ratio_c}")
        dual_bound = -advantages * clip_ratio_c  # [B, T]
        negative = advantages < 0  # [B, T]
        dual_clipped = negative & (loss_mat > dual_bound)
        loss_mat = torch.where(negative, torch.minimum(loss_mat, dual_bound), loss_mat)
    positive = (advantages > 0).expand_as(ratio)
    return PolicyLossOutput(
        loss_mat=loss_mat,
        ratio=ratio.detach(),
        clipped_high=(clip_active & positive).detach(),
        clipped_low=(clip_active & ~positive & (advantages < 0).expand_as(ratio)).detach(),
        dual_clipped=dual_clipped.detach(),
        approx_kl=(-log_ratio).detach(),
    )


def kl_penalty(logprobs: torch.Tensor, ref_logprobs: torch.Tensor, estimator: str = "k3") -> torch.Tensor:
    """Per-token estimate of KL(pi || pi_ref) from samples of pi (Schulman, "Approximating KL").

    * ``k1``: ``log pi - log pi_ref`` (unbiased, high variance, can be negative).
    * ``k2``: ``0.5 (log pi - log pi_ref)^2`` (the "mse" estimator).
    * ``k3``: ``exp(log pi_ref - log pi) - (log pi_ref - log pi) - 1`` (unbiased, always >= 0;
      verl's ``low_var_kl``, clamped to [-10, 10] like verl, and GRPO's Eq. 4 KL term).
    """
    log_ratio = logprobs - ref_logprobs  # [B, T]
    if estimator == "k1":
        return log_ratio
    if estimator == "k2":
        return 0.5 * log_ratio**2
    if estimator == "k3":
        neg = (-log_ratio).clamp(-20.0, 20.0)
        return (torch.exp(neg) - neg - 1.0).clamp(-10.0, 10.0)
    raise ValueError(f"unknown KL estimator {estimator!r}; valid: {', '.join(KL_ESTIMATORS)}")


def token_logprobs_and_entropy(
    logits: torch.Tensor, tokens: torch.Tensor, temperature: float = 1.0, with_entropy: bool = True
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Log-prob of ``tokens`` under ``softmax(logits / temperature)`` and the entropy of it.

    Args:
        logits: ``[B, T, V]`` (scores for predicting ``tokens``: already shifted by the caller).
        tokens: ``[B, T]`` long.
    Returns:
        ``(logprobs [B, T], entropy [B, T] or None)``.
    """
    if temperature != 1.0:
        logits = logits / temperature
    logits = logits.float()
    log_norm = torch.logsumexp(logits, dim=-1)  # [B, T]
    token_logits = torch.gather(logits, -1, tokens.unsqueeze(-1)).squeeze(-1)  # [B, T]
    logprobs = token_logits - log_norm  # [B, T]
    entropy = None
    if with_entropy:
        probs = torch.softmax(logits, dim=-1)  # [B, T, V]
        entropy = log_norm - (probs * logits).sum(-1)  # [B, T]
    return logprobs, entropy


@dataclass
class ValueLossOutput:
    loss_mat: torch.Tensor  # [B, T] per-token 0.5 * max(unclipped, clipped) squared error
    clipped: torch.Tensor  # [B, T] bool: the clipped error was the larger (the update is cut there)


def clipped_value_loss(
    values: torch.Tensor, old_values: torch.Tensor, returns: torch.Tensor, clip_range: float | None
) -> ValueLossOutput:
    """PPO's clipped value loss (verl ``compute_value_loss``, OpenAI baselines ppo2):

    ``0.5 * max((V - R)^2, (clip(V, V_old - c, V_old + c) - R)^2)`` per token, so one update
    cannot move a value more than ``c`` from the one the advantages were computed with
    (``clip_range=None``: the plain squared error). Aggregate with :func:`aggregate_loss`.

    Args:
        values: ``[B, T]`` the critic's current predictions (with grad).
        old_values: ``[B, T]`` its predictions when the batch was scored.
        returns: ``[B, T]`` the regression targets (GAE returns).
    """
    unclipped = (values - returns) ** 2  # [B, T]
    if clip_range is None:
        return ValueLossOutput(0.5 * unclipped, torch.zeros_like(unclipped, dtype=torch.bool))
    clipped_values = old_values + (values - old_values).clamp(-clip_range, clip_range)  # [B, T]
    clipped = (clipped_values - returns) ** 2  # [B, T]
    return ValueLossOutput(0.5 * torch.maximum(unclipped, clipped), (clipped > unclipped).detach())
