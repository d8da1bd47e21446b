r"""Efficiency (length) rewards for reasoning RL: DAPO, Kimi k1.5, cosine, L1, TLMRE, GRPO-lambda,
HAPO, HBPO, DA-DLER and PALU.

Two layers:

* **Pure functions** over plain lists (one value per completion; ``B`` completions, groups given by
  ``group_ids``), each citing its paper and equation. They raise ``ValueError`` naming the argument.
* **Registered reward terms** (:data:`rlspec.rewards.terms.REWARD_TERMS`) for the methods that need
  nothing but a :class:`~rlspec.rewards.terms.RewardBatch`. Their kwargs come from
  ``reward.terms.<name>.kwargs`` and bad values raise :class:`~rlspec.errors.ConfigError` naming
  ``reward.terms.<name>.kwargs.<key>``. In every term the length of completion ``i`` is
  ``len(batch.completion_ids[i])`` (generated tokens, as the rollout engine reports them) and it
  is *truncated* when ``batch.finish_reasons[i] == "length"``
  (:data:`rlspec.rollout.base.FINISH_LENGTH`).

How the terms combine with ``correctness`` (``reward.terms.correctness.weight``):

=================  ==========================  ===============================================
term               correctness weight          why
=================  ==========================  ===============================================
``dapo_overlong``  1 (added to it)             DAPO adds ``R_len`` to the 0/1 (or +-1) reward
``kimi_length``    1 (added to it)             Kimi adds ``len_reward`` to the task reward
``cosine``         **0** (replaces it)         correct/wrong values are part of the cosine
``l1_exact``       **0** (replaces it)         ``1[correct] - alpha |n_gold - n|``
``l1_max``         **0** (replaces it)         ``1[correct] * clip(...)``
``tlmre_length``   **0** (replaces it)         ``1[correct] (1 - alpha sigmoid(z))``
``grpo_lambda``    **0** (replaces it)         TLMRE on selected groups, plain 0/1 elsewhere
=================  ==========================  ===============================================

HAPO (per-prompt history across steps: :class:`HapoHistory`) and HBPO (the budget ``b`` of each
rollout) are registered as ``hapo`` and ``hbpo`` in :mod:`rlspec.rewards.budgeted`; DA-DLER and
PALU change the rollout itself (:func:`difficulty_aware_truncation_lengths`,
:func:`palu_update_budget`, used by the trainer's ``rollout.truncation``).
"""

from __future__ import annotations

import math
import numbers
import re
from collections import defaultdict
from typing import Any, Hashable, Iterable, Mapping, Sequence

from rlspec.errors import ConfigError
from rlspec.rewards.grader import THINK_CLOSE, extract_final_answer
from rlspec.rewards.terms import REWARD_TERMS, RewardBatch
from rlspec.rollout.base import FINISH_LENGTH

__all__ = [
    "COSINE_CODE_MARGIN",
    "HBPO_BUDGET_RE",
    "HBPO_CODE_PI",
    "HapoHistory",
    "apply_truncation",
    "cosine_length_reward",
    "dapo_overlong_penalty",
    "difficulty_aware_truncation_lengths",
    "grpo_lambda_reward",
    "grpo_lambda_select_groups",
    "hapo_length_reward",
    "hapo_length_rewards",
    "hbpo_f1",
    "hbpo_f2",
    "hbpo_parse_budget",
    "hbpo_reward",
    "hbpo_well_formed",
    "kimi_length_reward",
    "l1_exact_reward",
    "l1_max_reward",
    "l1_prompt_suffix",
    "palu_update_budget",
    "tlmre_length_reward",
]


# ----------------------------------------------------------------------------------------------
# Validation helpers: `where=None` -> ValueError naming the argument (pure functions);
# `where="reward.terms.<name>.kwargs"` -> ConfigError naming the config key (registered terms).
# ----------------------------------------------------------------------------------------------


def _error(where: str | None, key: str, message: str) -> Exception:
    if where is None:
        return ValueError(f"{key} {message}")
    return ConfigError(f"{where}.{key} {message}")


def _is_int(value: Any) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def _check_int(value: Any, key: str, where: str | None, *, minimum: int, hint: str = "") -> int:
    if not _is_int(value) or value < minimum:
        raise _error(where, key, f"must be an int >= {minimum}{hint}, got {value!r}")
    return int(value)


