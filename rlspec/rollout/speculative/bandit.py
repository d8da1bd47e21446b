"""Draft-shape selector for speculative decoding: a multi-armed bandit per batch-size bucket.

TLT ("Taming the Long-Tail", arXiv 2511.16665, Section "Adaptive Rollout Engine", BEG-MAB) picks
the draft shape -- an :class:`~rlspec.rollout.speculative.draft_tree.ArmShape` ``(depth, topk, num_verify)``
-- for every SD step from the current batch size, learning online which shape gives the most
throughput. The reward of one SD step is

    reward = accepted_tokens * batch_size / wall_time          (:func:`step_reward`)

with ``accepted_tokens`` the mean tokens emitted per row (accepted drafts + the bonus token), i.e.
tokens emitted per second by the whole batch.

Policies (``rollout.speculative.bandit.policy``):

* ``bucketed_egreedy`` (default, TLT's BEG): arms are grouped per batch-size bucket; with
  probability ``epsilon`` a uniformly random arm of the bucket, else the arm with the best
  **median** reward over the sliding window; arms without a reward in the window are tried first.
* ``ucb1``: UCB1 (Auer, Cesa-Bianchi, Fischer 2002, "Finite-time Analysis of the Multiarmed
  Bandit Problem", Fig. 1) over the sliding window (sliding-window UCB, Garivier & Moulines,
  arXiv 0805.3415): ``mean_i / max_j mean_j + sqrt(2 ln N / n_i)`` (rewards normalised by the best
  arm's mean so that they lie in [0, 1] as UCB1 assumes), untried arms first. TLT's code uses the
  raw 10 %-trimmed mean instead, whose scale (tokens/s) makes the bonus negligible.
* ``fixed``: a static table bucket -> arm (``fixed_arms``, default the first arm of each bucket).

Differences from TLT's code (``eagle_mab.py``), on purpose:

* TLT groups arms by verify-token count and its shipped defaults give each bucket exactly ONE
  arm, so its BEG never explores. Here every bucket lists its own arms, the defaults give each
  bucket three (a big tree, a small tree, a chain), and the bandit policies reject one-arm
  buckets (use ``policy: fixed`` for a static table).
* ``window_scope: bucket`` (default) keeps the last ``window`` pulls *of the bucket*, so an arm
  that stopped being pulled loses its stale rewards and is re-tried: the selector follows reward
  drift (the drafter is retrained every RL step). ``window_scope: arm`` is TLT's code behaviour
  (the last ``window`` rewards of *each* arm; stale rewards of rarely pulled arms stay forever).
* ``group_by: bucket`` (default) keeps one state per bucket. The reward scales with the batch
  size, so a bucket spanning several sizes (5..20) compares arms measured at different sizes;
  ``group_by: batch_size`` keeps a separate state per batch-size group as TLT's
  ``MABGroupManager`` does (1..31 one each, 32..127 by 8, 128..256 by 32), still drawing arms
  from the bucket.
* TLT's reward uses ``stable_accept_length`` (the arm's median accept length across all groups);
  :func:`step_reward` uses the step's measured tokens (pass a smoothed value if you prefer).

Default table on GPU (trees, smaller than TLT's GPU defaults ``8_4_48/8_4_32/8_4_16/8_4_8``;
``num_verify`` excludes the root, SGLang's ``num_draft_tokens`` = ``num_verify + 1``). On CPU the
native engine uses :data:`DEFAULT_ARMS_CPU` instead (chains of three depths per bucket: there a
verify forward costs in proportion to the tokens it verifies, so tree branches do not pay):

===========  ==========================================
batch size   arms ``depth_topk_numverify``
===========  ==========================================
1            ``6_4_16``, ``4_2_8``, ``5_1_5`` (chain)
2-4          ``5_4_12``, ``4_2_6``, ``4_1_4`` (chain)
5-20         ``4_2_6``, ``3_2_4``, ``3_1_3`` (chain)
>= 21        ``3_2_4``, ``3_1_3``, ``2_1_2`` (chains)
===========  ==========================================

>>> b = DraftShapeBandit({"seed": 0})
>>> b.bucket_of(1), b.bucket_of(4), b.bucket_of(20), b.bucket_of(300)
(0, 1, 2, 3)
>>> arm = b.select(1); arm in b.arms_for(1)
True
>>> b.update(1, arm, step_reward(2.5, 1, 0.05))
>>> sum(b.histogram()[1].values())
1
"""

