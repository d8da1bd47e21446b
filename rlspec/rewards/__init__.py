"""Rewards: the shared answer grader, registered reward terms and user reward functions.

* :mod:`~rlspec.rewards.grader` -- :func:`grade`, the one grader used by training and evaluation;
* :mod:`~rlspec.rewards.terms` -- :class:`RewardBatch`, ``correctness`` and ``format``, and
  :func:`compute_rewards`, the weighted sum of ``reward.terms``;
* one module per efficiency method, each its pure functions (paper and equation cited) and its
  registered term: :mod:`~rlspec.rewards.dler` (``dler_truncation``, DA-DLER's lengths),
  :mod:`~rlspec.rewards.dapo` (``dapo_overlong``), :mod:`~rlspec.rewards.kimi` (``kimi_length``),
  :mod:`~rlspec.rewards.cosine` (``cosine``), :mod:`~rlspec.rewards.l1` (``l1_exact``, ``l1_max``),
  :mod:`~rlspec.rewards.grpo_lambda` (``tlmre_length``, ``grpo_lambda``), :mod:`~rlspec.rewards.hapo`
  (``hapo``), :mod:`~rlspec.rewards.hbpo` (``hbpo``), :mod:`~rlspec.rewards.palu` (PALU's budgets);
* :mod:`~rlspec.rewards.custom` -- TRL- or verl-style user functions from ``reward.custom``, and
  :func:`build_reward_terms`, which turns the ``reward`` config into the terms mapping.

How the length terms combine with ``correctness`` (``reward.terms.correctness.weight``):

=================  ==========================  ===============================================
term               correctness weight          why
=================  ==========================  ===============================================
``dapo_overlong``  1 (added to it)             DAPO adds ``R_len`` to the 0/1 (or +-1) reward
``kimi_length``    1 (added to it)             Kimi adds ``len_reward`` to the task reward
``hapo``           1 (added to it)             HAPO adds ``r_len`` to the 0/1 reward
``cosine``         **0** (replaces it)         correct/wrong values are part of the cosine
``l1_exact``       **0** (replaces it)         ``1[correct] - alpha |n_gold - n|``
``l1_max``         **0** (replaces it)         ``1[correct] * clip(...)``
``tlmre_length``   **0** (replaces it)         ``1[correct] (1 - alpha sigmoid(z))``
``grpo_lambda``    **0** (replaces it)         TLMRE on selected groups, plain 0/1 elsewhere
``hbpo``           **0** (replaces it)         the budget-aware piecewise reward
=================  ==========================  ===============================================
"""

from rlspec.rewards import cosine, dapo, dler, grpo_lambda, hapo, hbpo, kimi, l1  # noqa: F401 -- register the terms
from rlspec.rewards.custom import CustomRewardTerm, build_reward_terms, load_custom_reward, register_custom_reward
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
