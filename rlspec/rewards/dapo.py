"""DAPO's soft overlong punishment (arXiv 2503.14476, Eq. 13), added to the correctness reward."""

from __future__ import annotations

from typing import Any, Sequence

from rlspec.errors import ConfigError
from rlspec.registry import REWARD_TERMS
from rlspec.rewards.terms import RewardBatch
from rlspec.rewards.validation import batch_lengths, check_int, check_lengths, check_number, error, kwargs_key, plus_zero


def _validate_dapo(max_len: Any, cache_len: Any, factor: Any, where: str | None) -> tuple[int, int, float]:
    max_len = check_int(max_len, "max_len", where, minimum=1, hint=" (the max response length L_max; DAPO: 20480)")
    cache_len = check_int(cache_len, "cache_len", where, minimum=1, hint=" (the soft buffer L_cache; DAPO: 4096)")
    if cache_len > max_len:
        raise error(where, "cache_len", f"must be <= max_len={max_len} (the buffer lies inside L_max), "
                                         f"got {cache_len}")
    factor = check_number(factor, "factor", where, lo=0.0, hint=" (penalty_factor; DAPO: 1.0)")
    return max_len, cache_len, factor


def dapo_overlong_penalty(
    lengths: Sequence[int], max_len: int, cache_len: int, factor: float = 1.0
) -> list[float]:
    r"""DAPO's soft overlong punishment (arXiv 2503.14476, Eq. 13), added to the correctness reward.

    With ``L_max = max_len``, ``L_cache = cache_len`` and ``|y|`` the response length in tokens::

        R_len(y) = 0                                    if |y| <= L_max - L_cache
                 = ((L_max - L_cache) - |y|) / L_cache  if L_max - L_cache < |y| <= L_max
                 = -1                                   if |y| > L_max

    times ``factor``. Inside ``[0, L_max]`` this equals verl's
    ``min(-(|y| - (L_max - L_cache)) / L_cache * factor, 0)`` (``reward_model.overlong_buffer``;
    TRL's ``get_soft_overlong_punishment``). verl never sees ``|y| > L_max`` because generation
    stops at ``L_max``; if it does happen here (``max_len`` below the rollout cap) the paper's
    ``-1`` is used instead of continuing the line. DAPO: ``L_max = 20480``, ``L_cache = 4096``,
    ``factor = 1``.

    >>> dapo_overlong_penalty([10, 16, 17, 18, 20, 21], max_len=20, cache_len=4)
    [0.0, 0.0, -0.25, -0.5, -1.0, -1.0]
    """
    max_len, cache_len, factor = _validate_dapo(max_len, cache_len, factor, None)
    expected = max_len - cache_len  # L_max - L_cache: no penalty up to here
    out = []
    for length in check_lengths(lengths):
        if length <= expected:
            out.append(0.0)
        elif length <= max_len:
            out.append(plus_zero(-(length - expected) / cache_len * factor))
        else:
            out.append(plus_zero(-factor))
    return out


@REWARD_TERMS.register("dapo_overlong")
def dapo_overlong(
    batch: RewardBatch, max_len: int | None = None, cache_len: int | None = None, factor: float = 1.0
) -> list[float]:
    """DAPO's soft overlong punishment (:func:`dapo_overlong_penalty`), **added** to correctness.

    ``max_len`` should be the rollout's ``rollout.max_response_length`` (DAPO: 20480) and
    ``cache_len`` the buffer (DAPO: 4096); both are required.
    """
    where = kwargs_key("dapo_overlong")
    for key, value in (("max_len", max_len), ("cache_len", cache_len)):
        if value is None:
            raise ConfigError(
                f"{where}.{key} must be set: max_len = rollout.max_response_length (DAPO: 20480), "
                f"cache_len = the soft-penalty buffer inside it (DAPO: 4096)"
            )
    max_len, cache_len, factor = _validate_dapo(max_len, cache_len, factor, where)
    return dapo_overlong_penalty(batch_lengths(batch), max_len, cache_len, factor)
