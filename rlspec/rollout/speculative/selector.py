"""Which kind of decode step to run: plain, or a lookup draft of some length, per batch size.

A lookup draft costs no model forward, but verifying ``k`` drafts makes the target's step process
``k + 1`` tokens per row: where a step is overhead- or memory-bound (few rows, bigger models) that
is nearly free, where it is compute-bound (many rows of a tiny model) it costs up to ``k + 1``
times a plain step. So the choice is measured, not assumed: :class:`StepSelector` keeps, per
batch-size bucket (powers of two: 1, 2, 3-4, 5-8, ...), the rewards of the last ``window`` steps
of every arm -- ``"plain"`` and one arm per draft length -- and runs the arm with the best value:
the arm's plain-step seconds saved per second spent over those steps (a time-weighted mean of the
rewards, each step's seconds capped at ``OUTLIER`` times the arm's median step so one stall from
the OS does not condemn an arm). A median of per-step speed-ups was measured to mislead
(SmolLM2-135M, 4 rows; docs/speculation.md): where a draft pays only on the steps where the
least-advanced row found a match, say one in three, and costs 1.9x a plain step, its median
reward is about 0.5 although the arm as a whole does 1.2x a plain step's work per second.

The reward of a step (:meth:`StepSelector.record`) is its **speed-up over a plain step at the same
number of rows and context length**: ``tokens * T_plain(rows, kv) / (rows * seconds)``, with
``T_plain`` fitted to the recent plain steps (:class:`PlainStepCost`); a plain step scores 1. Raw
tokens/s would compare steps taken at different batch sizes and context lengths inside a bucket
(a plain step late in a call, over long contexts, against a draft step early in the next one),
which was measured to favour drafts wrongly on the embedded default.

When no prompt waits for a slot, tokens per row-step overstate a draft: a row that finishes early
frees nothing, and the call lasts as long as its least-advanced row. Then only the per-row part of
a step's cost (``T_plain - a``, ``a`` the fitted fixed part) is saved by rows that ran ahead; the
fixed part is paid per step until the slowest row is done. So the reward becomes
``(a * t_crit + (T_plain - a) * tokens / rows) / seconds``, ``t_crit`` the tokens the least-advanced
row gained (:meth:`StepSelector.record`'s ``critical_tokens``); measured in docs/speculation.md.

* every arm is tried ``min_samples`` times in a bucket first (a one-off cost per bucket and run:
  the selector lives as long as the engine), except that an arm listed in ``follows`` (a longer
  draft) waits until the cheaper arm it follows reached ``dominance`` of the best arm's speed;
* afterwards a non-best arm is tried again after ``max(explore_every, lost / explore_cost)`` steps
  of the bucket, ``lost`` being what one of its steps costs against the best arm in best-arm steps
  (its step time times its shortfall in reward), so the choice follows drift (the policy changes
  every RL step, and with it how redundant its text is) while trying arms that measured slower
  costs about ``explore_cost`` of the bucket's time at most;
* a draft arm must beat plain's value by ``margin`` to be chosen over it (noise never makes the
  engine slower than plain decoding for long). Without a ``"plain"`` arm (``mode=always``) the
  selector only picks the draft length.

This is TLT's per-bucket bandit (arXiv 2511.16665, BEG-MAB; :mod:`.bandit`) with "no speculation"
as an arm, which makes "never slower than plain" the bandit's own job.

Rewards given directly (:meth:`StepSelector.update`)::

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


class PlainStepCost:
    """What a plain decode step costs at ``rows`` rows attending over ``kv`` cache columns: the
    yardstick that makes steps taken at different batch sizes and context lengths comparable.

    A decode step's time is close to ``a + b * rows + c * rows * kv`` (fixed overhead, per-row
    weights and sampling, attention over the cache); the three coefficients are fitted to the
    recent plain steps by recursive least squares with forgetting (old steps fade with factor
    ``forget`` per step, so the fit follows a changing policy and context lengths).

    >>> c = PlainStepCost()
    >>> for rows in (1, 8, 32, 128):
    ...     for kv in (100, 300):
    ...         for _ in range(5):
    ...             c.observe(rows, kv, 0.001 + 0.00002 * rows + 0.0000001 * rows * kv)
    >>> round(c.predict(64, 200) * 1e3, 3)  # 1 + 1.28 + 1.28 ms
    3.56
    """

    SCALE = (1.0, 1 / 128, 1 / 1e5)  # feature scales: 1, rows, rows * kv

    def __init__(self, forget: float = 0.995) -> None:
        self.forget = forget
        self.theta = [0.0, 0.0, 0.0]
        self.p = [[1e3 if i == j else 0.0 for j in range(3)] for i in range(3)]
        self.count = 0

    def _features(self, rows: int, kv: int) -> list[float]:
        return [self.SCALE[0], rows * self.SCALE[1], rows * kv * self.SCALE[2]]

    def observe(self, rows: int, kv: int, seconds: float) -> None:
        """One recursive-least-squares update with forgetting (runs once per plain decode step,
        so it is written out for 3 features: a few microseconds instead of ~70 with loops)."""
        x0, x1, x2 = self.SCALE[0], rows * self.SCALE[1], rows * kv * self.SCALE[2]
        (p00, p01, p02), (p10, p11, p12), (p20, p21, p22) = self.p
        lam = self.forget
        px0 = p00 * x0 + p01 * x1 + p02 * x2
        px1 = p10 * x0 + p11 * x1 + p12 * x2
        px2 = p20 * x0 + p21 * x1 + p22 * x2
        den = lam + x0 * px0 + x1 * px1 + x2 * px2
        k0, k1, k2 = px0 / den, px1 / den, px2 / den
        t0, t1, t2 = self.theta
        err = seconds - (t0 * x0 + t1 * x1 + t2 * x2)
        self.theta = [t0 + k0 * err, t1 + k1 * err, t2 + k2 * err]
        # P <- (P - k (P x)^T) / lam; (P x)_j = px_j for symmetric P, as in the general form
        self.p = [[(p00 - k0 * px0) / lam, (p01 - k0 * px1) / lam, (p02 - k0 * px2) / lam],
                  [(p10 - k1 * px0) / lam, (p11 - k1 * px1) / lam, (p12 - k1 * px2) / lam],
                  [(p20 - k2 * px0) / lam, (p21 - k2 * px1) / lam, (p22 - k2 * px2) / lam]]
        self.count += 1

    def fixed(self) -> float:
        """The fitted fixed part ``a`` of a plain step (>= 0; callers cap it at :meth:`predict`).
        With one batch size only, the split between ``a`` and the per-row part is decided by the
        prior, which puts it on ``a``: the cautious side."""
        return max(self.theta[0] * self.SCALE[0], 0.0)

    def predict(self, rows: int, kv: int) -> float | None:
        """Plain step seconds at ``rows`` rows and ``kv`` columns (None before any plain step)."""
        if not self.count:
            return None
        return max(sum(t * v for t, v in zip(self.theta, self._features(rows, kv))), 1e-6)


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
    weights: dict[str, deque] = field(default_factory=dict)  # arm -> each reward's step seconds (1 if given directly)
    values: dict[str, float] = field(default_factory=dict)  # arm -> its value (time-weighted mean reward)
    seconds: dict[str, deque] = field(default_factory=dict)  # arm -> its recent step times
    stale: set = field(default_factory=set)  # arms whose value needs recomputing
    # the plan, recomputed every REPLAN steps (a decision per decode step must cost ~nothing)
    best: str | None = None
    pending: list = field(default_factory=list)  # arms still lacking min_samples, in order
    explore: tuple | None = None  # (bucket step, arm): the next try of a slower arm
    replan_at: int = 0


REPLAN = 8
OUTLIER = 4.0  # a step's weight is capped at this many times the arm's median step seconds


def arm_value(rewards, seconds) -> float:
    """Plain-step seconds saved per second spent: ``sum(r_i * s_i) / sum(s_i)`` over the arm's recent
    steps (reward ``r_i`` = plain-step seconds worth / seconds, so this is total worth over total
    time), with each ``s_i`` capped at ``OUTLIER`` times their median.

    >>> round(arm_value([0.55, 0.55, 3.0], [0.17, 0.17, 0.17]), 3)  # pays on one step in three
    1.367
    >>> round(arm_value([1.0, 1.0, 0.1], [0.1, 0.1, 10.0]), 3)  # a 10 s stall weighs as 0.4 s
    0.4
    """
    cap = OUTLIER * sorted(seconds)[len(seconds) // 2]
    w = [min(s, cap) for s in seconds]
    return sum(r * x for r, x in zip(rewards, w)) / sum(w)


class StepSelector:
    def __init__(self, arms: list[str], *, explore_every: int = 40, min_samples: int = 3, window: int = 16,
                 margin: float = 0.03, explore_cost: float = 0.005, follows: dict[str, str] | None = None,
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
        self.plain_cost = PlainStepCost()

    @classmethod
    def for_lookups(cls, look, mode: str = "adaptive") -> "StepSelector":
        """The selector of ``rollout.speculative.lookup`` settings: one arm per draft length (a longer
        one follows the next shorter), beside ``"plain"`` in ``adaptive`` mode (``always``: a draft
        at every step, the selector picks only its length)."""
        drafts = [f"lookup/{k}" for k in sorted(set(look.lengths))]
        return cls(([PLAIN] if mode == "adaptive" else []) + drafts, follows=dict(zip(drafts[1:], drafts[:-1])),
                   explore_every=look.explore_every, explore_cost=look.explore_cost,
                   min_samples=look.min_samples, window=look.window)

    def _bucket(self, rows: int) -> _Bucket:
        b = self._buckets.get(size_bucket(rows))
        if b is None:
            b = self._buckets[size_bucket(rows)] = _Bucket({a: deque(maxlen=self.window) for a in self.arms},
                                                           weights={a: deque(maxlen=self.window) for a in self.arms})
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
        return b.values[prev] < self.dominance * top

    def _plan(self, b: _Bucket) -> None:
        for arm in b.stale:
            b.values[arm] = arm_value(b.rewards[arm], b.weights[arm])
        b.stale.clear()
        measured = self._measured(b)
        b.best = None
        if measured:  # a draft arm must beat plain decoding by the margin
            b.best = max(measured, key=lambda a: b.values[a] * (1.0 + self.margin if a == PLAIN else 1.0))
        top = b.values[b.best] if b.best is not None else 0.0
        b.pending = [a for a in self.arms if len(b.rewards[a]) < self.min_samples
                     and not (b.best is not None and self._dominated(b, a, top))]
        b.explore = None
        for arm in measured:
            if arm != b.best and not self._dominated(b, arm, top):
                wait = max(self.explore_every, self._lost_steps(b, arm, top) / self.explore_cost)
                at = (b.last.get(arm, 0) + wait, arm)
                b.explore = at if b.explore is None else min(b.explore, at)
        b.replan_at = b.steps + REPLAN

    def _lost_steps(self, b: _Bucket, arm: str, top: float) -> float:
        """What one step of ``arm`` costs against the best arm, in steps of the best arm: its time
        times its shortfall, ``t_arm * (1 - r_arm / r_best)``, over the best arm's step time."""
        shortfall = max(0.0, 1.0 - b.values[arm] / max(top, 1e-12))
        mine, best = b.seconds.get(arm), b.seconds.get(b.best)
        if not mine or not best:  # step times unknown (rewards given directly): in reward units
            return top / max(b.values[arm], 1e-9) - 1.0
        return sorted(mine)[len(mine) // 2] * shortfall / max(sorted(best)[len(best) // 2], 1e-9)

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

    def record(self, rows: int, arm: str, tokens: int, seconds: float, kv: int = 0,
               critical_tokens: int | None = None) -> None:
        """A step of ``arm`` at ``rows`` rows (attending over ``kv`` cache columns) emitted
        ``tokens`` in ``seconds``: its reward is its speed-up over a plain step at the same rows
        and columns (1 for a plain step); without a plain arm (nothing to compare with) its tokens/s.
        ``critical_tokens``: when no prompt waits for a slot, the tokens the least-advanced row
        gained (the fixed part of the step cost counts those only; see the module doc)."""
        seconds = max(seconds, 1e-9)
        b = self._bucket(rows)
        b.seconds.setdefault(arm, deque(maxlen=self.window)).append(seconds)
        if PLAIN not in self.arms:
            self.update(rows, arm, tokens / seconds, seconds)
        elif arm == PLAIN:
            self.plain_cost.observe(rows, kv, seconds)
            self.update(rows, arm, 1.0, seconds)
        else:
            plain = self.plain_cost.predict(rows, kv)
            # no plain step yet (plain comes first in every bucket, so only with rewards given
            # directly): score it as a plain step would be, so the arm is not retried forever
            if plain is None:
                self.update(rows, arm, 1.0, seconds)
                return
            fixed = 0.0 if critical_tokens is None else min(self.plain_cost.fixed(), plain)
            worth = fixed * (critical_tokens or 0) + (plain - fixed) * tokens / rows  # plain-step seconds
            self.update(rows, arm, worth / seconds, seconds)

    def update(self, rows: int, arm: str, reward: float, seconds: float = 1.0) -> None:
        """Record one step of ``arm`` at ``rows`` rows with this reward (higher is better), weighted
        by the step's ``seconds`` in the arm's value (equal weights when rewards are given directly)."""
        b = self._bucket(rows)
        b.rewards[arm].append(float(reward))
        b.weights[arm].append(max(float(seconds), 1e-9))
        b.stale.add(arm)

    def table(self) -> dict[int, dict[str, float]]:
        """Per bucket (its smallest batch size), the value of each arm measured so far (see :func:`arm_value`)."""
        out = {}
        for key, b in sorted(self._buckets.items()):
            self._plan(b)
            out[1 if key == 0 else 2 ** (key - 1) + 1] = dict(b.values)
        return out
