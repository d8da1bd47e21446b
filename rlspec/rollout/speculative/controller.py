"""When to speculate: TLT's long-tail switch, the adaptive probe, revert and back-off.

A rollout batch starts with many rows, where a decode step is compute-bound and speculation only
adds work; it ends with a few long rows, where a step is overhead- or memory-bound and drafts pay.
:class:`LongTailController` decides, step by step, which kind of step the engine runs:

* **switch** (TLT, arXiv 2511.16665): once no prompt waits and at most ``threshold`` rows remain
  for ``warmup_checks`` consecutive decode steps (hysteresis), the long tail has started
  (``mode=always``: at the first decode step);
* **probe** (``mode=adaptive``): after the switch, speculative and plain steps alternate until
  each has ``probe_steps`` throughput samples, measured at the same, shrinking batch size;
* **revert**: if the speculative median is lower, the call goes back to plain decoding and the
  batch-size bucket of the switch skips speculation for the next 1, 2, 4, ... calls (so it is
  never a loss for long); a later win resets the back-off;
* **re-entry**: once the batch of a reverted call shrinks into a smaller bucket, where a draft step
  costs less relative to a plain one, speculation is probed afresh there.

The controller owns no model and no timing: the engine reports rows and measured rates. Its
back-off table lives across calls; :meth:`begin_call` resets the per-call state.
"""

from __future__ import annotations

from typing import Callable

from rlspec.config import SpeculativeConfig

MAX_BACKOFF_CALLS = 64


def median(values: list[float]) -> float:
    """The upper median (no interpolation).

    >>> median([3.0, 1.0, 2.0, 4.0])
    3.0
    """
    ordered = sorted(values)
    return ordered[len(ordered) // 2]


class LongTailController:
    def __init__(self, settings: SpeculativeConfig, bucket_of: Callable[[int], int]) -> None:
        self.settings = settings
        self.bucket_of = bucket_of
        self.adaptive = settings.mode == "adaptive"
        self._backoff: dict[int, int] = {}  # bucket -> calls left before speculation is tried again
        self._penalty: dict[int, int] = {}  # bucket -> current back-off length (doubles on each loss)
        self.begin_call()

    def begin_call(self) -> None:
        self.in_tail = False
        self._calm_steps = 0  # consecutive decode steps with <= threshold rows and nothing waiting
        self.bucket: int | None = None  # the bucket speculation was last tried in (this call)
        self.sd_rates: list[float] = []
        self.plain_rates: list[float] = []

    # ------------------------------------------------------------------ the switch
    def reached_tail(self, num_rows: int, waiting: bool) -> bool:
        """Count one decode step; True exactly once per call, when the long tail starts."""
        s = self.settings
        calm = not waiting and (s.mode == "always" or num_rows <= s.threshold)
        self._calm_steps = self._calm_steps + 1 if calm else 0
        if calm and (s.mode == "always" or self._calm_steps >= s.warmup_checks):
            self.in_tail = True
            self.bucket = self.bucket_of(num_rows)
            return True
        return False

    def may_speculate(self) -> bool:
        """At the switch: whether to speculate now (False while the bucket's back-off lasts)."""
        return not (self.adaptive and self._backed_off(self.bucket))

    def may_reenter(self, num_rows: int) -> bool:
        """After a revert: True when the batch has shrunk into a new bucket that is not backed off
        (the probe then starts afresh there)."""
        bucket = self.bucket_of(num_rows)
        if bucket == self.bucket:
            return False
        self.bucket = bucket
        if self._backed_off(bucket):
            return False
        self.sd_rates, self.plain_rates = [], []
        return True

    def _backed_off(self, bucket: int | None) -> bool:
        """True when speculation lost in this bucket recently; uses up one call of its back-off."""
        skip = self._backoff.get(bucket, 0)
        if skip:
            self._backoff[bucket] = skip - 1
        return bool(skip)

    # ------------------------------------------------------------------ the probe
    @property
    def probing(self) -> bool:
        n = self.settings.probe_steps
        return self.adaptive and (len(self.sd_rates) < n or len(self.plain_rates) < n)

    def wants_plain_step(self) -> bool:
        """While probing: the next step is the plain half of a (speculative, plain) pair."""
        return self.probing and len(self.plain_rates) < len(self.sd_rates)

    def record_speculative(self, tokens_per_s: float) -> None:
        self.sd_rates.append(tokens_per_s)

    def record_plain(self, tokens_per_s: float) -> bool | None:
        """Record a plain probe step; at the end of the probe return whether speculation stays
        (False: it measured slower -- revert and back the bucket off), else None."""
        self.plain_rates.append(tokens_per_s)
        if len(self.plain_rates) != self.settings.probe_steps:
            return None
        if median(self.sd_rates) < median(self.plain_rates):
            penalty = min(2 * self._penalty.get(self.bucket, 0) or 1, MAX_BACKOFF_CALLS)
            self._penalty[self.bucket] = penalty
            self._backoff[self.bucket] = penalty
            return False
        self._penalty[self.bucket] = 0  # speculation wins here: keep it
        return True
