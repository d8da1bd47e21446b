"""The registries of rlspec's extension points, declared in one place.

A :class:`Registry` is a name -> object dict filled by a decorator that rejects duplicates;
unknown names raise a :class:`~rlspec.errors.ConfigError` that lists the valid names (and the
closest match). Each registry names the module that registers its built-in entries (its
``home``): asking a registry for a name or its names imports that module first. So the config
(:mod:`rlspec.config`) checks a name without importing any implementation, and an implementation
module imports only this one to register itself.
"""

from __future__ import annotations

import difflib
import importlib
from typing import Any, Callable, Iterator

from rlspec.errors import ConfigError


class Registry:
    def __init__(self, kind: str, config_key: str, home: str | None = None) -> None:
        self.kind = kind  # e.g. "reward term"
        self.config_key = config_key  # e.g. "reward.terms" (used in error messages)
        self.home = home  # the module that registers the built-in entries
        self._items: dict[str, Any] = {}
        self._groups: dict[str, str | None] = {}

    def _load(self) -> None:
        if self.home is not None:
            importlib.import_module(self.home)

    def register(self, name: str, group: str | None = None) -> Callable[[Any], Any]:
        """Decorator: register ``obj`` as ``name`` (in ``group``, when entries come in kinds)."""

        def decorator(obj: Any) -> Any:
            if name in self._items:
                raise ValueError(f"{self.kind} {name!r} is already registered")
            self._items[name] = obj
            self._groups[name] = group
            return obj

        return decorator

    def get(self, name: str) -> Any:
        if name not in self._items:
            self._load()
        if name not in self._items:
            close = difflib.get_close_matches(name, self._items, n=1)
            hint = f" Did you mean {close[0]!r}?" if close else ""
            raise ConfigError(
                f"unknown {self.kind} {name!r} in {self.config_key}.{hint} "
                f"Valid names: {', '.join(sorted(self._items))}."
            )
        return self._items[name]

    def names(self, group: str | None = None) -> list[str]:
        """Registered names (of ``group`` only, when given), sorted."""
        self._load()
        return sorted(n for n in self._items if group is None or self._groups[n] == group)

    def __contains__(self, name: object) -> bool:
        self._load()
        return name in self._items

    def __iter__(self) -> Iterator[str]:
        return iter(self.names())


REWARD_TERMS = Registry("reward term", "reward.terms", "rlspec.rewards")
ADVANTAGE_ESTIMATORS = Registry("advantage estimator", "trainer.adv_estimator", "rlspec.trainers.advantages")
LENGTH_SCHEDULES = Registry("length schedule", "rollout.length_schedule.name", "rlspec.trainers.schedules")
ROLLOUT_HOOKS = Registry("rollout hook", "rollout.budget.name / rollout.truncation.name", "rlspec.trainers.hooks")
ENGINES = Registry("rollout engine", "rollout.backend", "rlspec.rollout.engines")
BANDIT_POLICIES = Registry("bandit policy", "rollout.speculative.bandit.policy", "rlspec.rollout.speculative.bandit")
BENCHMARKS = Registry("benchmark", "eval.benchmarks", "rlspec.evals.benchmarks")
# config section -> a check that needs its implementation's knowledge (called by the section's
# __post_init__, so a bad value fails when the config is built, before any model loads)
CONFIG_CHECKS = Registry("config check", "the config", "rlspec.rollout.speculative.bandit")