def _check_number(
    value: Any, key: str, where: str | None, *, lo: float = -math.inf, hi: float = math.inf, hint: str = ""
) -> float:
    ok = isinstance(value, numbers.Real) and not isinstance(value, bool) and math.isfinite(value) and lo <= value <= hi
    if not ok:
        if lo == -math.inf and hi == math.inf:
            bounds = "a finite number"
        elif hi == math.inf:
            bounds = f"a number >= {lo}"
        elif lo == -math.inf:
            bounds = f"a number <= {hi}"
        else:
            bounds = f"a number in [{lo}, {hi}]"
        raise _error(where, key, f"must be {bounds}{hint}, got {value!r}")
    return float(value)


def _check_same_length(**sequences: Sequence[Any]) -> int:
    sizes = {name: len(values) for name, values in sequences.items()}
    if len(set(sizes.values())) > 1:
        listing = ", ".join(f"{name}={size}" for name, size in sizes.items())
        raise ValueError(f"per-completion inputs must have one entry per completion; got lengths {listing}")
    return next(iter(sizes.values()), 0)


def _check_lengths(lengths: Sequence[Any], name: str = "lengths") -> list[int]:
    out = []
    for i, value in enumerate(lengths):
        if not _is_int(value) or value < 0:
            raise ValueError(f"{name}[{i}] must be a non-negative int (a token count), got {value!r}")
        out.append(int(value))
    return out


def _groups(group_ids: Sequence[Hashable]) -> dict[Hashable, list[int]]:
    """``{group id: [indices of its completions]}`` in first-seen order."""
    members: dict[Hashable, list[int]] = defaultdict(list)
    for i, g in enumerate(group_ids):
        members[g].append(i)
    return members


def _sigmoid(x: float) -> float:
    if x >= 0:
        return 1.0 / (1.0 + math.exp(-x))
    e = math.exp(x)
    return e / (1.0 + e)


def _plus_zero(x: float) -> float:
    """``x`` with ``-0.0`` turned into ``0.0`` (so logged rewards never show ``-0.0``)."""
    return x + 0.0


# ----------------------------------------------------------------------------------------------
# 1. DAPO overlong reward shaping
# ----------------------------------------------------------------------------------------------


def _validate_dapo(max_len: Any, cache_len: Any, factor: Any, where: str | None) -> tuple[int, int, float]:
    max_len = _check_int(max_len, "max_len", where, minimum=1, hint=" (the max response length L_max; DAPO: 20480)")
    cache_len = _check_int(cache_len, "cache_len", where, minimum=1, hint=" (the soft buffer L_cache; DAPO: 4096)")
    if cache_len > max_len:
        raise _error(where, "cache_len", f"must be <= max_len={max_len} (the buffer lies inside L_max), "
                                         f"got {cache_len}")
    factor = _check_number(factor, "factor", where, lo=0.0, hint=" (penalty_factor; DAPO: 1.0)")
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
    for length in _check_lengths(lengths):
        if length <= expected:
            out.append(0.0)
        elif length <= max_len:
            out.append(_plus_zero(-(length - expected) / cache_len * factor))
        else:
            out.append(_plus_zero(-factor))
    return out


# ----------------------------------------------------------------------------------------------
# 2. Kimi k1.5 length penalty
# ----------------------------------------------------------------------------------------------


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
    n = _check_same_length(lengths=lengths, correct=correct, group_ids=group_ids)
    lengths = _check_lengths(lengths)
    out = [0.0] * n
    for members in _groups(group_ids).values():
        lo = min(lengths[i] for i in members)
        hi = max(lengths[i] for i in members)
        if hi == lo:
            continue  # all equal: 0 for the whole group
        for i in members:
            lam = 0.5 - (lengths[i] - lo) / (hi - lo)
            out[i] = _plus_zero(lam if correct[i] else min(0.0, lam))
    return out


# ----------------------------------------------------------------------------------------------
# 3. Cosine length-scaling reward (Yeo et al.)
# ----------------------------------------------------------------------------------------------

COSINE_CODE_MARGIN = 16  # demystify-long-cot: openrlhf/reward/common.py MAX_LEN_MARGIN


def _validate_cosine(
    max_len: Any, constants: Mapping[str, Any], exceed_margin: Any, where: str | None
) -> tuple[int, dict[str, float], int]:
    max_len = _check_int(max_len, "max_len", where, minimum=1, hint=" (L_max: the rollout's max response length)")
    values = {key: _check_number(value, key, where) for key, value in constants.items()}
    exceed_margin = _check_int(exceed_margin, "exceed_margin", where, minimum=0,
                               hint=" (0 = paper, 16 = released code)")
    return max_len, values, exceed_margin


