"""Which kind of decode step to run: plain, or a lookup draft of some length, per batch size.

A lookup draft costs no model forward, but verifying ``k`` drafts makes the target's step process
``k + 1`` tokens per row: where a step is overhead- or memory-bound (few rows, bigger models) that
is nearly free, where it is compute-bound (many rows of a tiny model) it costs up to ``k + 1``
times a plain step. So the choice is measured, not assumed: :class:`StepSelector` keeps, per
batch-size bucket (powers of two: 1, 2, 3-4, 5-8, ...), the tokens/s of the last ``window`` steps
of every arm -- ``"plain"`` and one arm per draft length -- and runs the arm with the best median.

* every arm is tried ``min_samples`` times in a bucket first (a one-off cost per bucket and run:
  the selector lives as long as the engine);
* afterwards one step in ``explore_every`` tries the next non-best arm in turn, so the choice
  follows drift (the policy changes every RL step, and with it how redundant its text is) at a
  bounded cost;
* a draft arm must beat plain's median by ``margin`` to be chosen over it (noise never makes the
  engine slower than plain decoding for long). Without a ``"plain"`` arm (``mode=always``) the
  selector only picks the draft length.

This is TLT's per-bucket bandit (arXiv 2511.16665, BEG-MAB; :mod:`.bandit`) with "no speculation"
as an arm, which makes "never slower than plain" the bandit's own job.

>>> s = StepSelector(["plain", "lookup/4"], explore_every=10, min_samples=1, window=4)
>>> s.select(3)  # untried arms first
'plain'
>>> s.update(3, "plain", 100.0); s.select(3)
'lookup/4'
>>> s.update(3, "lookup/4", 150.0); s.select(4)  # same bucket (3-4 rows): lookup measured faster
'lookup/4'
>>> s.select(5)  # a new bucket learns on its own
'plain'
"""

from __future__ import annotations

import statistics
from collections import deque
from dataclasses import dataclass, field

PLAIN = "plain"


def size_bucket(rows: int) -> int:
    """Power-of-two bucket of a batch size: 1 -> 0, 2 -> 1, 3-4 -> 2, 5-8 -> 3, ...

    >>> [size_bucket(r) for r in (1, 2, 3, 4, 5, 8, 9, 128, 129)]
    [0, 1, 2, 2, 3, 3, 4, 7, 8]
    """
    if rows < 1:
        raise ValueError(f"rows must be >= 1, got {rows}")
    return (rows - 1).bit_length()


@dataclass
class _Bucket:
    rewards: dict[str, deque] = field(default_factory=dict)
    steps: int = 0
    turn: int = 0  # round-robin pointer over the non-best arms


class StepSelector:
    def __init__(self, arms: list[str], *, explore_every: int = 40, min_samples: int = 3, window: int = 16,
                 margin: float = 0.03) -> None:
        if not arms:
            raise ValueError("StepSelector needs at least one arm (e.g. 'plain' and 'lookup/4')")
        if explore_every < 1 or min_samples < 1 or window < 1:
            raise ValueError("explore_every, min_samples and window must be >= 1")
        self.arms = list(arms)
        self.explore_every, self.min_samples, self.window, self.margin = explore_every, min_samples, window, margin
        self._buckets: dict[int, _Bucket] = {}

    def _bucket(self, rows: int) -> _Bucket:
        b = self._buckets.get(size_bucket(rows))
        if b is None:
            b = self._buckets[size_bucket(rows)] = _Bucket({a: deque(maxlen=self.window) for a in self.arms})
        return b

    def best(self, rows: int) -> str | None:
        """The exploited arm of ``rows``' bucket (None while some arm lacks ``min_samples``)."""
        b = self._bucket(rows)
        if any(len(r) < self.min_samples for r in b.rewards.values()):
            return None
        medians = {a: statistics.median(r) for a, r in b.rewards.items()}
        if PLAIN in medians:  # a draft arm must beat plain decoding by the margin
            medians[PLAIN] *= 1.0 + self.margin
        return max(self.arms, key=lambda a: medians[a])

    def select(self, rows: int) -> str:
        b = self._bucket(rows)
        for arm in self.arms:  # untried arms first
            if len(b.rewards[arm]) < self.min_samples:
                return arm
        b.steps += 1
        best = self.best(rows)
        if b.steps % self.explore_every == 0 and len(self.arms) > 1:
            others = [a for a in self.arms if a != best]
            b.turn = (b.turn + 1) % len(others)
            return others[b.turn]
        return best

    def update(self, rows: int, arm: str, tokens_per_s: float) -> None:
        """Record one step of ``arm`` at ``rows`` rows that emitted ``tokens_per_s``."""
        self._bucket(rows).rewards[arm].append(float(tokens_per_s))

    def table(self) -> dict[int, dict[str, float]]:
        """Per bucket (its smallest batch size), the median tokens/s of each arm measured so far."""
        out = {}
        for key, b in sorted(self._buckets.items()):
            out[1 if key == 0 else 2 ** (key - 1) + 1] = {a: statistics.median(r) for a, r in b.rewards.items() if r}
        return out
