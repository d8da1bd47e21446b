"""Max-rollout-length schedules: the truncation length ``L(t)`` used at training step ``t``.

In DLER, SIRI, ThinkPrune and DeepScaleR the length "penalty" is the rollout cap itself: a
response cut at ``L(t)`` has no final answer and scores 0 (reference §9.1). These schedules only
say what the cap is at each step; the rollout engine applies it.

Every schedule is a pure function ``fn(step: int, **kwargs) -> int`` registered in
:data:`LENGTH_SCHEDULES` under the name used in ``rollout.length_schedule.name``; its keyword
arguments come from ``rollout.length_schedule.kwargs``. ``step`` is the 0-based index of the
training step about to run (the first step is ``step=0``).

Rounding: schedules that produce a fractional length (the cosine pieces) round **half up**
(``floor(x + 0.5)``), after snapping ``x`` to 1e-6 so that ``cos`` rounding noise (``cos(pi/2)
= 6e-17``) cannot flip an exact ``.5`` downwards.

SIRI phases (arXiv 2509.25176, Sec. 4.3): a cycle of ``T`` steps starts at ``L_max``, compresses to
``L_min`` (reached at ``t = T/2``) and expands back (``L_max`` at ``t = T``). The 0-based steps
``t mod T in [0, T/2)`` form the compression phase and ``[T/2, T)`` the expansion phase; all three
SIRI shapes are non-increasing during compression and non-decreasing during expansion.
:func:`siri_phase_ends` tells the trainer when a phase has just finished, so it can tag the
checkpoints SIRI releases (``siri-low`` = end of a compression, ``siri-high`` = end of an expansion).
"""

from __future__ import annotations

import bisect
import inspect
import math
import numbers
from typing import Any, Callable, Mapping, Sequence

from rlspec.errors import ConfigError
from rlspec.registry import LENGTH_SCHEDULES


KWARGS_KEY = "rollout.length_schedule.kwargs"

PHASE_COMPRESS = "compress"
PHASE_EXPAND = "expand"
TAG_LOW = "siri-low"  # end of a compression phase (SIRI-low = "Iter3-Compressed")
TAG_HIGH = "siri-high"  # end of an expansion phase (SIRI-high = "Iter3-Expanded")


# ---------------------------------------------------------------------------------- helpers
def round_half_up(x: float) -> int:
    """Round to the nearest int, halves upwards (``12288.5 -> 12289``), after snapping to 1e-6.

    >>> round_half_up(12288.5), round_half_up(12288.4999999999), round_half_up(2.49)
    (12289, 12289, 2)
    """
    return int(math.floor(round(x, 6) + 0.5))


def _check_step(step: int, what: str = "step") -> int:
    if isinstance(step, bool) or not isinstance(step, numbers.Integral) or step < 0:
        raise ValueError(f"{what} must be a non-negative int (training steps count from 0), got {step!r}")
    return int(step)


def _positive_int(value: Any, key: str) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 1:
        raise ConfigError(f"{KWARGS_KEY}.{key} must be a positive integer number of tokens, got {value!r}")
    return int(value)


def _check_period(period: Any) -> int:
    if isinstance(period, bool) or not isinstance(period, numbers.Integral) or period < 2:
        raise ConfigError(
            f"{KWARGS_KEY}.period must be an integer >= 2 (the SIRI cycle length in steps; the paper uses 640), "
            f"got {period!r}"
        )
    if period % 2:
        raise ConfigError(
            f"{KWARGS_KEY}.period must be even so that the compression and expansion phases both last "
            f"period/2 steps, got {period}; use e.g. {period + 1}"
        )
    return int(period)


def _check_siri(l_max: Any, l_min: Any, period: Any) -> tuple[int, int, int]:
    l_max = _positive_int(l_max, "l_max")
    l_min = _positive_int(l_min, "l_min")
    if l_min > l_max:
        raise ConfigError(
            f"{KWARGS_KEY}.l_min must be <= {KWARGS_KEY}.l_max, got l_min={l_min} > l_max={l_max}; "
            "swap them (SIRI: l_max=16384, l_min=8192)"
        )
    return l_max, l_min, _check_period(period)