def cosine_length_reward(
    lengths: Sequence[int],
    correct: Sequence[bool],
    truncated: Sequence[bool],
    max_len: int,
    r0_correct: float = 2.0,
    rL_correct: float = 1.0,
    r0_wrong: float = -10.0,
    rL_wrong: float = 0.0,
    r_exceed: float = -10.0,
    *,
    exceed_margin: int = 0,
) -> list[float]:
    r"""Cosine length-scaling reward of Yeo et al., "Demystifying Long Chain-of-Thought Reasoning
    in LLMs" (arXiv 2502.03373, Sec. 4, Eq. 1). It **replaces** the correctness reward.

    ``CosFn(t, T, eta_min, eta_max) = eta_min + 0.5 (eta_max - eta_min) (1 + cos(t pi / T))`` goes
    from ``eta_max`` at ``t = 0`` to ``eta_min`` at ``t = T``. With ``T = L_max = max_len``::

        R = CosFn(L, L_max, rL_correct, r0_correct)   if correct
          = CosFn(L, L_max, rL_wrong,   r0_wrong)     if wrong
          = r_exceed                                  if the response hit the length limit

    so a correct answer earns ``r0_correct`` at length 0 decaying to ``rL_correct`` at ``L_max``
    (shorter is better), and a wrong one ``r0_wrong`` at length 0 rising to ``rL_wrong`` (when
    wrong, thinking longer is better; short wrong answers are penalised most).

    Exceed rule. Paper: ``r_exceed`` when ``L_gen = L_max``, i.e. the response was cut; here when
    ``truncated[i]`` or ``L + exceed_margin >= max_len``. The released code
    (``eddycmu/demystify-long-cot``, ``openrlhf/openrlhf/reward/cosine.py``) tests
    ``gen_len + MAX_LEN_MARGIN >= max_len`` with ``MAX_LEN_MARGIN = 16`` against off-by-one errors:
    pass ``exceed_margin=16`` (:data:`COSINE_CODE_MARGIN`) for that behaviour.

    Constants. The defaults are the values of the released run script for the paper's cosine
    experiments (``openrlhf/scripts/section_4__impact_of_reward_design_on_long_cot/
    section_4.2__active_scaling_of_cot_length__cosine_repetition_penalty.sh``:
    ``min_value_correct=1, max_value_correct=2, min_value_wrong=-10, max_value_wrong=0,
    math_rule_common_exceed_length=-10``), found with the search tool together with the reward
    code above. The paper's own hyperparameter table could not be retrieved when this was
    written, so the defaults are confirmed against the released code, not the paper text. The same script also
    adds an n-gram repetition penalty (``-0.05``, n=40) to wrong answers; that penalty is not part
    of this function.

    >>> [round(r, 4) for r in cosine_length_reward([0, 50, 50, 0, 30], [True, True, False, False, True],
    ...                                            [False, False, False, False, True], max_len=100)]
    [2.0, 1.5, -5.0, -10.0, -10.0]
    """
    n = _check_same_length(lengths=lengths, correct=correct, truncated=truncated)
    constants = dict(r0_correct=r0_correct, rL_correct=rL_correct, r0_wrong=r0_wrong, rL_wrong=rL_wrong,
                     r_exceed=r_exceed)
    max_len, c, exceed_margin = _validate_cosine(max_len, constants, exceed_margin, None)
    lengths = _check_lengths(lengths)
    out = []
    for i in range(n):
        length = lengths[i]
        if truncated[i] or length + exceed_margin >= max_len:
            out.append(c["r_exceed"])
            continue
        r0, rL = (c["r0_correct"], c["rL_correct"]) if correct[i] else (c["r0_wrong"], c["rL_wrong"])
        out.append(_plus_zero(rL + 0.5 * (r0 - rL) * (1.0 + math.cos(length * math.pi / max_len))))
    return out


# ----------------------------------------------------------------------------------------------
# 4. L1 / LCPO
# ----------------------------------------------------------------------------------------------


def _check_targets(target_lengths: Sequence[Any], name: str = "target_lengths") -> list[int]:
    out = []
    for i, value in enumerate(target_lengths):
        if isinstance(value, float) and value.is_integer():
            value = int(value)  # parquet/JSON may store ints as floats
        if not _is_int(value) or value < 1:
            raise ValueError(f"{name}[{i}] must be a positive int (tokens), got {value!r}")
        out.append(int(value))
    return out


