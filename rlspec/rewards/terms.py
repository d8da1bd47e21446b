r"""Reward terms and their weighted sum.

A reward term is a registered function ``fn(batch: RewardBatch, **kwargs) -> list[float]`` that
gives one value per completion. The total reward is ``sum_k weight_k * term_k``; the config is

.. code-block:: yaml

    reward:
      terms:
        correctness: {weight: 1.0, kwargs: {}}
        dler_truncation: {weight: 1.0, kwargs: {penalty_coef: 0.0}}

Correctness is graded once per batch (:func:`rlspec.rewards.grader.grade_batch`) and shared by
all terms through :attr:`RewardBatch.correct`. :func:`rlspec.rewards.build_reward_terms` turns the
``reward`` config (terms plus the optional ``reward.custom`` function) into the ``terms`` mapping.
"""

from __future__ import annotations

import dataclasses
import inspect
import math
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping

from rlspec.errors import ConfigError
from rlspec.registry import REWARD_TERMS
from rlspec.rewards.grader import extract_final_answer, grade_batch
from rlspec.rollout.base import FINISH_STOP

RewardTerm = Callable[..., list[float]]


@dataclass
class RewardBatch:
    """Everything a reward term may look at, one entry per completion (``B`` of them)."""

    prompts: list[str]
    completions: list[str]
    completion_ids: list[list[int]]
    finish_reasons: list[str]  # FINISH_STOP | FINISH_LENGTH (rlspec.rollout.base)
    answers: list[str]  # gold answers
    correct: list[bool]  # from grade(), once per batch; [] = not graded yet (compute_rewards grades)
    group_ids: list[int]  # which prompt-group each completion belongs to
    step: int = 0
    columns: dict[str, list] = field(default_factory=dict)  # other dataset columns (e.g. "level")
    # run-long state of stateful terms (HAPO's per-prompt history), one entry per term name; the
    # trainer keeps it across steps and saves it in checkpoints, so it must stay JSON-like
    state: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        n = len(self.completions)
        per_completion = {
            "prompts": self.prompts,
            "completion_ids": self.completion_ids,
            "finish_reasons": self.finish_reasons,
            "answers": self.answers,
            **({"correct": self.correct} if self.correct else {}),
            "group_ids": self.group_ids,
            **{f"columns[{name!r}]": values for name, values in self.columns.items()},
        }
        for name, values in per_completion.items():
            if len(values) != n:
                raise ValueError(f"RewardBatch.{name} has {len(values)} entries for {n} completions")

    def __len__(self) -> int:
        return len(self.completions)

    def prompt_uids(self) -> list[str]:
        """A stable id of each completion's prompt (keys of run-long per-prompt state such as
        HAPO's history or PALU's budgets): the dataset's ``uid`` column, else the question text."""
        uid_col = self.columns.get("uid")
        if uid_col is not None and None not in uid_col:
            return [str(u) for u in uid_col]
        return list(self.prompts)


# ----------------------------------------------------------------------------------------------
# Built-in terms
# ----------------------------------------------------------------------------------------------


@REWARD_TERMS.register("correctness")
def correctness(batch: RewardBatch, correct_reward: float = 1.0, incorrect_reward: float = 0.0) -> list[float]:
    """``correct_reward`` when the final answer matches the gold answer (``batch.correct``), else
    ``incorrect_reward``: 1 / 0 by default (DeepScaleR, DLER), 1 / -1 for DAPO's rule-based reward
    (arXiv 2503.14476 Eq. 1; verl's ``math_dapo``), which also sets how much DAPO's overlong
    penalty weighs against a wrong answer."""
    for key, value in (("correct_reward", correct_reward), ("incorrect_reward", incorrect_reward)):
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            raise ConfigError(f"reward.terms.correctness.kwargs.{key} must be a finite number, got {value!r}")
    return [float(correct_reward) if c else float(incorrect_reward) for c in batch.correct]


@REWARD_TERMS.register("format")
def format_reward(batch: RewardBatch) -> list[float]:
    r"""1.0 for a well-formed response, else 0.0. Exactly three things are checked:

    1. the response stopped by itself (``finish_reason == "stop"``, not cut at the length limit);
    2. it contains ``</think>`` (the opening ``<think>`` is part of the prompt, so it is not
       required);
    3. the text after the last ``</think>`` has a final answer box that
       :func:`~rlspec.rewards.grader.extract_final_answer` accepts: the last ``\boxed{...}``
       (or ``\fbox{...}`` / ``\boxed x``) is brace-balanced and non-empty.

    Correctness, text after the box and repeated ``</think>`` tags are not checked.

    >>> b = RewardBatch(prompts=["q"] * 3, completions=["a</think>\\boxed{1}", "a\\boxed{1}",
    ...     "a</think>\\boxed{1}"], completion_ids=[[1]] * 3, finish_reasons=["stop", "stop", "length"],
    ...     answers=["1"] * 3, correct=[True] * 3, group_ids=[0] * 3)
    >>> format_reward(b)
    [1.0, 0.0, 0.0]
    """
    return [
        1.0
        if reason == FINISH_STOP and extract_final_answer(text, require_think_close=True) is not None
        else 0.0
        for text, reason in zip(batch.completions, batch.finish_reasons)
    ]


# ----------------------------------------------------------------------------------------------
# Weighted sum
# ----------------------------------------------------------------------------------------------


