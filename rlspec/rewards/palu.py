"""PALU's per-question budget update (arXiv 2510.10168)."""

from __future__ import annotations

import math
from typing import Sequence

from rlspec.rewards.validation import check_int, check_lengths, check_number


def _quantile(sorted_values: Sequence[float], q: float) -> float:
    """Linear-interpolation quantile (numpy's default, "type 7") of an ascending list."""
    pos = q * (len(sorted_values) - 1)
    lo = math.floor(pos)
    hi = min(lo + 1, len(sorted_values) - 1)
    return sorted_values[lo] + (pos - lo) * (sorted_values[hi] - sorted_values[lo])


def palu_update_budget(
    budget: int,
    l_max: int,
    pass_rate: float,
    correct_lengths: Sequence[int],
    C: float = 0.8,
    tau: float = 0.5,
    *,
    min_budget: int = 1,
) -> int:
    r"""PALU's per-question budget update (arXiv 2510.10168; reference §5, second-hand).

    PALU solves ``min_{theta, L > 0} max_{lambda >= 0} L + lambda (C - R(theta, L, q))`` with
    ``lambda`` snapped to its extremes::

        if pass_rate >= C:  L <- L - (Q_1.0 - Q_{1-tau})   over the lengths of q's correct responses
        else:               L <- L_max

    ``pass_rate`` is the question's accuracy estimated from the previous (off-policy) rollouts;
    ``Q_p`` is the linear-interpolation quantile (numpy's default). Paper values: ``C = 0.8``,
    ``tau = 0.5``.

    Choices where the available text is silent:

    * no correct lengths -> ``L_max`` (there is no quantile gap to step by);
    * the step is ``floor(Q_1.0 - Q_{1-tau})`` tokens (budgets stay integers and never shrink by
      more than the gap);
    * the result is floored at ``min_budget`` (default 1: the formulation requires ``L > 0``);
      raise it to keep a usable minimum budget.

    >>> palu_update_budget(4000, 8000, 0.9, [1000, 2000, 3000, 4000])
    2500
    """
    l_max = check_int(l_max, "l_max", None, minimum=1)
    budget = check_int(budget, "budget", None, minimum=1)
    if budget > l_max:
        raise ValueError(f"budget must be <= l_max={l_max}, got {budget}")
    pass_rate = check_number(pass_rate, "pass_rate", None, lo=0.0, hi=1.0)
    C = check_number(C, "C", None, lo=0.0, hi=1.0)
    tau = check_number(tau, "tau", None, lo=0.0, hi=1.0)
    min_budget = check_int(min_budget, "min_budget", None, minimum=1)
    if min_budget > l_max:
        raise ValueError(f"min_budget must be <= l_max={l_max}, got {min_budget}")
    lengths = sorted(check_lengths(correct_lengths, "correct_lengths"))
    if not lengths or pass_rate < C:
        return l_max
    gap = _quantile(lengths, 1.0) - _quantile(lengths, 1.0 - tau)  # >= 0
    return max(min_budget, budget - math.floor(round(gap, 6)))