def _int_list(value: Any, key: str) -> list[Any]:
    if isinstance(value, (str, bytes, Mapping)) or not isinstance(value, Sequence):
        raise ConfigError(f"{KWARGS_KEY}.{key} must be a list of integers, got {value!r}")
    return list(value)  # list, tuple or omegaconf ListConfig


# ---------------------------------------------------------------------------------- schedules
@LENGTH_SCHEDULES.register("constant")
def constant(step: int, length: int) -> int:
    """A fixed cap, e.g. DLER's truncation length 4000 (arXiv 2510.15110, Sec. 4.1).

    >>> constant(123, length=4000)
    4000
    """
    _check_step(step)
    return _positive_int(length, "length")


@LENGTH_SCHEDULES.register("siri_cosine")
def siri_cosine(step: int, l_max: int, l_min: int, period: int) -> int:
    """SIRI cosine schedule (arXiv 2509.25176, Sec. 4.3; used for the released SIRI models).

    ``L(t) = (L_max + L_min)/2 + (L_max - L_min)/2 * cos(2 pi t / T)``, so ``L(0) = L_max``,
    ``L(T/2) = L_min`` and ``L(T) = L_max``. Rounded half up. Paper values: ``l_max=16384``,
    ``l_min=8192``, ``period=640``.

    >>> [siri_cosine(t, l_max=16384, l_min=8192, period=640) for t in (0, 160, 320, 480, 640)]
    [16384, 12288, 8192, 12288, 16384]
    """
    step = _check_step(step)
    l_max, l_min, period = _check_siri(l_max, l_min, period)
    r = step % period  # position in the cycle (keeps the cos argument small and exact at r = 0)
    mid, half = (l_max + l_min) / 2, (l_max - l_min) / 2
    return round_half_up(mid + half * math.cos(2 * math.pi * r / period))


@LENGTH_SCHEDULES.register("siri_stair")
def siri_stair(step: int, l_max: int, l_min: int, period: int) -> int:
    """SIRI stair schedule (arXiv 2509.25176, Sec. 4.3): a hard switch between ``L_max`` and ``L_min``.

    The paper only says "L_max during expansion, L_min during compression". Read literally with
    the compression half first, the cycle would *start* at ``L_min``, contradicting the cosine
    schedule (and reference §4.2), whose cycle starts at ``L_max``. We keep the cosine's phase:

        ``L = L_min  if  t mod T in [T/4, 3T/4)``, else ``L_max``.

    Why this choice: (i) it is the hard-switch limit of the cosine, switching where the cosine
    crosses the midpoint ``(L_max+L_min)/2`` (``t = T/4`` and ``3T/4``), so ``L(0) = L_max`` and
    ``L(T/2) = L_min`` as for the other shapes; (ii) it switches at the centre of the stair-cosine
    ramps (``phi = pi/2`` and ``3pi/2``), so it equals the stair-cosine on both its plateaus
    (``L_max`` for ``phi < pi/4`` or ``phi >= 7pi/4``, ``L_min`` for ``3pi/4 <= phi < 5pi/4``);
    (iii) it is non-increasing during the compression phase ``[0, T/2)`` and non-decreasing during
    the expansion phase ``[T/2, T)``, the two phases :func:`siri_phase` reports. Each cycle spends
    half its steps at ``L_max`` and half at ``L_min``. Boundaries are compared in integers (``4r``
    vs ``T``), so they are exact for every ``T``.

    >>> [siri_stair(t, l_max=16384, l_min=8192, period=640) for t in (0, 159, 160, 479, 480, 640)]
    [16384, 16384, 8192, 8192, 16384, 16384]
    """
    step = _check_step(step)
    l_max, l_min, period = _check_siri(l_max, l_min, period)
    r = step % period
    return l_min if period <= 4 * r < 3 * period else l_max