from __future__ import annotations

import math
import random
import statistics
from collections import deque
from typing import Any, Callable, Mapping, NamedTuple, Sequence

from rlspec.config import BanditConfig
from rlspec.errors import ConfigError
from rlspec.registry import BANDIT_POLICIES as POLICIES
from rlspec.registry import CONFIG_CHECKS
from rlspec.rollout.speculative.draft_tree import ArmShape
from rlspec.schema import build

KEY = "rollout.speculative.bandit"

DEFAULT_BUCKETS: tuple[int, ...] = (1, 2, 5, 21)
DEFAULT_ARMS: tuple[tuple[ArmShape, ...], ...] = (
    (ArmShape(6, 4, 16), ArmShape(4, 2, 8), ArmShape(5, 1, 5)),
    (ArmShape(5, 4, 12), ArmShape(4, 2, 6), ArmShape(4, 1, 4)),
    (ArmShape(4, 2, 6), ArmShape(3, 2, 4), ArmShape(3, 1, 3)),
    (ArmShape(3, 2, 4), ArmShape(3, 1, 3), ArmShape(2, 1, 2)),
)

# CPU table (the native engine uses it on CPU unless ``arms``/``buckets`` are set): chains only.
# Measured on 2 AMD EPYC cores, a 39.6M Qwen2 and a drafter with top-1 0.87, sampling at T=1
# (tokens/s against plain decoding): trees lose everywhere (6_4_16: 1.12x at 1 row, 0.66x at 4-8
# rows; 4_2_6: 0.78-0.86x at 2-8 rows) while chains win (3_1_3: 1.98x / 1.46x / 1.25x / 1.19x at
# 1 / 2 / 4 / 8 rows; 5_1_5 1.85x at 1 row, 6_1_6 1.30x at 4 rows). On 2 Intel Xeon cores (38.2M
# model, same kind of drafter) the best chains: 8_1_8 1.76x at 1 row, 3_1_3 1.14x at 2, 4_1_4 1.64x
# at 4, 3_1_3 1.49x at 8, 3_1_3 1.34x at 16, 2_1_2 1.18x at 32, nothing above 64. The CPU's verify
# forward costs in proportion to the tokens verified, so a tree's extra branches are pure cost there.
DEFAULT_ARMS_CPU: tuple[tuple[ArmShape, ...], ...] = (
    (ArmShape(3, 1, 3), ArmShape(5, 1, 5), ArmShape(8, 1, 8)),
    (ArmShape(3, 1, 3), ArmShape(4, 1, 4), ArmShape(6, 1, 6)),
    (ArmShape(2, 1, 2), ArmShape(3, 1, 3), ArmShape(5, 1, 5)),
    (ArmShape(1, 1, 1), ArmShape(2, 1, 2), ArmShape(3, 1, 3)),
)


def default_arms_for(device_type: str) -> tuple[tuple[ArmShape, ...], ...]:
    """The default arm table for a device: :data:`DEFAULT_ARMS_CPU` on ``"cpu"``, else :data:`DEFAULT_ARMS`."""
    return DEFAULT_ARMS_CPU if device_type == "cpu" else DEFAULT_ARMS


