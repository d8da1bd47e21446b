"""Kimi k1.5's group length reward (arXiv 2501.12599, "Length Penalty"), added to the correctness reward."""

from __future__ import annotations

from typing import Hashable, Sequence

from rlspec.registry import REWARD_TERMS
from rlspec.rewards.terms import RewardBatch
from rlspec.rewards.validation import batch_lengths, check_lengths, check_same_length, groups, plus_zero


def kimi_length_reward(
    lengths: Sequence[int], correct: Sequence[bool], group_ids: Sequence[Hashable]
) -> list[float]:
    r"""Kimi k1.5's length reward (arXiv 2501.12599, "Length Penalty"), per group of ``k`` samples.

    Within the group of a prompt, with ``min_len``/``max_len`` over **all** its responses::

        lambda_i = 0.5 - (len_i - min_len) / (max_len - min_len)
        r_i      = lambda_i            if response i is correct
                 = min(0, lambda_i)    otherwise

    and ``r_i = 0`` for the whole group if ``max_len == min_len`` (this also covers a group of one).
    It is added to the task reward with a weight (Kimi does not disclose it; they warm up without
    it). open-r1's ``len_reward`` implements the same formula on character lengths; here lengths
    are tokens.

    >>> kimi_length_reward([10, 20, 30, 7], [True, False, True, True], [0, 0, 0, 1])
    [0.5, 0.0, -0.5, 0.0]
    """
    n = check_same_length(lengths=lengths, correct=correct, group_ids=group_ids)
    lengths = check_lengths(lengths)
    out = [0.0] * n
    for members in groups(group_ids).values():
        lo = min(lengths[i] for i in members)
        hi = max(lengths[i] for i in members)
        if hi == lo:
            continue  # all equal: 0 for the whole group
        for i in members:
            lam = 0.5 - (lengths[i] - lo) / (hi - lo)
            out[i] = plus_zero(lam if correct[i] else min(0.0, lam))
    return out


@REWARD_TERMS.register("kimi_length")
def kimi_length(batch: RewardBatch) -> list[float]:
    """Kimi k1.5's group length reward (:func:`kimi_length_reward`), **added** to correctness
    (Kimi's weight is not published; set it with ``reward.terms.kimi_length.weight``)."""
    return kimi_length_reward(batch_lengths(batch), batch.correct, batch.group_ids)
