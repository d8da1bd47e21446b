"""Reward terms that need rollout budgets or run-long state: HBPO and HAPO.

The maths is in :mod:`rlspec.rewards.length`; these wrappers only read the batch (the budget of
each rollout from ``batch.columns["budget"]``, written by the trainer for
``rollout.budget.name=hbpo``) and the run-long ``batch.state`` (HAPO's history, checkpointed by
the trainer).
"""

from __future__ import annotations

from typing import Optional

from rlspec.errors import ConfigError
from rlspec.rewards.length import HapoHistory, hapo_length_rewards, hbpo_reward, hbpo_well_formed
from rlspec.rewards.terms import REWARD_TERMS, RewardBatch


@REWARD_TERMS.register("hbpo")
def hbpo_term(
    batch: RewardBatch,
    variant: str = "paper",
    l_max: int = 4096,
    beta: float = 4.0,
    alpha: Optional[float] = None,
) -> list[float]:
    r"""HBPO's budget-aware reward (arXiv 2507.15844, Eq. 1-3) for every rollout; replaces 0/1
    correctness. The trainer fills the kwargs from the top-level ``hbpo`` config section.

    A rollout's budget ``b`` comes from its subgroup's prefill (``rollout.budget.name=hbpo``);
    ``n`` is its generated length. ``variant="code"`` follows the released reward (``min(f1, f2)``,
    -1 for a missing ``</think>`` / ``\boxed``, plain cosine without a budget).
    """
    if variant not in ("paper", "code"):
        raise ConfigError(f"hbpo.variant must be 'paper' or 'code', got {variant!r}")
    budgets = batch.columns.get("budget")
    if budgets is None and variant == "paper":
        raise ConfigError(
            "the hbpo reward needs budget-conditioned rollouts: set rollout.budget.name=hbpo (recipe=hbpo does)"
        )
    budgets = budgets if budgets is not None else [None] * len(batch)
    a = alpha if alpha is not None else 1.0 / l_max
    return [
        hbpo_reward(len(ids), b, bool(c), hbpo_well_formed(text), variant, alpha=a, beta=beta, l_max=l_max)
        for ids, b, c, text in zip(batch.completion_ids, budgets, batch.correct, batch.completions)
    ]


@REWARD_TERMS.register("hapo")
def hapo_term(batch: RewardBatch, w: float = 1.0) -> list[float]:
    """HAPO's history-aware length reward (arXiv 2505.11225; code HCY123902/HAPO
    ``compute_len_reward``), added to 0/1 correctness.

    Each prompt's history ``h_q`` (shortest correct response so far, keyed by the dataset's
    ``uid`` column, else the question text) is read to score this batch, then updated with it
    (HAPO updates ``h_q`` after each batch). It lives in ``batch.state["hapo"]``, which the
    trainer saves in checkpoints and restores on resume. With dynamic sampling every generation
    chunk counts as a batch.
    """
    if not w > 0:
        raise ConfigError(f"reward.terms.hapo.kwargs.w must be > 0, got {w}")
    history = HapoHistory()
    if "hapo" in batch.state:
        history.load_state_dict(batch.state["hapo"])
    uids = batch.prompt_uids()
    lengths = [len(ids) for ids in batch.completion_ids]
    rewards = hapo_length_rewards(uids, lengths, batch.correct, history, w)
    history.update(uids, lengths, batch.correct)
    batch.state["hapo"] = history.state_dict()
    return rewards
