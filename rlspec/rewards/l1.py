"""L1 / LCPO (arXiv 2503.04697): a target length in the prompt, rewarded exactly (``l1_exact``) or as a maximum (``l1_max``)."""

from __future__ import annotations

from typing import Any, Sequence

from rlspec.errors import ConfigError
from rlspec.registry import REWARD_TERMS
from rlspec.rewards.terms import RewardBatch
from rlspec.rewards.validation import batch_lengths, check_int, check_lengths, check_number, check_same_length, is_int, kwargs_key, plus_zero


def _check_targets(target_lengths: Sequence[Any], name: str = "target_lengths") -> list[int]:
    out = []
    for i, value in enumerate(target_lengths):
        if isinstance(value, float) and value.is_integer():
            value = int(value)  # parquet/JSON may store ints as floats
        if not is_int(value) or value < 1:
            raise ValueError(f"{name}[{i}] must be a positive int (tokens), got {value!r}")
        out.append(int(value))
    return out


L1_TEMPLATE = "Think for {budget} tokens."  # appended to the user message (L1 Sec. 3)
L1_MAX_TEMPLATE = "Think for maximum {budget} tokens."  # the released data script's L1-Max wording


def l1_prompt_suffix(target: int, *, max_budget: bool = False) -> str:
    """The instruction L1 (arXiv 2503.04697) appends to the problem: ``"Think for {n} tokens."``.

    During training ``n = n_gold ~ U(100, 4000)`` per prompt, stored in the ``target_length``
    column for the ``l1_exact`` / ``l1_max`` terms. ``max_budget=True`` gives the released data
    script's L1-Max wording ``"Think for maximum {n} tokens."`` (``scripts/data/
    deepscaler_dataset.py``, which writes the target as a negative number for that case).

    >>> l1_prompt_suffix(1024)
    'Think for 1024 tokens.'
    """
    target = check_int(target, "target", None, minimum=1)
    return (L1_MAX_TEMPLATE if max_budget else L1_TEMPLATE).format(budget=target)


def l1_exact_reward(
    correct: Sequence[bool], lengths: Sequence[int], target_lengths: Sequence[int], alpha: float = 0.0003
) -> list[float]:
    r"""L1-Exact reward (LCPO-Exact; arXiv 2503.04697): ``r = 1[y = y_gold] - alpha |n_gold - n_y|``.

    ``n_gold`` is the target in the prompt ("Think for n_gold tokens."), ``n_y`` the response
    length. Paper: ``alpha = 0.0003``. The released code (``deepscaler/rewards/math_reward.py``
    ``get_delta_score_exact`` in the L1 repository's forks) divides by 3000 instead, i.e.
    ``alpha = 1/3000``; pass ``alpha=1/3000`` for that. It replaces the correctness reward.

    >>> [round(r, 6) for r in l1_exact_reward([True, False], [1200, 500], [1000, 1000])]
    [0.94, -0.15]
    """
    n = check_same_length(correct=correct, lengths=lengths, target_lengths=target_lengths)
    alpha = check_number(alpha, "alpha", None, lo=0.0)
    lengths = check_lengths(lengths)
    targets = _check_targets(target_lengths)
    return [plus_zero((1.0 if correct[i] else 0.0) - alpha * abs(targets[i] - lengths[i])) for i in range(n)]


def l1_max_reward(
    correct: Sequence[bool],
    lengths: Sequence[int],
    target_lengths: Sequence[int],
    alpha: float = 0.0003,
    delta: float = 0.5,
) -> list[float]:
    r"""L1-Max reward (LCPO-Max; arXiv 2503.04697):
    ``r = 1[y = y_gold] * clip(alpha (n_gold - n_y) + delta, 0, 1)``.

    A correct answer at exactly the budget earns ``delta``; shorter earns more (up to 1), longer
    less (down to 0); wrong answers earn 0. Paper: ``delta = 0.5``. The released code
    (``get_delta_score_max``: ``clip(-(n_y - n_gold)/500, -1, 1)``, then ``(sc + 1)/2``) is this
    formula with ``alpha = 1/1000`` and ``delta = 0.5``; pass ``alpha=0.001`` for that. It
    replaces the correctness reward.

    >>> [round(r, 6) for r in l1_max_reward([True, True, True, False], [1200, 0, 3000, 10], [1000, 4000, 1000, 1000])]
    [0.44, 1.0, 0.0, 0.0]
    """
    n = check_same_length(correct=correct, lengths=lengths, target_lengths=target_lengths)
    alpha = check_number(alpha, "alpha", None, lo=0.0)
    delta = check_number(delta, "delta", None)
    lengths = check_lengths(lengths)
    targets = _check_targets(target_lengths)
    out = []
    for i in range(n):
        score = min(1.0, max(0.0, alpha * (targets[i] - lengths[i]) + delta))
        out.append(plus_zero(score) if correct[i] else 0.0)
    return out


TARGET_COLUMN = "target_length"


def _batch_targets(batch: RewardBatch, name: str) -> list[int]:
    if TARGET_COLUMN not in batch.columns:
        raise ConfigError(
            f"reward.terms.{name} needs the per-prompt token target n_gold in a dataset column "
            f"{TARGET_COLUMN!r}, but the training data has none (columns: {sorted(batch.columns) or 'none'}); "
            f"fix: give every row of data.path a {TARGET_COLUMN!r} field (L1 samples it from U(100, 4000)) and "
            f"end its question with rlspec.rewards.l1.l1_prompt_suffix({TARGET_COLUMN})"
        )
    try:
        return _check_targets(batch.columns[TARGET_COLUMN], name=f"column {TARGET_COLUMN!r} row")
    except ValueError as err:
        raise ConfigError(f"reward.terms.{name}: {err}; fix the {TARGET_COLUMN!r} column of data.path") from None


@REWARD_TERMS.register("l1_exact")
def l1_exact(batch: RewardBatch, alpha: float = 0.0003) -> list[float]:
    """L1-Exact (:func:`l1_exact_reward`) with ``n_gold`` from the ``target_length`` column. It
    **replaces** correctness: use it with ``reward.terms.correctness.weight=0``."""
    alpha = check_number(alpha, "alpha", kwargs_key("l1_exact"), lo=0.0, hint=" (L1: 0.0003)")
    return l1_exact_reward(batch.correct, batch_lengths(batch), _batch_targets(batch, "l1_exact"), alpha)


@REWARD_TERMS.register("l1_max")
def l1_max(batch: RewardBatch, alpha: float = 0.0003, delta: float = 0.5) -> list[float]:
    """L1-Max (:func:`l1_max_reward`) with ``n_gold`` from the ``target_length`` column. It
    **replaces** correctness: use it with ``reward.terms.correctness.weight=0``."""
    where = kwargs_key("l1_max")
    alpha = check_number(alpha, "alpha", where, lo=0.0, hint=" (L1: 0.0003)")
    delta = check_number(delta, "delta", where, hint=" (L1: 0.5)")
    return l1_max_reward(batch.correct, batch_lengths(batch), _batch_targets(batch, "l1_max"), alpha, delta)