def step_reward(tokens_per_row: float, batch_size: int, wall_time_s: float) -> float:
    """TLT's reward of one SD step: ``tokens_per_row * batch_size / wall_time_s`` (tokens/s).

    ``tokens_per_row`` = mean tokens emitted per row in the step, bonus/correction token included
    (``num_accepted.float().mean() + 1``); ``wall_time_s`` covers draft + verify (+ draft extend).

    >>> step_reward(3.0, 4, 0.5)
    24.0
    """
    if wall_time_s <= 0 or not math.isfinite(wall_time_s):
        raise ValueError(f"wall_time_s must be a positive finite number of seconds, got {wall_time_s}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    return float(tokens_per_row) * batch_size / wall_time_s


def batch_size_group(batch_size: int) -> int:
    """TLT ``MABGroupManager`` groups: 1..31 each, 32..127 in steps of 8, 128..256 in steps of 32.

    >>> [batch_size_group(b) for b in (1, 31, 32, 39, 40, 127, 128, 200, 999)]
    [1, 31, 32, 32, 40, 120, 128, 192, 256]
    """
    if batch_size < 32:
        return batch_size
    if batch_size < 128:
        return 32 + 8 * ((batch_size - 32) // 8)
    return min(128 + 32 * ((batch_size - 128) // 32), 256)


# ----------------------------------------------------------------------------------------------
# the arm table


def _is_seq(x: Any) -> bool:
    return isinstance(x, Sequence) and not isinstance(x, (str, bytes))


def _int(x: Any) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _parse_arm(value: Any, key: str) -> ArmShape:
    try:
        arm = ArmShape.parse(value if not _is_seq(value) else list(value))
    except ValueError as err:
        raise ConfigError(f"{key} = {value!r}: {err}") from None
    problems = arm.problems()
    if problems:
        raise ConfigError(f"{key} = {str(arm)!r}: {'; '.join(problems)}")
    return arm


class ArmTable(NamedTuple):
    """The parsed ``buckets`` / ``arms`` / ``fixed_arms`` of a :class:`~rlspec.config.BanditConfig`."""

    buckets: tuple[int, ...]  # batch-size lower bounds, first 1
    arms: tuple[tuple[ArmShape, ...], ...]  # one tuple per bucket
    fixed_arms: tuple[ArmShape, ...] | None  # policy "fixed": one arm per bucket


@CONFIG_CHECKS.register(KEY)
def check_arm_table(cfg: BanditConfig) -> None:
    """The config-time check of the arm table (the device's default table is chosen later)."""
    parse_arm_table(cfg)


def parse_arm_table(cfg: BanditConfig, device_type: str | None = None) -> ArmTable:
    """Validate and parse the arm table; with neither ``buckets`` nor ``arms`` set, the defaults
    for ``device_type`` (:func:`default_arms_for`; ``None``: the GPU table).

    Arms may be ``ArmShape``, ``"depth_topk_numverify"`` strings or ``[depth, topk, num_verify]``;
    ``arms`` is a list (one entry per bucket) or a mapping bucket-lower-bound -> list.
    """
    buckets = tuple(cfg.buckets) if cfg.buckets is not None else DEFAULT_BUCKETS
    if not buckets or buckets[0] != 1 or any(y <= x for x, y in zip(buckets, buckets[1:])):
        raise ConfigError(
            f"{KEY}.buckets must start at 1 and strictly increase (batch-size lower bounds), got {list(buckets)}"
        )
    a = cfg.arms
    if a is None:
        defaults = default_arms_for(device_type) if cfg.buckets is None and device_type else DEFAULT_ARMS
        if len(buckets) != len(defaults):
            raise ConfigError(
                f"{KEY}.buckets has {len(buckets)} buckets but the default {KEY}.arms has {len(defaults)}; "
                f"set {KEY}.arms too (one list per bucket)"
            )
        a = defaults
    if isinstance(a, Mapping):
        try:
            by_bound = {int(k): v for k, v in a.items()}
        except (TypeError, ValueError):
            raise ConfigError(f"{KEY}.arms keys must be bucket lower bounds (ints), got {list(a)!r}") from None
        if sorted(by_bound) != sorted(buckets):
            raise ConfigError(
                f"{KEY}.arms keys {sorted(by_bound)} must equal {KEY}.buckets {list(buckets)} (one arm list per bucket)"
            )
        a = [by_bound[b] for b in buckets]
    if not _is_seq(a):
        raise ConfigError(f"{KEY}.arms must be a list with one list of arms per bucket, got {a!r}")
    if len(a) != len(buckets):
        raise ConfigError(
            f"{KEY}.arms has {len(a)} arm lists but {KEY}.buckets has {len(buckets)} buckets; give one list per bucket"
        )
    arms = []
    for i, bucket_arms in enumerate(a):
        if not _is_seq(bucket_arms) or (len(bucket_arms) == 3 and all(_int(x) for x in bucket_arms)):
            raise ConfigError(f"{KEY}.arms[{i}] must be a list of arms (e.g. ['6_4_16', '5_1_5']), got {bucket_arms!r}")
        parsed = tuple(_parse_arm(arm, f"{KEY}.arms[{i}][{j}]") for j, arm in enumerate(bucket_arms))
        if not parsed:
            raise ConfigError(f"{KEY}.arms[{i}] (batch size >= {buckets[i]}) is empty; list at least two arms")
        if len(set(parsed)) != len(parsed):
            raise ConfigError(f"{KEY}.arms[{i}] lists an arm twice: {[str(x) for x in parsed]}")
        if cfg.policy != "fixed" and len(parsed) < 2:
            raise ConfigError(
                f"{KEY}.arms[{i}] (batch size >= {buckets[i]}) has only {str(parsed[0])!r}: a bandit with one arm "
                f"never explores (TLT's default table has this flaw); list >= 2 arms or set {KEY}.policy=fixed"
            )
        arms.append(parsed)
    fixed_arms = None
    if cfg.fixed_arms is not None:
        if len(cfg.fixed_arms) != len(buckets):
            raise ConfigError(f"{KEY}.fixed_arms must list one arm per bucket ({len(buckets)}), got {cfg.fixed_arms!r}")
        fixed_arms = tuple(_parse_arm(arm, f"{KEY}.fixed_arms[{i}]") for i, arm in enumerate(cfg.fixed_arms))
    return ArmTable(buckets, tuple(arms), fixed_arms)


# ----------------------------------------------------------------------------------------------
# policies: (rewards per arm in the window, rng, config) -> arm index

Policy = Callable[[list[list[float]], random.Random, BanditConfig], int]


def _first_untried(rewards: list[list[float]]) -> int | None:
    for i, r in enumerate(rewards):
        if not r:
            return i
    return None


@POLICIES.register("bucketed_egreedy")
def bucketed_egreedy(rewards: list[list[float]], rng: random.Random, cfg: BanditConfig) -> int:
    """TLT BEG inside one bucket: epsilon -> uniform random arm; else untried arms first, else the
    best median reward (first arm on ties).

    >>> bucketed_egreedy([[1.0, 9.0, 2.0], [3.0]], random.Random(0), BanditConfig(epsilon=0.0))
    1
    >>> bucketed_egreedy([[1.0], []], random.Random(0), BanditConfig(epsilon=0.0))
    1
    """
    if rng.random() < cfg.epsilon:
        return rng.randrange(len(rewards))
    untried = _first_untried(rewards)
    if untried is not None:
        return untried
    medians = [statistics.median(r) for r in rewards]
    return max(range(len(rewards)), key=lambda i: (medians[i], -i))


@POLICIES.register("ucb1")
def ucb1(rewards: list[list[float]], rng: random.Random, cfg: BanditConfig) -> int:
    """UCB1 (Auer et al. 2002) on the window: ``mean_i / max_j mean_j + sqrt(2 ln N / n_i)``.

    >>> ucb1([[10.0] * 50, [9.0] * 2], random.Random(0), BanditConfig())  # 0.9 + sqrt(2 ln 52 / 2) wins
    1
    """
    untried = _first_untried(rewards)
    if untried is not None:
        return untried
    means = [statistics.fmean(r) for r in rewards]
    scale = max(means)
    total = sum(len(r) for r in rewards)
    scores = [
        (m / scale if scale > 0 else 0.0) + math.sqrt(2 * math.log(total) / len(r)) for m, r in zip(means, rewards)
    ]
    return max(range(len(rewards)), key=lambda i: (scores[i], -i))


@POLICIES.register("fixed")
def fixed(rewards: list[list[float]], rng: random.Random, cfg: BanditConfig) -> int:
    """The static table: the bucket's only arm (``fixed_arms`` or the first listed arm)."""
    return 0


# ----------------------------------------------------------------------------------------------
# the selector


class _State:
    """Sliding-window rewards and pull counts of one (bucket, group)."""

    def __init__(self, n_arms: int, window: int, scope: str):
        self.scope = scope
        self.window: deque[tuple[int, float]] = deque(maxlen=window)  # scope "bucket"
        self.per_arm: list[deque[float]] = [deque(maxlen=window) for _ in range(n_arms)]  # scope "arm"
        self.pulls = [0] * n_arms  # selections, all time
        self.updates = [0] * n_arms  # rewards received, all time

    def add(self, i: int, reward: float) -> None:
        if self.scope == "bucket":
            self.window.append((i, reward))
        else:
            self.per_arm[i].append(reward)
        self.updates[i] += 1

    def rewards(self) -> list[list[float]]:
        if self.scope == "arm":
            return [list(d) for d in self.per_arm]
        out: list[list[float]] = [[] for _ in self.pulls]
        for i, r in self.window:
            out[i].append(r)
        return out

    def to_dict(self) -> dict[str, Any]:
        return {
            "window": [[i, r] for i, r in self.window],
            "per_arm": [list(d) for d in self.per_arm],
            "pulls": list(self.pulls),
            "updates": list(self.updates),
        }

    def load(self, d: Mapping[str, Any]) -> None:
        self.window.clear()
        self.window.extend((int(i), float(r)) for i, r in d["window"])
        for dq, vals in zip(self.per_arm, d["per_arm"]):
            dq.clear()
            dq.extend(float(v) for v in vals)
        self.pulls = [int(x) for x in d["pulls"]]
        self.updates = [int(x) for x in d["updates"]]


class DraftShapeBandit:
    """Chooses the draft shape of each SD step from the batch size and learns from rewards.

    Usage per SD step::

        arm = bandit.select(batch_size)
        ... draft with arm, verify, time it ...
        bandit.update(batch_size, arm, step_reward(tokens_per_row, batch_size, seconds))

    Args:
        config: ``rollout.speculative.bandit`` (a :class:`~rlspec.config.BanditConfig` or a mapping
            of its keys; ``None`` = defaults).
        device_type: picks the default arm table when the config sets neither ``buckets`` nor
            ``arms``: chains on ``"cpu"``, trees otherwise (:func:`default_arms_for`).
    """

    def __init__(self, config: BanditConfig | Mapping[str, Any] | None = None, device_type: str | None = None):
        if not isinstance(config, BanditConfig):
            config = build(BanditConfig, config, KEY)
        self.config = config
        self.table = parse_arm_table(config, device_type)
        self._policy = POLICIES.get(config.policy)
        self._rng = random.Random(config.seed)
        self._states: dict[tuple[int, int], _State] = {}

    @property
    def buckets(self) -> tuple[int, ...]:
        return self.table.buckets

    def bucket_arms(self, bucket: int) -> tuple[ArmShape, ...]:
        """The arms the policy chooses from in bucket ``bucket`` (index)."""
        if self.config.policy == "fixed":
            fixed_arms = self.table.fixed_arms
            return (fixed_arms[bucket],) if fixed_arms is not None else (self.table.arms[bucket][0],)
        return self.table.arms[bucket]

    def all_arms(self) -> list[ArmShape]:
        """Every arm of the table (the largest bounds the cache a speculative step may use)."""
        return [arm for bucket in self.table.arms for arm in bucket] + list(self.table.fixed_arms or ())

    # -- lookup
    def bucket_of(self, batch_size: int) -> int:
        """Index of the bucket whose lower bound is the largest one <= ``batch_size``."""
        if not _int(batch_size) or batch_size < 1:
            raise ValueError(f"batch_size must be an int >= 1, got {batch_size!r}")
        bucket = 0
        for i, lo in enumerate(self.buckets):
            if batch_size >= lo:
                bucket = i
        return bucket

    def arms_for(self, batch_size: int) -> tuple[ArmShape, ...]:
        return self.bucket_arms(self.bucket_of(batch_size))

    def _state(self, batch_size: int) -> tuple[_State, tuple[ArmShape, ...]]:
        bucket = self.bucket_of(batch_size)
        group = batch_size_group(batch_size) if self.config.group_by == "batch_size" else 0
        arms = self.bucket_arms(bucket)
        key = (bucket, group)
        if key not in self._states:
            self._states[key] = _State(len(arms), self.config.window, self.config.window_scope)
        return self._states[key], arms

    # -- the bandit
    def select(self, batch_size: int) -> ArmShape:
        """The draft shape for an SD step with ``batch_size`` running rows (counts as a pull)."""
        state, arms = self._state(batch_size)
        i = self._policy(state.rewards(), self._rng, self.config)
        state.pulls[i] += 1
        return arms[i]

    def update(self, batch_size: int, arm: ArmShape | str | Sequence[int], reward: float) -> None:
        """Record the reward (:func:`step_reward`) of an SD step run with ``arm`` at ``batch_size``."""
        state, arms = self._state(batch_size)
        arm = ArmShape.parse(arm)
        if arm not in arms:
            raise ValueError(
                f"arm {str(arm)!r} is not an arm of the batch-size {batch_size} bucket: {[str(a) for a in arms]}"
            )
        reward = float(reward)
        if not math.isfinite(reward) or reward < 0:
            raise ValueError(f"reward must be a finite number >= 0 (tokens/s), got {reward}")
        state.add(arms.index(arm), reward)

    # -- inspection and checkpoints
    def histogram(self) -> dict[int, dict[str, int]]:
        """Pulls (selections) per arm: ``{bucket lower bound: {"depth_topk_numverify": pulls}}``."""
        out: dict[int, dict[str, int]] = {}
        for b, lo in enumerate(self.buckets):
            arms = self.bucket_arms(b)
            counts = [0] * len(arms)
            for (bucket, _), st in self._states.items():
                if bucket == b:
                    counts = [c + p for c, p in zip(counts, st.pulls)]
            out[lo] = {str(a): c for a, c in zip(arms, counts)}
        return out

    def state_dict(self) -> dict[str, Any]:
        """JSON-friendly state: the config's buckets/arms (checked on load), RNG, windows, counts."""
        version, internal, gauss = self._rng.getstate()
        return {
            "version": 1,
            "policy": self.config.policy,
            "buckets": list(self.buckets),
            "arms": [[str(a) for a in self.bucket_arms(b)] for b in range(len(self.buckets))],
            "rng": [version, list(internal), gauss],
            "states": {f"{b}:{g}": st.to_dict() for (b, g), st in self._states.items()},
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        mine = self.state_dict()
        for key in ("buckets", "arms"):
            if list(state.get(key, [])) != mine[key]:
                raise ValueError(
                    f"bandit state was saved with {KEY}.{key} = {state.get(key)!r}, "
                    f"the current config has {mine[key]!r}"
                )
        version, internal, gauss = state["rng"]
        self._rng.setstate((version, tuple(internal), gauss))
        self._states = {}
        for key_str, st in state["states"].items():
            b, g = (int(x) for x in key_str.split(":"))
            new = _State(len(self.bucket_arms(b)), self.config.window, self.config.window_scope)
            new.load(st)
            self._states[(b, g)] = new


__all__ = [
    "ArmTable",
    "DEFAULT_ARMS",
    "DEFAULT_ARMS_CPU",
    "DEFAULT_BUCKETS",
    "DraftShapeBandit",
    "POLICIES",
    "batch_size_group",
    "bucketed_egreedy",
    "default_arms_for",
    "fixed",
    "parse_arm_table",
    "step_reward",
    "ucb1",
]