@LENGTH_SCHEDULES.register("siri_stair_cosine")
def siri_stair_cosine(step: int, l_max: int, l_min: int, period: int) -> int:
    """SIRI stair-cosine schedule (arXiv 2509.25176, Sec. 4.3), the paper's piecewise formula.

    With ``phi = 2 pi (t mod T) / T``, ``M = (L_max+L_min)/2``, ``H = (L_max-L_min)/2``::

        L = L_max                            if phi < pi/4 or phi >= 7pi/4
          = M + H cos(2(phi - pi/4))         if pi/4  <= phi < 3pi/4   (L_max -> L_min)
          = L_min                            if 3pi/4 <= phi < 5pi/4
          = M + H cos(2(phi - 3pi/4))        if 5pi/4 <= phi < 7pi/4   (L_min -> L_max)

    The piece is chosen with exact integer comparisons (``8r`` vs ``T``, ``3T``, ``5T``, ``7T``
    for ``r = t mod T``); the value is rounded half up. The function is continuous, so the
    boundaries only decide which formula gives the (equal) value.

    >>> [siri_stair_cosine(t, l_max=16384, l_min=8192, period=640) for t in (0, 80, 160, 240, 400, 480, 560)]
    [16384, 16384, 12288, 8192, 8192, 12288, 16384]
    """
    step = _check_step(step)
    l_max, l_min, period = _check_siri(l_max, l_min, period)
    r = step % period
    phi = 2 * math.pi * r / period
    mid, half = (l_max + l_min) / 2, (l_max - l_min) / 2
    eighths = 8 * r  # phi / (pi/4) * T
    if eighths < period or eighths >= 7 * period:
        return l_max
    if eighths < 3 * period:
        return round_half_up(mid + half * math.cos(2 * (phi - math.pi / 4)))
    if eighths < 5 * period:
        return l_min
    return round_half_up(mid + half * math.cos(2 * (phi - 3 * math.pi / 4)))


@LENGTH_SCHEDULES.register("staged")
def staged(step: int, lengths: Sequence[int], boundaries: Sequence[int]) -> int:
    """Piecewise-constant cap (ThinkPrune arXiv 2504.01296: 4000 -> 3000 -> 2000; DeepScaleR 8k -> 16k -> 24k).

    ``boundaries[i]`` is the 0-based step at which ``lengths[i+1]`` takes over from
    ``lengths[i]``: steps ``[0, b_0)`` use ``lengths[0]``, ``[b_0, b_1)`` use ``lengths[1]``, ...
    So ``len(boundaries) == len(lengths) - 1`` and the boundaries are strictly increasing and
    ``>= 1``. ThinkPrune restarts each round from the previous round's checkpoint; running the
    rounds back to back in one run is this schedule.

    >>> [staged(t, lengths=[4000, 3000, 2000], boundaries=[180, 360]) for t in (0, 179, 180, 359, 360)]
    [4000, 4000, 3000, 3000, 2000]
    """
    step = _check_step(step)
    lengths_l = _int_list(lengths, "lengths")
    bounds_l = _int_list(boundaries, "boundaries")
    if not lengths_l:
        raise ConfigError(f"{KWARGS_KEY}.lengths must list at least one length, e.g. [4000, 3000, 2000]")
    for i, length in enumerate(lengths_l):
        _positive_int(length, f"lengths[{i}]")
    if len(bounds_l) != len(lengths_l) - 1:
        raise ConfigError(
            f"{KWARGS_KEY}.boundaries must have one entry fewer than {KWARGS_KEY}.lengths "
            f"(the step where each next length starts), got {len(bounds_l)} boundaries for {len(lengths_l)} lengths"
        )
    for i, b in enumerate(bounds_l):
        if isinstance(b, bool) or not isinstance(b, numbers.Integral) or b < 1:
            raise ConfigError(f"{KWARGS_KEY}.boundaries[{i}] must be an integer step >= 1, got {b!r}")
    for i in range(1, len(bounds_l)):
        if bounds_l[i] <= bounds_l[i - 1]:
            raise ConfigError(
                f"{KWARGS_KEY}.boundaries must be strictly increasing (sorted, no repeats), got {bounds_l}"
            )
    return int(lengths_l[bisect.bisect_right(bounds_l, step)])


