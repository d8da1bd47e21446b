"""Which kind of decode step to run: plain, or a lookup draft of some length, per batch size.

A lookup draft costs no model forward, but verifying ``k`` drafts makes the target's step process
``k + 1`` tokens per row: where a step is overhead- or memory-bound (few rows, bigger models) that
is nearly free, where it is compute-bound (many rows of a tiny model) it costs up to ``k + 1``
times a plain step. So the choice is measured, not assumed: :class:`StepSelector` keeps, per
batch-size bucket (powers of two: 1, 2, 3-4, 5-8, ...), the tokens/s of the last ``window`` steps
of every arm -- ``"plain"`` and one arm per draft length -- and runs the arm with the best median.

* every arm is tried ``min_samples`` times in a bucket first (a one-off cost per bucket and run:
  the selector lives as long as the engine), except that an arm listed in ``follows`` (a longer
  draft) waits until the cheaper arm it follows reached ``dominance`` of the best arm's speed;
* afterwards a non-best arm is tried again after ``max(explore_every, (best / its - 1) /
  explore_cost)`` steps of the bucket (``best`` and ``its`` the median tokens/s), so the choice
  follows drift (the policy changes every RL step, and with it how redundant its text is) while
  trying arms that measured slower costs about ``explore_cost`` of the bucket's time at most;
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
    last: dict[str, int] = field(default_factory=dict)  # arm -> the bucket step it was last run at
    medians: dict[str, float] = field(default_factory=dict)  # arm -> median of its rewards
    stale: set = field(default_factory=set)  # arms whose median needs recomputing
    # the plan, recomputed every REPLAN steps (a decision per decode step must cost ~nothing)
    best: str | None = None
    pending: list = field(default_factory=list)  # arms still lacking min_samples, in order
    explore: tuple | None = None  # (bucket step, arm): the next try of a slower arm
    replan_at: int = 0


REPLAN = 8


class StepSelector:
    def __init__(self, arms: list[str], *, explore_every: int = 40, min_samples: int = 3, window: int = 16,
                 margin: float = 0.03, explore_cost: float = 0.01, follows: dict[str, str] | None = None,
                 dominance: float = 0.7) -> None:
        if not arms:
            raise ValueError("StepSelector needs at least one arm (e.g. 'plain' and 'lookup/4')")
        if explore_every < 1 or min_samples < 1 or window < 1 or not 0 < explore_cost <= 1:
            raise ValueError("explore_every, min_samples and window must be >= 1, explore_cost in (0, 1]")
        self.arms = list(arms)
        self.explore_every, self.min_samples, self.window, self.margin = explore_every, min_samples, window, margin
        self.explore_cost, self.dominance = explore_cost, dominance
        # arm -> the cheaper arm it is tried after: a longer draft is measured only once the shorter
        # one reached `dominance` of the best arm (a longer draft costs more per step; where the
        # shorter one loses by far, so does the longer one)
        self.follows = dict(follows or {})
        self._buckets: dict[int, _Bucket] = {}

    def _bucket(self, rows: int) -> _Bucket:
        b = self._buckets.get(size_bucket(rows))
        if b is None:
            b = self._buckets[size_bucket(rows)] = _Bucket({a: deque(maxlen=self.window) for a in self.arms})
        return b

    def _measured(self, b: _Bucket) -> list[str]:
        return [a for a in self.arms if len(b.rewards[a]) >= self.min_samples]

    def _dominated(self, b: _Bucket, arm: str, top: float) -> bool:
        """True when ``arm`` waits for the arm it follows, which measured below ``dominance * top``."""
        prev = self.follows.get(arm)
        if prev is None:
            return False
        if len(b.rewards[prev]) < self.min_samples:
            return True
        return b.medians[prev] < self.dominance * top

    def _plan(self, b: _Bucket) -> None:
        for arm in b.stale:
            r = sorted(b.rewards[arm])
            b.medians[arm] = r[len(r) // 2]
        b.stale.clear()
        measured = self._measured(b)
        b.best = None
        if measured:  # a draft arm must beat plain decoding by the margin
            b.best = max(measured, key=lambda a: b.medians[a] * (1.0 + self.margin if a == PLAIN else 1.0))
        top = b.medians[b.best] if b.best is not None else 0.0
        b.pending = [a for a in self.arms if len(b.rewards[a]) < self.min_samples
                     and not (b.best is not None and self._dominated(b, a, top))]
        b.explore = None
        for arm in measured:
            if arm != b.best and not self._dominated(b, arm, top):
                wait = max(self.explore_every, (top / max(b.medians[arm], 1e-9) - 1.0) / self.explore_cost)
                at = (b.last.get(arm, 0) + wait, arm)
                b.explore = at if b.explore is None else min(b.explore, at)
        b.replan_at = b.steps + REPLAN

    def best(self, rows: int) -> str | None:
        """The exploited arm of ``rows``' bucket among those measured ``min_samples`` times (None: none yet)."""
        b = self._bucket(rows)
        self._plan(b)
        return b.best

    def select(self, rows: int) -> str:
        b = self._bucket(rows)
        if b.pending or b.stale and b.steps >= b.replan_at or b.best is None:
            self._plan(b)
        if b.pending:  # arms not measured yet first (unless they wait for a cheaper one)
            b.replan_at = b.steps
            return b.pending[0]
        b.steps += 1
        if b.explore is not None and b.steps >= b.explore[0]:
            arm = b.explore[1]
            b.last[arm] = b.steps
            b.replan_at = b.steps  # re-plan once its reward is in
            b.explore = None
            return arm
        return b.best

    def update(self, rows: int, arm: str, tokens_per_s: float) -> None:
        """Record one step of ``arm`` at ``rows`` rows that emitted ``tokens_per_s``."""
        b = self._bucket(rows)
        b.rewards[arm].append(float(tokens_per_s))
        b.stale.add(arm)

    def table(self) -> dict[int, dict[str, float]]:
        """Per bucket (its smallest batch size), the median tokens/s of each arm measured so far."""
        out = {}
        for key, b in sorted(self._buckets.items()):
            self._plan(b)
            out[1 if key == 0 else 2 ** (key - 1) + 1] = dict(b.medians)
        return out
