"""Typed ``key=value`` argument parsing shared by the ``python -m rlspec.eval`` and
``python -m rlspec.export`` commands: a bad value raises ConfigError naming the key."""

from __future__ import annotations

import math

from rlspec.errors import ConfigError


def parse_int(key: str, value: str, minimum: int) -> int:
    try:
        number = int(value)
    except ValueError:
        raise ConfigError(f"{key} must be an integer, got {value!r}") from None
    if number < minimum:
        raise ConfigError(f"{key} must be >= {minimum}, got {number}")
    return number


def parse_float(key: str, value: str) -> float:
    try:
        number = float(value)
    except ValueError:
        raise ConfigError(f"{key} must be a number, got {value!r}") from None
    if not math.isfinite(number):
        raise ConfigError(f"{key} must be a finite number, got {value!r}")
    return number


def parse_bool(key: str, value: str) -> bool:
    flag = value.strip().lower()
    if flag not in ("true", "false", "1", "0", "yes", "no"):
        raise ConfigError(f"{key} must be true or false, got {value!r}")
    return flag in ("true", "1", "yes")
