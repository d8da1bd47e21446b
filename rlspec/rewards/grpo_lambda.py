"""TLMRE (Arora & Zanette, arXiv 2502.04463) and GRPO-lambda (arXiv 2505.18086): length-penalised rewards on correct answers."""

from __future__ import annotations

import math
from typing import Hashable, Sequence

from rlspec.errors import ConfigError
from rlspec.registry import REWARD_TERMS
from rlspec.rewards.terms import RewardBatch
from rlspec.rewards.validation import batch_lengths, check_lengths, check_number, check_same_length, groups, kwargs_key, sigmoid


def tlmre_length_reward(
    correct: Sequence[bool], lengths: Sequence[int], group_ids: Sequence[Hashable], alpha: float
) -> list[float]:
    r"""Length-penalised reward of Arora & Zanette, "Training Language Models to Reason
    Efficiently" (arXiv 2502.04463), the TLMRE baseline:

        r_i = 1[correct_i] * (1 - alpha * sigmoid((L_i - MEAN(q)) / STD(q)))

    where ``MEAN``/``STD`` are the mean and standard deviation of the lengths of the **correct**
    responses in the group of prompt ``q``; wrong responses get 0. ``alpha`` in ``[0, 1]`` trades
    accuracy for length (``alpha = 0`` is the plain 0/1 reward).

    Conventions (not fixed by the paper text available to us; reference §5 is second-hand):

    * ``STD`` is the population standard deviation (``ddof = 0``).
    * When ``STD = 0`` (a single correct response, or all correct responses of equal length)
      every correct length equals ``MEAN``, so ``z = 0`` is used: each correct response gets
      ``1 - alpha/2``. This is also the limit of the common ``(L - MEAN)/(STD + eps)`` form.
    * A group with no correct response gets 0 everywhere.

    >>> [round(r, 6) for r in tlmre_length_reward([True, True, True, False], [10, 20, 30, 40], [0, 0, 0, 0], 0.5)]
    [0.886449, 0.75, 0.613551, 0.0]
    """
    n = check_same_length(correct=correct, lengths=lengths, group_ids=group_ids)
    alpha = check_number(alpha, "alpha", None, lo=0.0, hi=1.0)
    lengths = check_lengths(lengths)
    out = [0.0] * n
    for members in groups(group_ids).values():
        right = [i for i in members if correct[i]]
        if not right:
            continue
        mean = sum(lengths[i] for i in right) / len(right)
        std = math.sqrt(sum((lengths[i] - mean) ** 2 for i in right) / len(right))  # population std
        for i in right:
            z = (lengths[i] - mean) / std if std > 0 else 0.0
            out[i] = 1.0 - alpha * sigmoid(z)
    return out


def grpo_lambda_select_groups(
    correct: Sequence[bool], group_ids: Sequence[int], top_lambda: float = 0.2
) -> set[int]:
    r"""GRPO-lambda's group selection (arXiv 2505.18086): the top-``lambda`` fraction of the batch's
    groups by correctness ratio get the length-penalised reward; the rest get plain 0/1.

    * Ratio of a group = #correct / #responses in it.
    * Number selected: ``k = floor(top_lambda * G)`` over the ``G`` distinct groups of the batch
      (after snapping ``top_lambda * G`` to 1e-6, so ``0.3 * 10`` gives 3). Rounding **down**
      never applies the length penalty to more than the requested fraction; with fewer than
      ``1/top_lambda`` groups nothing is selected (e.g. 4 groups at ``lambda = 0.2``).
    * Ties are broken deterministically by group id: higher ratio first, then smaller id.

    Reference-code defaults (reference §5, unverified against the official release):
    ``acc_top_lambda = 0.2``.

    >>> sorted(grpo_lambda_select_groups([1, 0, 0, 0, 1, 1, 1, 0, 1, 1, 0, 0], [0]*4 + [1]*4 + [2]*4, 0.67))
    [1, 2]
    """
    check_same_length(correct=correct, group_ids=group_ids)
    top_lambda = check_number(top_lambda, "top_lambda", None, lo=0.0, hi=1.0)
    members = groups(group_ids)
    k = math.floor(round(top_lambda * len(members), 6))
    ratios = {g: sum(1 for i in idx if correct[i]) / len(idx) for g, idx in members.items()}
    ranked = sorted(members, key=lambda g: (-ratios[g], g))
    return set(ranked[:k])


