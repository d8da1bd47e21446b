"""The pure maths of ``bench/roofline.py`` (interpolation, cost, regime, speculative bounds) against
hand-computed values. No model runs: importing the module loads neither torch nor rlspec."""

from __future__ import annotations

import doctest
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[2] / "bench"
sys.path.insert(0, str(BENCH))
import roofline
from roofline import (
    best_step_speedup,
    cost,
    feasible_qs,
    interpolate,
    profile_bound,
    profile_from_lengths,
    regime,
    step_ms,
    step_speedup,
)

# q -> rows -> ms: flat at few rows (extra query tokens nearly free), linear in q at 8 rows
GRID = {
    1: {1: 10.0, 2: 10.0, 8: 20.0},
    2: {1: 10.5, 2: 11.0, 8: 40.0},
    3: {1: 11.0, 2: 12.0, 8: 60.0},
    5: {1: 12.0, 2: 14.0, 8: 100.0},
}


def test_doctests_pass():
    result = doctest.testmod(roofline)
    assert result.attempted >= 10 and result.failed == 0


def test_interpolate_inside_and_at_points():
    pts = {1: 10.0, 2: 10.0, 8: 20.0}
    assert interpolate(pts, 1) == 10.0
    assert interpolate(pts, 8) == 20.0
    assert interpolate(pts, 5) == pytest.approx(15.0)  # halfway from 2 to 8
    assert interpolate(pts, 1.5) == pytest.approx(10.0)


def test_interpolate_extrapolates_with_the_end_segments():
    pts = {2: 4.0, 4: 6.0, 8: 14.0}
    assert interpolate(pts, 16) == pytest.approx(30.0)  # slope 2 per row past 8
    assert interpolate(pts, 1) == pytest.approx(3.0)  # slope 1 per row below 2
    with pytest.raises(ValueError):
        interpolate({}, 1)


def test_step_ms_and_cost():
    assert step_ms(GRID, 5, 5) == pytest.approx(57.0)  # 14 + (100 - 14) / 2
    assert cost(GRID, 8, 5) == pytest.approx(5.0)
    assert cost(GRID, 1, 5) == pytest.approx(1.2)
    assert cost(GRID, 5, 1) == 1.0


@pytest.mark.parametrize(
    "value, q, expected",
    [(1.0, 5, "overhead/memory"), (2.3, 5, "overhead/memory"), (2.4, 5, "mixed"), (3.6, 5, "mixed"),
     (3.7, 5, "compute"), (5.0, 5, "compute"), (1.9, 2, "compute"), (1.2, 2, "overhead/memory")],
)
def test_regime_thresholds(value, q, expected):
    assert regime(value, q) == expected


def test_regime_needs_a_wide_step():
    with pytest.raises(ValueError):
        regime(1.0, 1)


def test_step_speedup():
    assert step_speedup(10.0, 12.0, 1.5) == pytest.approx(1.25)
    assert step_speedup(20.0, 100.0, 3.0) == pytest.approx(0.6)


def test_feasible_qs_need_a_draft_and_room_for_a():
    assert feasible_qs([1, 2, 3, 5], 1.0) == [2, 3, 5]
    assert feasible_qs([5, 3, 2, 1], 2.0) == [2, 3, 5]
    assert feasible_qs([1, 2, 3, 5], 3.5) == [5]
    assert feasible_qs([1, 2], 3.0) == []


def test_best_step_speedup_picks_the_cheapest_feasible_chain():
    # rows 1: a=2 -> q=2: 2*10/10.5 = 1.905 (q=3: 1.818, q=5: 1.667)
    s, k = best_step_speedup(GRID, 1, 2.0)
    assert (s, k) == (pytest.approx(20 / 10.5), 1)
    # rows 1, a=3 needs q >= 3: q=3 gives 30/11
    assert best_step_speedup(GRID, 1, 3.0) == (pytest.approx(30 / 11), 2)
    # rows 8 (compute-bound): every chain loses at a=1.5: best is q=2, 1.5*20/40
    assert best_step_speedup(GRID, 8, 1.5) == (pytest.approx(0.75), 1)
    with pytest.raises(ValueError):
        best_step_speedup(GRID, 1, 6.0)


def test_profile_from_lengths():
    assert profile_from_lengths([4, 1, 2]) == [2, 1, 1]  # steps 1..3: len > 1, > 2, > 3
    assert profile_from_lengths([1, 1]) == []  # every response ended at the prefill's token
    assert profile_from_lengths([]) == []
    lengths = [5, 9, 9, 2, 7]
    profile = profile_from_lengths(lengths)
    assert sum(profile) == sum(n - 1 for n in lengths)  # one decode step per token after the first


def test_profile_bound_by_hand():
    profile = [8, 8, 2, 1]
    plain = 20 + 20 + 10 + 10
    # a = 2: per step min over q in {2, 3, 5} of T/2 -> rows 8: 40/2, rows 2: 11/2, rows 1: 10.5/2
    always = plain / (20 + 20 + 5.5 + 5.25)
    assert profile_bound(GRID, profile, 2.0) == pytest.approx(always)
    assert profile_bound(GRID, profile, 2.0, adaptive=True) == pytest.approx(plain / (20 + 20 + 5.5 + 5.25))
    # a = 1.2: speculation loses at 8 rows (40/1.2 > 20); adaptive decodes those steps plainly
    assert profile_bound(GRID, profile, 1.2) == pytest.approx(plain / ((40 + 40 + 11 + 10.5) / 1.2))
    adaptive = plain / (20 + 20 + 11 / 1.2 + 10.5 / 1.2)
    assert profile_bound(GRID, profile, 1.2, adaptive=True) == pytest.approx(adaptive)


def test_profile_bound_interpolates_rows_and_handles_empty_profiles():
    # rows 5 lies halfway between 2 and 8: T(5,1) = 15, T(5,2) = 25.5
    assert profile_bound(GRID, [5], 1.0) == pytest.approx(15 / 25.5)
    assert profile_bound(GRID, [], 2.0) == 1.0
    with pytest.raises(ValueError):
        profile_bound(GRID, [1], 7.0)


def test_profile_bound_at_acceptance_one_is_the_flat_cost():
    # a = 1 emits one token per step: the bound is plain / cheapest verify, <= 1
    assert profile_bound(GRID, [1, 1], 1.0) == pytest.approx(10 / 10.5)
    assert profile_bound(GRID, [1, 1], 1.0, adaptive=True) == 1.0