def l1_prompt_suffix(target: int, *, max_budget: bool = False) -> str:
    """The instruction L1 (arXiv 2503.04697) appends to the problem: ``"Think for {n} tokens."``.

    During training ``n = n_gold ~ U(100, 4000)`` per prompt, stored in the ``target_length``
    column for the ``l1_exact`` / ``l1_max`` terms. ``max_budget=True`` gives the released data
    script's L1-Max wording ``"Think for maximum {n} tokens."`` (``scripts/data/
    deepscaler_dataset.py``, which writes the target as a negative number for that case).

    >>> l1_prompt_suffix(1024)
    'Think for 1024 tokens.'
    """
    target = _check_int(target, "target", None, minimum=1)
    return f"Think for maximum {target} tokens." if max_budget else f"Think for {target} tokens."


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
    n = _check_same_length(correct=correct, lengths=lengths, target_lengths=target_lengths)
    alpha = _check_number(alpha, "alpha", None, lo=0.0)
    lengths = _check_lengths(lengths)
    targets = _check_targets(target_lengths)
    return [_plus_zero((1.0 if correct[i] else 0.0) - alpha * abs(targets[i] - lengths[i])) for i in range(n)]


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
    n = _check_same_length(correct=correct, lengths=lengths, target_lengths=target_lengths)
    alpha = _check_number(alpha, "alpha", None, lo=0.0)
    delta = _check_number(delta, "delta", None)
    lengths = _check_lengths(lengths)
    targets = _check_targets(target_lengths)
    out = []
    for i in range(n):
        score = min(1.0, max(0.0, alpha * (targets[i] - lengths[i]) + delta))
        out.append(_plus_zero(score) if correct[i] else 0.0)
    return out


# ----------------------------------------------------------------------------------------------
# 5. TLMRE (Arora & Zanette) and GRPO-lambda
# ----------------------------------------------------------------------------------------------


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
    n = _check_same_length(correct=correct, lengths=lengths, group_ids=group_ids)
    alpha = _check_number(alpha, "alpha", None, lo=0.0, hi=1.0)
    lengths = _check_lengths(lengths)
    out = [0.0] * n
    for members in _groups(group_ids).values():
        right = [i for i in members if correct[i]]
        if not right:
            continue
        mean = sum(lengths[i] for i in right) / len(right)
        std = math.sqrt(sum((lengths[i] - mean) ** 2 for i in right) / len(right))  # population std
        for i in right:
            z = (lengths[i] - mean) / std if std > 0 else 0.0
            out[i] = 1.0 - alpha * _sigmoid(z)
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
    _check_same_length(correct=correct, group_ids=group_ids)
    top_lambda = _check_number(top_lambda, "top_lambda", None, lo=0.0, hi=1.0)
    members = _groups(group_ids)
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
    n = _check_same_length(correct=correct, lengths=lengths, group_ids=group_ids)
    selected = grpo_lambda_select_groups(correct, group_ids, top_lambda)
    alpha = _check_number(alpha, "alpha", None, lo=0.0, hi=1.0)
    shaped = tlmre_length_reward(correct, lengths, group_ids, alpha)
    return [shaped[i] if group_ids[i] in selected else (1.0 if correct[i] else 0.0) for i in range(n)]


# ----------------------------------------------------------------------------------------------
# 6. HAPO: history-aware length reward
# ----------------------------------------------------------------------------------------------

HAPO_CORRECT_FLOOR = -0.7  # keeps every correct answer (1 + r_len >= 0.3) above every wrong one


def hapo_length_reward(length: int, correct: bool, history_min: int | None, w: float = 1.0) -> float:
    r"""HAPO's length reward (arXiv 2505.11225; code ``HCY123902/HAPO``, ``utils.py::compute_len_reward``).

    ``h = history_min`` is the shortest correct response seen so far for this prompt (in earlier
    batches; see :class:`HapoHistory`). With ``L`` the response length::

        c     = cos((L / h) * pi / 2)   if L < 2h   else -1
        r_len = w * max(-0.7, c)        if correct
              = w * min(0, c)           otherwise

    and ``r_len = 0`` while there is no history (``h`` is ``None``; the code also treats
    ``h <= 0`` as no history). A correct answer shorter than the record earns up to ``w``; a wrong
    one is never rewarded for brevity. The total is ``1[correct] + r_len``; HAPO uses ``w = 1``.
    (The code's linear variant with a tolerance ratio, ``compute_len_reward_linear``, is not
    implemented.)

    >>> round(hapo_length_reward(150, True, 100), 4), round(hapo_length_reward(150, False, 100), 4)
    (-0.7, -0.7071)
    """
    length = _check_int(length, "length", None, minimum=0)
    w = _check_number(w, "w", None)
    if history_min is None:
        return 0.0
    h = _check_int(history_min, "history_min", None, minimum=0)
    if h == 0:
        return 0.0
    c = math.cos((length / h) * (math.pi / 2)) if length < 2 * h else -1.0
    r = max(HAPO_CORRECT_FLOOR, c) if correct else min(0.0, c)
    return _plus_zero(w * r)


