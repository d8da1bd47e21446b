"""HBPO's budget-aware reward (arXiv 2507.15844, Eq. 1-3; code ZJU-REAL/HBPO); it replaces the correctness reward."""

from __future__ import annotations

import math
import re
from typing import Any, Optional

from rlspec.errors import ConfigError
from rlspec.registry import REWARD_TERMS
from rlspec.rewards.grader import THINK_CLOSE, extract_final_answer
from rlspec.rewards.terms import RewardBatch
from rlspec.rewards.validation import check_int, check_number


# The budget prefill after <think> of each subgroup's prompt (Sec. 3.1): the paper's text, and the
# released code's ("with" instead of "within", no period).
HBPO_TEMPLATES = {
    "paper": " I will answer the question within {budget} tokens.\n",
    "code": " I will answer the question with {budget} tokens",
}
HBPO_CODE_PI = 3.1416  # the released reward hard-codes PI_APPROX = 3.1416
# The released rollout prefills "<think> I will answer the question with {b} tokens" (paper text:
# "within"); the released reward recovers b with this regex.
HBPO_BUDGET_RE = re.compile(r"<think> I will answer the question with (\d+) tokens")


def _validate_hbpo(alpha: Any, beta: Any, l_max: Any) -> tuple[float, float, int]:
    alpha = check_number(alpha, "alpha", None, lo=0.0)
    beta = check_number(beta, "beta", None)
    l_max = check_int(l_max, "l_max", None, minimum=1)
    return alpha, beta, l_max


def hbpo_f2(b: float, beta: float = 4.0, l_max: int = 4096, *, pi: float = math.pi) -> float:
    r"""HBPO's in-budget reward ``f2(b) = beta cos(pi b / (2 L_max))`` (arXiv 2507.15844, Eq. 3).

    Constants from the released code: ``beta = 4``, ``L_max = 4096``. Values: b = 512 -> 3.923,
    1024 -> 3.696, 2048 -> 2.828, 2560 -> 2.222.

    >>> round(hbpo_f2(512), 3)
    3.923
    """
    _, beta, l_max = _validate_hbpo(0.0, beta, l_max)
    b = check_number(b, "b", None, lo=0.0)
    return beta * math.cos(pi * b / (2 * l_max))


def hbpo_f1(
    n: float, b: float, alpha: float = 1 / 4096, beta: float = 4.0, l_max: int = 4096, *, pi: float = math.pi
) -> float:
    r"""HBPO's over-budget reward ``f1(n, b) = beta cos(pi n / (2 L_max)) - alpha |n - b|``
    (arXiv 2507.15844, Eq. 2). Code constants: ``alpha = 1/4096``, ``beta = 4``, ``L_max = 4096``.

    >>> round(hbpo_f1(4096, 512), 3)
    -0.875
    """
    alpha, beta, l_max = _validate_hbpo(alpha, beta, l_max)
    n = check_number(n, "n", None, lo=0.0)
    b = check_number(b, "b", None, lo=0.0)
    return beta * math.cos(pi * n / (2 * l_max)) - alpha * abs(n - b)


def hbpo_reward(
    n: int,
    b: int | None,
    correct: bool,
    well_formed: bool,
    variant: str = "paper",
    *,
    alpha: float = 1 / 4096,
    beta: float = 4.0,
    l_max: int = 4096,
    format_error_reward: float = -1.0,
) -> float:
    r"""HBPO's piecewise budget-aware reward (arXiv 2507.15844, Eq. 1-3; reference §3.2).

    ``n`` is the response length, ``b`` the budget of its subgroup (512/1024/2048/2560).

    ``variant="paper"`` (Eq. 1)::

        R(n | b) = f1(n, b)   if correct and b < n <= L_max
                 = f2(b)      if correct and n <= b (and n <= L_max)
                 = 0          otherwise

    (``well_formed`` is not used: a format error is simply not correct). The paper defines ``R``
    per budget, so ``b=None`` is an error here.

    ``variant="code"`` (``ZJU-REAL/HBPO``, ``rllm/rewards/math_reward.py``):

    * not ``well_formed`` (no ``</think>`` or no ``\boxed`` after it; :func:`hbpo_well_formed`)
      -> ``format_error_reward = -1``, which includes truncated responses;
    * correct and ``n <= L_max`` -> ``min(f1(n, b), f2(b))`` for **every** such ``n`` (also
      ``n <= b``: b=512, n=0 gives 3.875 where the paper gives 3.923), with ``pi = 3.1416``;
      without a budget (``b is None``) -> ``round(beta cos(3.1416 n / (2 L_max)), 2)``;
    * otherwise (wrong, or correct but ``n > L_max``) -> 0.

    >>> round(hbpo_reward(0, 512, True, True), 3), round(hbpo_reward(0, 512, True, True, "code"), 3)
    (3.923, 3.875)
    """
    if variant not in ("paper", "code"):
        raise ValueError(f"variant must be 'paper' or 'code', got {variant!r}")
    alpha, beta, l_max = _validate_hbpo(alpha, beta, l_max)
    n = check_int(n, "n", None, minimum=0)
    if b is not None:
        b = check_int(b, "b", None, minimum=1)
    if variant == "paper":
        if b is None:
            raise ValueError(
                "hbpo_reward(variant='paper') needs the budget b (Eq. 1 is defined per budget); "
                "use variant='code' for the released code's no-budget reward round(4 cos(pi n / 8192), 2)"
            )
        if not correct or n > l_max:
            return 0.0
        return hbpo_f2(b, beta, l_max) if n <= b else hbpo_f1(n, b, alpha, beta, l_max)
    format_error_reward = check_number(format_error_reward, "format_error_reward", None)
    if not well_formed:
        return format_error_reward
    if not correct or n > l_max:
        return 0.0
    if b is None:
        return round(beta * math.cos(HBPO_CODE_PI * n / (2 * l_max)), 2)
    return min(hbpo_f1(n, b, alpha, beta, l_max, pi=HBPO_CODE_PI), hbpo_f2(b, beta, l_max, pi=HBPO_CODE_PI))


def hbpo_well_formed(text: str) -> bool:
    r"""The released HBPO reward's format check: the response has a ``</think>`` and the text
    after the first one (up to a second one, as ``text.split("</think>")[1]``) contains a final
    ``\boxed{...}``. A response cut at the length limit usually fails it.

    >>> hbpo_well_formed("<think>2+2</think> \\boxed{4}"), hbpo_well_formed("<think>2+2</think> 4")
    (True, False)
    """
    if not isinstance(text, str) or THINK_CLOSE not in text:
        return False
    return extract_final_answer(text.split(THINK_CLOSE)[1]) is not None


def hbpo_parse_budget(text: str) -> int | None:
    """The budget ``b`` in the released code's prefill ``"<think> I will answer the question with
    {b} tokens"`` (:data:`HBPO_BUDGET_RE`), or ``None`` if absent (natural reasoning)."""
    match = HBPO_BUDGET_RE.search(text) if isinstance(text, str) else None
    return int(match.group(1)) if match else None


@REWARD_TERMS.register("hbpo")
def hbpo_term(
    batch: RewardBatch,
    variant: str = "paper",
    l_max: int = 4096,
    beta: float = 4.0,
    alpha: Optional[float] = None,
) -> list[float]:
    r"""HBPO's budget-aware reward (arXiv 2507.15844, Eq. 1-3) for every rollout; replaces 0/1
    correctness. :func:`rlspec.rewards.custom.build_reward_terms` fills the kwargs from the top-level
    ``hbpo`` config section.

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
