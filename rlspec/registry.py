"""One small registry per extension point (rewards, advantage estimators, schedules, engines).

A registry is a name -> callable dict filled by a decorator that rejects duplicates. Unknown names
raise a :class:`~rlspec.errors.ConfigError` that lists the valid names (and the closest match).
"""

from __future__ import annotations

import difflib
from typing import Callable, Generic, Iterator, TypeVar

from rlspec.errors import ConfigError

T = TypeVar("T")


class Registry(Generic[T]):
    def __init__(self, kind: str, config_key: str) -> None:
        self.kind = kind  # e.g. "reward term"
        self.config_key = config_key  # e.g. "reward.terms" (used in error messages)
        self._items: dict[str, T] = {}

    def register(self, name: str) -> Callable[[T], T]:
        def decorator(obj: T) -> T:
            if name in self._items:
                raise ValueError(f"{self.kind} {name!r} is already registered")
            self._items[name] = obj
            return obj

        return decorator

    def get(self, name: str) -> T:
        if name not in self._items:
            close = difflib.get_close_matches(name, self._items, n=1)
            hint = f" Did you mean {close[0]!r}?" if close else ""
            raise ConfigError(
                f"unknown {self.kind} {name!r} in {self.config_key}.{hint} "
                f"Valid names: {', '.join(sorted(self._items))}."
            )
        return self._items[name]

    def names(self) -> list[str]:
        return sorted(self._items)

    def __contains__(self, name: object) -> bool:
        return name in self._items

    def __iter__(self) -> Iterator[str]:
        return iter(sorted(self._items))