class HapoHistory:
    """HAPO's per-prompt state ``h_q``: the minimum length of all correct responses seen so far,
    keyed by a prompt id string (arXiv 2505.11225; the code keeps a tensor indexed by prompt).

    Use: compute the batch's rewards with :func:`hapo_length_rewards` (which reads the history),
    **then** call :meth:`update` with the same batch, as HAPO updates ``h_q`` after each batch.
    :meth:`state_dict` is plain JSON (``{"version": 1, "min_correct_length": {uid: int}}``), so it
    can go into a checkpoint and back with :meth:`load_state_dict` on resume. Prompt ids must be
    strings: JSON object keys are strings, so an int id would not match after a restore.
    """

    VERSION = 1

    def __init__(self) -> None:
        self._min: dict[str, int] = {}

    def __len__(self) -> int:
        return len(self._min)

    def __contains__(self, uid: object) -> bool:
        return uid in self._min

    def __repr__(self) -> str:
        return f"HapoHistory({len(self._min)} prompts)"

    @staticmethod
    def _check_uid(uid: Any) -> str:
        if not isinstance(uid, str):
            raise ValueError(f"HAPO prompt ids must be strings (they are JSON keys in checkpoints), got {uid!r}")
        return uid

    def get(self, uid: str) -> int | None:
        """The shortest correct length seen for prompt ``uid``, or ``None`` if none yet."""
        return self._min.get(self._check_uid(uid))

    def update(self, uids: Sequence[str], lengths: Sequence[int], correct: Sequence[bool]) -> None:
        """Fold one batch in: ``h[uid] = min(h[uid], L)`` over its correct responses."""
        _check_same_length(uids=uids, lengths=lengths, correct=correct)
        lengths = _check_lengths(lengths)
        for uid, length, ok in zip(uids, lengths, correct):
            uid = self._check_uid(uid)
            if ok:
                old = self._min.get(uid)
                self._min[uid] = length if old is None else min(old, length)

    def state_dict(self) -> dict[str, Any]:
        return {"version": self.VERSION, "min_correct_length": dict(sorted(self._min.items()))}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Replace the history with a :meth:`state_dict` (e.g. read back from a checkpoint's JSON)."""
        if not isinstance(state, Mapping) or state.get("version") != self.VERSION:
            raise ValueError(
                f"not a HapoHistory state (expected {{'version': {self.VERSION}, 'min_correct_length': {{...}}}}), "
                f"got {state!r:.200}"
            )
        table = state.get("min_correct_length")
        if not isinstance(table, Mapping):
            raise ValueError("HapoHistory state: 'min_correct_length' must be a mapping {prompt id: int}")
        loaded = {}
        for uid, length in table.items():
            loaded[self._check_uid(uid)] = _check_int(length, f"min_correct_length[{uid!r}]", None, minimum=0)
        self._min = loaded


def hapo_length_rewards(
    uids: Sequence[str], lengths: Sequence[int], correct: Sequence[bool], history: HapoHistory, w: float = 1.0
) -> list[float]:
    """:func:`hapo_length_reward` for a batch, reading (not updating) ``history``; call
    ``history.update(uids, lengths, correct)`` afterwards."""
    _check_same_length(uids=uids, lengths=lengths, correct=correct)
    return [hapo_length_reward(L, bool(c), history.get(u), w) for u, L, c in zip(uids, lengths, correct)]


# ----------------------------------------------------------------------------------------------
# 7. HBPO budget-aware reward
# ----------------------------------------------------------------------------------------------

HBPO_CODE_PI = 3.1416  # the released reward hard-codes PI_APPROX = 3.1416
# The released rollout prefills "<think> I will answer the question with {b} tokens" (paper text:
# "within"); the released reward recovers b with this regex.
HBPO_BUDGET_RE = re.compile(r"<think> I will answer the question with (\d+) tokens")


def _validate_hbpo(alpha: Any, beta: Any, l_max: Any) -> tuple[float, float, int]:
    alpha = _check_number(alpha, "alpha", None, lo=0.0)
    beta = _check_number(beta, "beta", None)
    l_max = _check_int(l_max, "l_max", None, minimum=1)
    return alpha, beta, l_max


def hbpo_f2(b: float, beta: float = 4.0, l_max: int = 4096, *, pi: float = math.pi) -> float:
    r"""HBPO's in-budget reward ``f2(b) = beta cos(pi b / (2 L_max))`` (arXiv 2507.15844, Eq. 3).

    Constants from the released code: ``beta = 4``, ``L_max = 4096``. Values: b = 512 -> 3.923,
    1024 -> 3.696, 2048 -> 2.828, 2560 -> 2.222.

    >>> round(hbpo_f2(512), 3)
    3.923
    """
    _, beta, l_max = _validate_hbpo(0.0, beta, l_max)
    b = _check_number(b, "b", None, lo=0.0)
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
    n = _check_number(n, "n", None, lo=0.0)
    b = _check_number(b, "b", None, lo=0.0)
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
    n = _check_int(n, "n", None, minimum=0)
    if b is not None:
        b = _check_int(b, "b", None, minimum=1)
    if variant == "paper":
        if b is None:
            raise ValueError(
                "hbpo_reward(variant='paper') needs the budget b (Eq. 1 is defined per budget); "
                "use variant='code' for the released code's no-budget reward round(4 cos(pi n / 8192), 2)"
            )
        if not correct or n > l_max:
            return 0.0
        return hbpo_f2(b, beta, l_max) if n <= b else hbpo_f1(n, b, alpha, beta, l_max)
    format_error_reward = _check_number(format_error_reward, "format_error_reward", None)
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


# ----------------------------------------------------------------------------------------------
# 8. DA-DLER difficulty-aware truncation
# ----------------------------------------------------------------------------------------------


def _check_tiers(tiers: Any) -> list[tuple[float, int]]:
    if isinstance(tiers, (str, bytes)) or not isinstance(tiers, Iterable):
        raise ValueError(f"tiers must be a list of [threshold, length] pairs, e.g. [[0.5, 2000]], got {tiers!r}")
    out = []
    for tier in tiers:
        if isinstance(tier, (str, bytes)) or not isinstance(tier, Iterable) or len(list(tier)) != 2:
            raise ValueError(f"tiers must be a list of [threshold, length] pairs, e.g. [[0.5, 2000]], got {tier!r}")
        threshold, length = list(tier)
        threshold = _check_number(threshold, "tiers threshold", None, lo=0.0, hi=1.0, hint=" (a correctness ratio)")
        length = _check_int(length, "tiers length", None, minimum=1)
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
    :func:`apply_truncation` or cut the rollouts and re-score.

    >>> difficulty_aware_truncation_lengths([1, 1, 0, 0, 1, 0, 0, 0], [0, 0, 0, 0, 1, 1, 1, 1])
    [2000, 2000, 2000, 2000, 4000, 4000, 4000, 4000]
    """
    n = _check_same_length(correct=correct, group_ids=group_ids)
    tiers = _check_tiers(tiers)
    default_length = _check_int(default_length, "default_length", None, minimum=1)
    out = [default_length] * n
    for members in _groups(group_ids).values():
        hits = sum(1 for i in members if correct[i])
        limit = default_length
        for threshold, length in tiers:  # ascending: the last threshold reached wins
            if hits >= threshold * len(members) - 1e-9:
                limit = length
        for i in members:
            out[i] = limit
    return out


def apply_truncation(
    correct_or_rewards: Sequence[float], lengths: Sequence[int], limits: Sequence[int]
) -> list[float]:
    """Zero the value (correctness or reward) of every response longer than its limit
    (``lengths[i] > limits[i]``), as DA-DLER's "truncated responses score 0" (reference §2.6:
    roll out at the long limit, then zero easy-prompt responses longer than the short one).
    A response of exactly ``limits[i]`` tokens is kept.

    >>> apply_truncation([1, 1, 0, 1], [1500, 2500, 2500, 4000], [2000, 2000, 4000, 4000])
    [1.0, 0.0, 0.0, 1.0]
    """
    _check_same_length(correct_or_rewards=correct_or_rewards, lengths=lengths, limits=limits)
    lengths = _check_lengths(lengths)
    limits = _check_lengths(limits, "limits")
    return [float(v) if length <= limit else 0.0 for v, length, limit in zip(correct_or_rewards, lengths, limits)]


# ----------------------------------------------------------------------------------------------
# 9. PALU budget update
# ----------------------------------------------------------------------------------------------


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
    l_max = _check_int(l_max, "l_max", None, minimum=1)
    budget = _check_int(budget, "budget", None, minimum=1)
    if budget > l_max:
        raise ValueError(f"budget must be <= l_max={l_max}, got {budget}")
    pass_rate = _check_number(pass_rate, "pass_rate", None, lo=0.0, hi=1.0)
    C = _check_number(C, "C", None, lo=0.0, hi=1.0)
    tau = _check_number(tau, "tau", None, lo=0.0, hi=1.0)
    min_budget = _check_int(min_budget, "min_budget", None, minimum=1)
    if min_budget > l_max:
        raise ValueError(f"min_budget must be <= l_max={l_max}, got {min_budget}")
    lengths = sorted(_check_lengths(correct_lengths, "correct_lengths"))
    if not lengths or pass_rate < C:
        return l_max
    gap = _quantile(lengths, 1.0) - _quantile(lengths, 1.0 - tau)  # >= 0
    return max(min_budget, budget - math.floor(round(gap, 6)))


# ----------------------------------------------------------------------------------------------
# Registered reward terms
# ----------------------------------------------------------------------------------------------


def _kwargs_key(name: str) -> str:
    return f"reward.terms.{name}.kwargs"


def _batch_lengths(batch: RewardBatch) -> list[int]:
    return [len(ids) for ids in batch.completion_ids]


def _batch_truncated(batch: RewardBatch) -> list[bool]:
    return [reason == FINISH_LENGTH for reason in batch.finish_reasons]


@REWARD_TERMS.register("dapo_overlong")
def dapo_overlong(
    batch: RewardBatch, max_len: int | None = None, cache_len: int | None = None, factor: float = 1.0
) -> list[float]:
    """DAPO's soft overlong punishment (:func:`dapo_overlong_penalty`), **added** to correctness.

    ``max_len`` should be the rollout's ``rollout.max_response_length`` (DAPO: 20480) and
    ``cache_len`` the buffer (DAPO: 4096); both are required.
    """
    where = _kwargs_key("dapo_overlong")
    for key, value in (("max_len", max_len), ("cache_len", cache_len)):
        if value is None:
            raise ConfigError(
                f"{where}.{key} must be set: max_len = rollout.max_response_length (DAPO: 20480), "
                f"cache_len = the soft-penalty buffer inside it (DAPO: 4096)"
            )
    max_len, cache_len, factor = _validate_dapo(max_len, cache_len, factor, where)
    return dapo_overlong_penalty(_batch_lengths(batch), max_len, cache_len, factor)


@REWARD_TERMS.register("kimi_length")
def kimi_length(batch: RewardBatch) -> list[float]:
    """Kimi k1.5's group length reward (:func:`kimi_length_reward`), **added** to correctness
    (Kimi's weight is not published; set it with ``reward.terms.kimi_length.weight``)."""
    return kimi_length_reward(_batch_lengths(batch), batch.correct, batch.group_ids)


@REWARD_TERMS.register("cosine")
def cosine(
    batch: RewardBatch,
    max_len: int | None = None,
    r0_correct: float = 2.0,
    rL_correct: float = 1.0,
    r0_wrong: float = -10.0,
    rL_wrong: float = 0.0,
    r_exceed: float = -10.0,
    exceed_margin: int = 0,
) -> list[float]:
    """Yeo et al.'s cosine reward (:func:`cosine_length_reward`). It **replaces** correctness: use
    it with ``reward.terms.correctness.weight=0``. ``max_len`` (required) is the ``L_max`` of the
    cosine, normally ``rollout.max_response_length``; a response cut at the length limit
    (finish reason ``length``) gets ``r_exceed``."""
    where = _kwargs_key("cosine")
    if max_len is None:
        raise ConfigError(f"{where}.max_len must be set (the cosine's L_max, normally rollout.max_response_length)")
    constants = dict(r0_correct=r0_correct, rL_correct=rL_correct, r0_wrong=r0_wrong, rL_wrong=rL_wrong,
                     r_exceed=r_exceed)
    max_len, c, exceed_margin = _validate_cosine(max_len, constants, exceed_margin, where)
    return cosine_length_reward(
        _batch_lengths(batch), batch.correct, _batch_truncated(batch), max_len, **c, exceed_margin=exceed_margin
    )


TARGET_COLUMN = "target_length"


def _batch_targets(batch: RewardBatch, name: str) -> list[int]:
    if TARGET_COLUMN not in batch.columns:
        raise ConfigError(
            f"reward.terms.{name} needs the per-prompt token target n_gold in a dataset column "
            f"{TARGET_COLUMN!r}, but the training data has none (columns: {sorted(batch.columns) or 'none'}); "
            f"fix: give every row of data.path a {TARGET_COLUMN!r} field (L1 samples it from U(100, 4000)) and "
            f"end its question with rlspec.rewards.length.l1_prompt_suffix({TARGET_COLUMN})"
        )
    try:
        return _check_targets(batch.columns[TARGET_COLUMN], name=f"column {TARGET_COLUMN!r} row")
    except ValueError as err:
        raise ConfigError(f"reward.terms.{name}: {err}; fix the {TARGET_COLUMN!r} column of data.path") from None


@REWARD_TERMS.register("l1_exact")
def l1_exact(batch: RewardBatch, alpha: float = 0.0003) -> list[float]:
    """L1-Exact (:func:`l1_exact_reward`) with ``n_gold`` from the ``target_length`` column. It
    **replaces** correctness: use it with ``reward.terms.correctness.weight=0``."""
    alpha = _check_number(alpha, "alpha", _kwargs_key("l1_exact"), lo=0.0, hint=" (L1: 0.0003)")
    return l1_exact_reward(batch.correct, _batch_lengths(batch), _batch_targets(batch, "l1_exact"), alpha)


@REWARD_TERMS.register("l1_max")
def l1_max(batch: RewardBatch, alpha: float = 0.0003, delta: float = 0.5) -> list[float]:
    """L1-Max (:func:`l1_max_reward`) with ``n_gold`` from the ``target_length`` column. It
    **replaces** correctness: use it with ``reward.terms.correctness.weight=0``."""
    where = _kwargs_key("l1_max")
    alpha = _check_number(alpha, "alpha", where, lo=0.0, hint=" (L1: 0.0003)")
    delta = _check_number(delta, "delta", where, hint=" (L1: 0.5)")
    return l1_max_reward(batch.correct, _batch_lengths(batch), _batch_targets(batch, "l1_max"), alpha, delta)


@REWARD_TERMS.register("tlmre_length")
def tlmre_length(batch: RewardBatch, alpha: float | None = None) -> list[float]:
    """Arora & Zanette's reward (:func:`tlmre_length_reward`). It **replaces** correctness: use it
    with ``reward.terms.correctness.weight=0``. ``alpha`` (required, in [0, 1]) sets how much
    length costs; 0 is the plain 0/1 reward."""
    where = _kwargs_key("tlmre_length")
    if alpha is None:
        raise ConfigError(
            f"{where}.alpha must be set: a number in [0, 1] (0 = no length penalty; GRPO-lambda uses 0.6)"
        )
    alpha = _check_number(alpha, "alpha", where, lo=0.0, hi=1.0)
    return tlmre_length_reward(batch.correct, _batch_lengths(batch), batch.group_ids, alpha)


@REWARD_TERMS.register("grpo_lambda")
def grpo_lambda(batch: RewardBatch, top_lambda: float = 0.2, alpha: float = 0.6) -> list[float]:
    """GRPO-lambda (:func:`grpo_lambda_reward`): the length-penalised reward on the top
    ``top_lambda`` fraction of the batch's groups by accuracy, plain 0/1 on the others. It
    **replaces** correctness (it already contains the 0/1 reward): a GRPO-lambda recipe sets
    ``reward.terms.correctness.weight=0`` and ``reward.terms.grpo_lambda.weight=1``. Groups are
    ranked within each scored batch (one dynamic-sampling chunk at a time)."""
    where = _kwargs_key("grpo_lambda")
    top_lambda = _check_number(top_lambda, "top_lambda", where, lo=0.0, hi=1.0, hint=" (GRPO-lambda: 0.2)")
    alpha = _check_number(alpha, "alpha", where, lo=0.0, hi=1.0, hint=" (GRPO-lambda: 0.6)")
    return grpo_lambda_reward(batch.correct, _batch_lengths(batch), batch.group_ids, top_lambda, alpha)