def _term_spec(name: str, spec: Any) -> tuple[float, dict[str, Any]]:
    """``(weight, kwargs)`` from ``{"weight": w, "kwargs": {...}}``, an object with those fields
    (``rlspec.config.RewardTermConfig``), a bare weight, or ``None`` (weight 1, no kwargs)."""
    if spec is None:
        weight, kwargs = 1.0, {}
    elif isinstance(spec, (int, float)):
        weight, kwargs = spec, {}
    elif isinstance(spec, Mapping):
        unknown = sorted(set(spec) - {"weight", "kwargs"})
        if unknown:
            raise ConfigError(f"reward.terms.{name} has unknown key(s) {unknown}; valid keys: weight, kwargs")
        weight, kwargs = spec.get("weight", 1.0), spec.get("kwargs") or {}
    elif hasattr(spec, "weight"):
        weight, kwargs = spec.weight, getattr(spec, "kwargs", None) or {}
    else:
        raise ConfigError(f"reward.terms.{name} must be {{weight: <float>, kwargs: {{...}}}}, got {spec!r}")
    try:
        weight = float(weight)
    except (TypeError, ValueError):
        weight = math.nan
    if not math.isfinite(weight):
        raise ConfigError(f"reward.terms.{name}.weight must be a finite number, got {spec!r}")
    if not isinstance(kwargs, Mapping):
        raise ConfigError(f"reward.terms.{name}.kwargs must be a mapping of keyword arguments, got {kwargs!r}")
    return weight, dict(kwargs)


def check_term_kwargs(name: str, fn: RewardTerm, kwargs: Mapping[str, Any]) -> None:
    """Raise a :class:`ConfigError` unless ``fn(batch, **kwargs)`` fits the term's signature."""
    try:
        inspect.signature(fn).bind(None, **kwargs)
    except TypeError as err:
        params = [p for p in inspect.signature(fn).parameters][1:]
        raise ConfigError(
            f"reward.terms.{name}.kwargs {sorted(kwargs)} do not fit the term ({err}); "
            f"it accepts: {', '.join(params) or 'no kwargs'}"
        ) from None


def _call_term(name: str, fn: RewardTerm, batch: RewardBatch, kwargs: dict[str, Any]) -> list[float]:
    check_term_kwargs(name, fn, kwargs)
    values = fn(batch, **kwargs)
    if isinstance(values, (str, bytes, Mapping)) or not hasattr(values, "__len__"):
        got = f"a {type(values).__name__}"
    elif len(values) != len(batch):
        got = f"{len(values)} values"
    else:
        got = None
    if got is not None:
        raise ConfigError(
            f"reward term {name!r} returned {got} for {len(batch)} completions; "
            f"a term must return a list with one float per completion"
        )
    out = []
    for i, value in enumerate(values):
        try:
            value = float(value)
        except (TypeError, ValueError):
            raise ConfigError(
                f"reward term {name!r} returned {value!r} for completion {i}; a term must return floats"
            ) from None
        if not math.isfinite(value):
            raise ConfigError(
                f"reward term {name!r} returned {value} for completion {i}; "
                f"fix the term (reward.terms.{name}) so it returns finite floats"
            )
        out.append(value)
    return out


def score_batch(
    batch: RewardBatch, terms: Mapping[str, Any]
) -> tuple[list[float], dict[str, list[float]]]:
    """Weighted sum of ``terms`` on a graded ``batch``.

    Returns ``(totals, raw)``: ``totals[i] = sum_k weight_k * raw[k][i]`` and ``raw`` maps each
    term name to its unweighted values (for logging).
    """
    if len(batch.correct) != len(batch):
        raise ValueError("score_batch needs a graded batch (batch.correct is empty); use compute_rewards")
    if not terms:
        raise ConfigError("no reward terms configured; choose reward=correctness or set reward.terms.<name>.weight")
    totals = [0.0] * len(batch)
    raw: dict[str, list[float]] = {}
    for name, spec in terms.items():
        weight, kwargs = _term_spec(name, spec)
        values = _call_term(name, REWARD_TERMS.get(name), batch, kwargs)
        raw[name] = values
        totals = [t + weight * v for t, v in zip(totals, values)]
    return totals, raw


def compute_rewards(
    batch: RewardBatch,
    terms: Mapping[str, Any],
    *,
    require_think_close: bool = False,
    timeout_s: float = 5.0,
    last_number_fallback: bool = False,
) -> tuple[list[float], dict[str, list[float]], list[bool]]:
    """Grade ``batch`` once, then return the weighted sum of the reward ``terms``.

    Args:
        batch: the completions to score. Leave ``batch.correct`` empty to grade here with
            :func:`grade_batch`; fill it to reuse a verdict computed elsewhere.
        terms: ``{name: {"weight": w, "kwargs": {...}}}`` (see :func:`build_reward_terms`);
            names are looked up in :data:`REWARD_TERMS`.
        require_think_close, timeout_s, last_number_fallback: passed to the grader
            (``reward.require_think_close``, ``reward.grader_timeout_s``, ``reward.last_number_fallback``).

    Returns:
        ``(totals, raw, correct)``: the total reward per completion, each term's unweighted
        values (for logging), and the correctness verdicts (for accuracy metrics and dynamic
        sampling with ``filter_groups.metric=acc``).

    Raises:
        ConfigError: an unknown term, bad kwargs, or a term returning NaN/inf (named in the
            message).
    """
    if len(batch.correct) != len(batch):
        correct = grade_batch(
            batch.completions, batch.answers, require_think_close=require_think_close, timeout_s=timeout_s,
            last_number_fallback=last_number_fallback,
        )
        batch = dataclasses.replace(batch, correct=correct)
    totals, raw = score_batch(batch, terms)
    return totals, raw, list(batch.correct)