def grpo_lambda_reward(
    correct: Sequence[bool],
    lengths: Sequence[int],
    group_ids: Sequence[int],
    top_lambda: float = 0.2,
    alpha: float = 0.6,
) -> list[float]:
    r"""GRPO-lambda reward (arXiv 2505.18086): :func:`tlmre_length_reward` with ``alpha`` for the
    responses of the groups chosen by :func:`grpo_lambda_select_groups`, plain ``1[correct]`` for
    all others. The advantage is standard GRPO. Reference-code defaults (reference §5, unverified):
    ``acc_top_lambda = 0.2``, ``length_penalty_alpha = 0.6``. It replaces the correctness reward.

    >>> [round(r, 4) for r in grpo_lambda_reward([1, 1, 0, 1, 0, 0], [10, 30, 5, 10, 30, 5], [0]*3 + [1]*3, 0.5, 0.6)]
    [0.8386, 0.5614, 0.0, 1.0, 0.0, 0.0]
    """
    n = check_same_length(correct=correct, lengths=lengths, group_ids=group_ids)
    selected = grpo_lambda_select_groups(correct, group_ids, top_lambda)
    alpha = check_number(alpha, "alpha", None, lo=0.0, hi=1.0)
    shaped = tlmre_length_reward(correct, lengths, group_ids, alpha)
    return [shaped[i] if group_ids[i] in selected else (1.0 if correct[i] else 0.0) for i in range(n)]


@REWARD_TERMS.register("tlmre_length")
def tlmre_length(batch: RewardBatch, alpha: float | None = None) -> list[float]:
    """Arora & Zanette's reward (:func:`tlmre_length_reward`). It **replaces** correctness: use it
    with ``reward.terms.correctness.weight=0``. ``alpha`` (required, in [0, 1]) sets how much
    length costs; 0 is the plain 0/1 reward."""
    where = kwargs_key("tlmre_length")
    if alpha is None:
        raise ConfigError(
            f"{where}.alpha must be set: a number in [0, 1] (0 = no length penalty; GRPO-lambda uses 0.6)"
        )
    alpha = check_number(alpha, "alpha", where, lo=0.0, hi=1.0)
    return tlmre_length_reward(batch.correct, batch_lengths(batch), batch.group_ids, alpha)


@REWARD_TERMS.register("grpo_lambda")
def grpo_lambda(batch: RewardBatch, top_lambda: float = 0.2, alpha: float = 0.6) -> list[float]:
    """GRPO-lambda (:func:`grpo_lambda_reward`): the length-penalised reward on the top
    ``top_lambda`` fraction of the batch's groups by accuracy, plain 0/1 on the others. It
    **replaces** correctness (it already contains the 0/1 reward): a GRPO-lambda recipe sets
    ``reward.terms.correctness.weight=0`` and ``reward.terms.grpo_lambda.weight=1``. Groups are
    ranked within each scored batch (one dynamic-sampling chunk at a time)."""
    where = kwargs_key("grpo_lambda")
    top_lambda = check_number(top_lambda, "top_lambda", where, lo=0.0, hi=1.0, hint=" (GRPO-lambda: 0.2)")
    alpha = check_number(alpha, "alpha", where, lo=0.0, hi=1.0, hint=" (GRPO-lambda: 0.6)")
    return grpo_lambda_reward(batch.correct, batch_lengths(batch), batch.group_ids, top_lambda, alpha)
