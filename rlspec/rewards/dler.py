"""DLER's truncation penalty (arXiv 2510.15110, Sec. 2-3) and DA-DLER's difficulty-aware truncation lengths (Sec. 3.5)."""

from __future__ import annotations

from typing import Any, Hashable, Iterable, Sequence

from rlspec.errors import ConfigError
from rlspec.registry import REWARD_TERMS
from rlspec.rewards.terms import RewardBatch
from rlspec.rollout.base import FINISH_LENGTH
from rlspec.rewards.validation import check_int, check_number, check_same_length, groups


def _check_tiers(tiers: Any) -> list[tuple[float, int]]:
    if isinstance(tiers, (str, bytes)) or not isinstance(tiers, Iterable):
        raise ValueError(f"tiers must be a list of [threshold, length] pairs, e.g. [[0.5, 2000]], got {tiers!r}")
    out = []
    for tier in tiers:
        if isinstance(tier, (str, bytes)) or not isinstance(tier, Iterable) or len(list(tier)) != 2:
            raise ValueError(f"tiers must be a list of [threshold, length] pairs, e.g. [[0.5, 2000]], got {tier!r}")
        threshold, length = list(tier)
        threshold = check_number(threshold, "tiers threshold", None, lo=0.0, hi=1.0, hint=" (a correctness ratio)")
        length = check_int(length, "tiers length", None, minimum=1)
        out.append((threshold, length))
    thresholds = [t for t, _ in out]
    if len(set(thresholds)) != len(thresholds):
        raise ValueError(f"tiers thresholds must be distinct, got {thresholds}")
    return sorted(out)


def difficulty_aware_truncation_lengths(
    correct: Sequence[bool],
    group_ids: Sequence[Hashable],
    tiers: Sequence[Sequence[float]] = ((0.5, 2000),),
    default_length: int = 4000,
) -> list[int]:
    r"""DA-DLER's per-prompt truncation length (arXiv 2510.15110, §3.5; reference §2.6).

    For each prompt ``rho = #correct / G`` over its sampled group. Tiers ``(d_i, l_i)`` are sorted
    by threshold, ``d_1 < d_2 < ... < d_k``; then

    * ``rho <  d_1``              -> ``default_length`` (the hardest prompts keep the long limit),
    * ``d_i <= rho < d_{i+1}``    -> ``l_i``,
    * ``rho >= d_k``              -> ``l_k``.

    ``rho >= d`` is evaluated as ``#correct >= d * G - 1e-9``, so a ratio that equals a threshold
    (3 of 10 correct at ``d = 0.3``) is on the upper tier despite float rounding. The released
    setting is one threshold, ``((0.5, 2000),)`` with ``default_length = 4000``: prompts with at
    least half their rollouts correct are cut at 2000 tokens, the others at 4000. Nothing forces
    easier tiers to be shorter. Returns one limit per completion (the limit of its prompt); use
    the rollout hook cuts the rollouts and re-scores them.

    >>> difficulty_aware_truncation_lengths([1, 1, 0, 0, 1, 0, 0, 0], [0, 0, 0, 0, 1, 1, 1, 1])
    [2000, 2000, 2000, 2000, 4000, 4000, 4000, 4000]
    """
    n = check_same_length(correct=correct, group_ids=group_ids)
    tiers = _check_tiers(tiers)
    default_length = check_int(default_length, "default_length", None, minimum=1)
    out = [default_length] * n
    for members in groups(group_ids).values():
        hits = sum(1 for i in members if correct[i])
        limit = default_length
        for threshold, length in tiers:  # ascending: the last threshold reached wins
            if hits >= threshold * len(members) - 1e-9:
                limit = length
        for i in members:
            out[i] = limit
    return out


@REWARD_TERMS.register("dler_truncation")
def dler_truncation(batch: RewardBatch, penalty_coef: float = 0.0) -> list[float]:
    r"""DLER's truncation length penalty (arXiv 2510.15110, Sec. 2-3), as an additive term.

    DLER sets ``R'_i = R_i + L_i`` where ``L_i`` gives **total reward 0** to a response cut at the
    target length (the rollout's ``max_response_length``; ``finish_reason == "length"``). With a
    correctness reward ``R_i`` of weight 1 that is

    ``L_i = -(1 - penalty_coef) * R_i`` if response ``i`` was truncated, else ``0``,

    so a truncated response totals ``penalty_coef * R_i``: 0 with the paper's rule
    (``penalty_coef=0.0``, the default) and ``0.1 * R_i`` with the released code's
    ``stop_properly_penalty.penalty_coef=0.1``, which multiplies the reward of any response whose
    vLLM finish reason is not ``stop`` by 0.1. A truncated response is correct only if it boxed
    the right answer (after ``</think>`` when ``reward.require_think_close``) before being cut,
    so the two settings rarely differ in practice.

    This term assumes the ``correctness`` term has weight 1 (as in ``reward=dler``); scale its
    weight with the correctness weight otherwise. Other terms (e.g. a custom reward) are not
    zeroed for truncated responses.

    >>> b = RewardBatch(prompts=["q"] * 3, completions=["..."] * 3, completion_ids=[[1]] * 3,
    ...     finish_reasons=["stop", "length", "length"], answers=["4"] * 3,
    ...     correct=[True, True, False], group_ids=[0, 0, 0])
    >>> dler_truncation(b)  # totals with correctness: [1.0, 0.0, 0.0]
    [0.0, -1.0, 0.0]
    >>> dler_truncation(b, penalty_coef=0.1)  # totals: [1.0, 0.1, 0.0]
    [0.0, -0.9, 0.0]
    """
    if not 0.0 <= penalty_coef <= 1.0:
        raise ConfigError(
            f"reward.terms.dler_truncation.kwargs.penalty_coef must be in [0, 1] (0 = paper, 0.1 = DLER code), "
            f"got {penalty_coef}"
        )
    return [
        -(1.0 - penalty_coef) if reason == FINISH_LENGTH and c else 0.0
        for reason, c in zip(batch.finish_reasons, batch.correct)
    ]
