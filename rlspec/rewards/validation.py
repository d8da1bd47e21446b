"""Shared argument checks and small helpers of the length-reward modules.

``where=None`` -> ValueError naming the argument (pure functions); ``where="reward.terms.<name>.kwargs"``
-> ConfigError naming the config key (registered terms). In every term the length of completion
``i`` is ``len(batch.completion_ids[i])`` (generated tokens, as the rollout engine reports them)
and it is *truncated* when ``batch.finish_reasons[i] == "length"``.
"""

from __future__ import annotations

import math
import numbers
from collections import defaultdict
from typing import Any, Hashable, Sequence

from rlspec.errors import ConfigError
from rlspec.rewards.terms import RewardBatch
from rlspec.rollout.base import FINISH_LENGTH


# ----------------------------------------------------------------------------------------------


def error(where: str | None, key: str, message: str) -> Exception:
    if where is None:
        return ValueError(f"{key} {message}")
    return ConfigError(f"{where}.{key} {message}")


def is_int(value: Any) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def check_int(value: Any, key: str, where: str | None, *, minimum: int, hint: str = "") -> int:
    if not is_int(value) or value < minimum:
        raise error(where, key, f"must be an int >= {minimum}{hint}, got {value!r}")
    return int(value)


def check_number(
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
        raise error(where, key, f"must be {bounds}{hint}, got {value!r}")
    return float(value)


def check_same_length(**sequences: Sequence[Any]) -> int:
    sizes = {name: len(values) for name, values in sequences.items()}
    if len(set(sizes.values())) > 1:
        listing = ", ".join(f"{name}={size}" for name, size in sizes.items())
        raise ValueError(f"per-completion inputs must have one entry per completion; got lengths {listing}")
    return next(iter(sizes.values()), 0)


def check_lengths(lengths: Sequence[Any], name: str = "lengths") -> list[int]:
    out = []
    for i, value in enumerate(lengths):
        if not is_int(value) or value < 0:
            raise ValueError(f"{name}[{i}] must be a non-negative int (a token count), got {value!r}")
        out.append(int(value))
    return out


def groups(group_ids: Sequence[Hashable]) -> dict[Hashable, list[int]]:
    """``{group id: [indices of its completions]}`` in first-seen order."""
    members: dict[Hashable, list[int]] = defaultdict(list)
    for i, g in enumerate(group_ids):
        members[g].append(i)
    return members


def sigmoid(x: float) -> float:
    if x >= 0:
        return 1.0 / (1.0 + math.exp(-x))
    e = math.exp(x)
    return e / (1.0 + e)


def plus_zero(x: float) -> float:
    """``x`` with ``-0.0`` turned into ``0.0`` (so logged rewards never show ``-0.0``)."""
    return x + 0.0


def kwargs_key(name: str) -> str:
    return f"reward.terms.{name}.kwargs"


def batch_lengths(batch: RewardBatch) -> list[int]:
    return [len(ids) for ids in batch.completion_ids]


def batch_truncated(batch: RewardBatch) -> list[bool]:
    return [reason == FINISH_LENGTH for reason in batch.finish_reasons]
