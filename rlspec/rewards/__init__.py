"""Rewards: the shared answer grader, registered reward terms and user reward functions.

* :mod:`rlspec.rewards.grader` -- :func:`grade`, the one grader used by training and evaluation.
* :mod:`rlspec.rewards.terms` -- :data:`REWARD_TERMS` (``correctness``, ``format``,
  ``dler_truncation``) and :func:`compute_rewards`, the weighted sum of ``reward.terms``.
* :mod:`rlspec.rewards.length` -- the efficiency terms (``dapo_overlong``, ``kimi_length``,
  ``cosine``, ``l1_exact``, ``l1_max``, ``tlmre_length``, ``grpo_lambda``) and their pure maths
  (also HBPO, HAPO, DA-DLER, PALU); :mod:`rlspec.rewards.budgeted` -- ``hbpo`` and ``hapo``.
* :mod:`rlspec.rewards.custom` -- TRL- or verl-style user functions from ``reward.custom``, and
  :func:`build_reward_terms`, which turns the ``reward`` config into the terms mapping.
"""

from rlspec.rewards.custom import CustomRewardTerm, build_reward_terms, load_custom_reward, register_custom_reward
from rlspec.rewards import length  # noqa: F401 -- registers the efficiency reward terms (rlspec.rewards.length)
from rlspec.rewards import budgeted  # noqa: F401 -- registers hbpo and hapo (need budgets / run state)
from rlspec.rewards.grader import as_plain_number, extract_final_answer, grade, grade_batch
from rlspec.rewards.terms import REWARD_TERMS, RewardBatch, compute_rewards, score_batch

__all__ = [
    "REWARD_TERMS",
    "CustomRewardTerm",
    "RewardBatch",
    "as_plain_number",
    "build_reward_terms",
    "compute_rewards",
    "extract_final_answer",
    "grade",
    "grade_batch",
    "load_custom_reward",
    "register_custom_reward",
    "score_batch",
]
