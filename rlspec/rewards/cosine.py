"""The cosine length-scaling reward of Yeo et al. (arXiv 2502.03373, Eq. 1); it replaces the correctness reward."""

from __future__ import annotations

import math
from typing import Any, Mapping, Sequence

from rlspec.errors import ConfigError
from rlspec.registry import REWARD_TERMS
from rlspec.rewards.terms import RewardBatch
from rlspec.rewards.validation import batch_lengths, batch_truncated, check_int, check_lengths, check_number, check_same_length, kwargs_key, plus_zero


COSINE_CODE_MARGIN = 16  # demystify-long-cot: openrlhf/reward/common.py MAX_LEN_MARGIN


def _validate_cosine(
    max_len: Any, constants: Mapping[str, Any], exceed_margin: Any, where: str | None
) -> tuple[int, dict[str, float], int]:
    max_len = check_int(max_len, "max_len", where, minimum=1, hint=" (L_max: the rollout's max response length)")
    values = {key: check_number(value, key, where) for key, value in constants.items()}
    exceed_margin = check_int(exceed_margin, "exceed_margin", where, minimum=0,
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

    Constants. The defaults are the released run script's for the paper's cosine experiments
    (``section_4.2__active_scaling_of_cot_length__cosine_repetition_penalty.sh``:
    ``min_value_correct=1, max_value_correct=2, min_value_wrong=-10, max_value_wrong=0,
    math_rule_common_exceed_length=-10``); docs/decisions.md says how far they are confirmed. That
    script also adds an n-gram repetition penalty (``-0.05``, n=40) to wrong answers, which is not
    part of this function.

    >>> [round(r, 4) for r in cosine_length_reward([0, 50, 50, 0, 30], [True, True, False, False, True],
    ...                                            [False, False, False, False, True], max_len=100)]
    [2.0, 1.5, -5.0, -10.0, -10.0]
    """
    n = check_same_length(lengths=lengths, correct=correct, truncated=truncated)
    constants = dict(r0_correct=r0_correct, rL_correct=rL_correct, r0_wrong=r0_wrong, rL_wrong=rL_wrong,
                     r_exceed=r_exceed)
    max_len, c, exceed_margin = _validate_cosine(max_len, constants, exceed_margin, None)
    lengths = check_lengths(lengths)
    out = []
    for i in range(n):
        length = lengths[i]
        if truncated[i] or length + exceed_margin >= max_len:
            out.append(c["r_exceed"])
            continue
        r0, rL = (c["r0_correct"], c["rL_correct"]) if correct[i] else (c["r0_wrong"], c["rL_wrong"])
        out.append(plus_zero(rL + 0.5 * (r0 - rL) * (1.0 + math.cos(length * math.pi / max_len))))
    return out


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
    where = kwargs_key("cosine")
    if max_len is None:
        raise ConfigError(f"{where}.max_len must be set (the cosine's L_max, normally rollout.max_response_length)")
    constants = dict(r0_correct=r0_correct, rL_correct=rL_correct, r0_wrong=r0_wrong, rL_wrong=rL_wrong,
                     r_exceed=r_exceed)
    max_len, c, exceed_margin = _validate_cosine(max_len, constants, exceed_margin, where)
    return cosine_length_reward(
        batch_lengths(batch), batch.correct, batch_truncated(batch), max_len, **c, exceed_margin=exceed_margin
    )