# ---------------------------------------------------------------------------------- SIRI phases
def siri_phase(step: int, period: int) -> str:
    """The SIRI phase of 0-based training step ``step``: ``"compress"`` or ``"expand"``.

    ``"compress"`` for ``step mod T in [0, T/2)`` (the cap is non-increasing), ``"expand"`` for
    ``[T/2, T)`` (non-decreasing). The cycle starts with compression (reference §4.2).

    >>> [siri_phase(t, 640) for t in (0, 319, 320, 639, 640)]
    ['compress', 'compress', 'expand', 'expand', 'compress']
    """
    step = _check_step(step)
    period = _check_period(period)
    return PHASE_COMPRESS if 2 * (step % period) < period else PHASE_EXPAND


def siri_phase_ends(step: int, period: int) -> str | None:
    """Checkpoint tag after ``step`` **completed** steps (1-based count), or None.

    ``"siri-low"`` when the compression phase has just ended (``step = T/2, 3T/2, ...``) and
    ``"siri-high"`` when an expansion phase has just ended (``step = T, 2T, ...``). Equivalently:
    the phase of the last 0-based step run (``step - 1``) differs from the next one's (``step``).
    SIRI releases the 3rd of each (``T = 640``): SIRI-low at step 1600, SIRI-high at 1920.

    >>> [siri_phase_ends(c, 640) for c in (0, 319, 320, 640, 1600, 1920)]
    [None, None, 'siri-low', 'siri-high', 'siri-low', 'siri-high']
    """
    step = _check_step(step, "completed steps")
    period = _check_period(period)
    if step == 0:
        return None
    r = step % period
    if 2 * r == period:
        return TAG_LOW
    if r == 0:
        return TAG_HIGH
    return None


# ---------------------------------------------------------------------------------- dispatch
def length_at(name: str, step: int, kwargs: Mapping[str, Any] | None = None) -> int:
    """Look up schedule ``name`` and return its cap at 0-based ``step``.

    Checks ``kwargs`` against the schedule's signature first, so a missing or misspelt key is a
    :class:`ConfigError` naming ``rollout.length_schedule.kwargs.<key>`` (not a TypeError).
    Calling it once at start-up (``step=0``) validates the whole config, since every schedule
    validates its arguments at every step.

    >>> length_at("siri_cosine", 320, {"l_max": 16384, "l_min": 8192, "period": 640})
    8192
    """
    fn: Callable[..., int] = LENGTH_SCHEDULES.get(name)
    kwargs = dict(kwargs or {})
    params = list(inspect.signature(fn).parameters.values())[1:]  # drop `step`
    names = [p.name for p in params]
    unknown = sorted(set(kwargs) - set(names))
    if unknown:
        raise ConfigError(
            f"unknown key(s) {', '.join(f'{KWARGS_KEY}.{k}' for k in unknown)} for length schedule {name!r}; "
            f"it takes: {', '.join(names)}"
        )
    missing = [p.name for p in params if p.default is inspect.Parameter.empty and p.name not in kwargs]
    if missing:
        raise ConfigError(
            f"length schedule {name!r} needs {', '.join(f'{KWARGS_KEY}.{k}' for k in missing)}; "
            f"it takes: {', '.join(names)}"
        )
    return fn(step, **kwargs)


SIRI_SCHEDULES = ("siri_cosine", "siri_stair", "siri_stair_cosine")


def checkpoint_tag(name: str | None, completed: int, kwargs: Mapping[str, Any] | None = None) -> str | None:
    """The tag of the checkpoint after ``completed`` steps under schedule ``name``: SIRI's
    ``siri-low`` / ``siri-high`` at the end of a compression / expansion phase, else None."""
    if name in SIRI_SCHEDULES:
        return siri_phase_ends(completed, int(dict(kwargs or {})["period"]))
    return None


# ---------------------------------------------------------------------------------- learning rate
def lr_factor(step: int, warmup_steps: int, schedule: str, total_steps: int) -> float:
    """The learning-rate multiplier at optimizer-schedule step ``step``: linear warm-up, then
    ``constant`` or ``cosine`` decay to 0 at ``total_steps``.

    >>> [round(lr_factor(s, 2, "cosine", 10), 3) for s in (0, 1, 2, 6, 10)]
    [0.5, 1.0, 1.0, 0.5, 0.0]
    """
    if warmup_steps and step < warmup_steps:
        return (step + 1) / warmup_steps
    if schedule == "cosine":
        progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))
    return 1.0
