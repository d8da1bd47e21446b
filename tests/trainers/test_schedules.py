"""Length schedules (SIRI arXiv 2509.25176 Sec. 4.3, ThinkPrune arXiv 2504.01296) against hand-computed values."""

import math

import pytest
from omegaconf import OmegaConf

from rlspec.errors import ConfigError
from rlspec.trainers.schedules import (
    LENGTH_SCHEDULES,
    constant,
    length_at,
    round_half_up,
    siri_cosine,
    siri_phase,
    siri_phase_ends,
    siri_stair,
    siri_stair_cosine,
    staged,
)

PAPER = dict(l_max=16384, l_min=8192, period=640)  # SIRI Sec. 4.3 / 5.1
SIRI = ("siri_cosine", "siri_stair", "siri_stair_cosine")


def test_registry_names():
    assert set(LENGTH_SCHEDULES.names()) == {"constant", "siri_cosine", "siri_stair", "siri_stair_cosine", "staged"}
    with pytest.raises(ConfigError, match="rollout.length_schedule.name.*Did you mean 'siri_cosine'"):
        LENGTH_SCHEDULES.get("siri_cosin")


def test_round_half_up():
    assert [round_half_up(x) for x in (0.5, 1.5, 2.5, 2.4999, -0.5)] == [1, 2, 3, 2, 0]


def test_constant():
    assert constant(0, length=4000) == constant(10_000, length=4000) == 4000
    with pytest.raises(ConfigError, match=r"rollout\.length_schedule\.kwargs\.length"):
        constant(0, length=0)


# ------------------------------------------------------------------------------------ cosine
def test_cosine_key_points():
    # L(t) = 12288 + 4096 cos(2 pi t / 640)
    assert siri_cosine(0, **PAPER) == 16384  # cos 0 = 1
    assert siri_cosine(320, **PAPER) == 8192  # cos pi = -1
    assert siri_cosine(640, **PAPER) == 16384  # cos 2pi = 1
    assert siri_cosine(160, **PAPER) == 12288  # cos pi/2 = 0
    # t = 80: 12288 + 4096 cos(pi/4) = 12288 + 2896.309 = 15184.309 -> 15184
    assert siri_cosine(80, **PAPER) == 15184
    # t = 1: 12288 + 4096 cos(2pi/640) = 12288 + 4095.803 = 16383.803 -> 16384
    assert siri_cosine(1, **PAPER) == 16384
    # t = 3: 4096 cos(6pi/640) = 4094.224 -> 16382.224 -> 16382
    assert siri_cosine(3, **PAPER) == 16382
    # later cycles repeat
    assert siri_cosine(1280 + 320, **PAPER) == 8192 and siri_cosine(1920, **PAPER) == 16384


def test_cosine_rounds_half_up():
    # l_max + l_min odd: midpoint 12.5 at t = T/4 and 3T/4 (cos = +6e-17 / -1.8e-16) -> 13 both times
    assert siri_cosine(2, l_max=15, l_min=10, period=8) == 13
    assert siri_cosine(6, l_max=15, l_min=10, period=8) == 13


@pytest.mark.parametrize("name", SIRI)
def test_siri_shapes_start_at_lmax_hit_lmin_at_half_and_return(name):
    fn = LENGTH_SCHEDULES.get(name)
    for cycle in range(3):
        base = cycle * PAPER["period"]
        assert fn(base, **PAPER) == 16384
        assert fn(base + 320, **PAPER) == 8192
    assert fn(1920, **PAPER) == 16384


@pytest.mark.parametrize("name", SIRI)
@pytest.mark.parametrize("period", [8, 10, 640])
def test_siri_monotone_within_phases(name, period):
    fn = LENGTH_SCHEDULES.get(name)
    lengths = [fn(t, l_max=16384, l_min=8192, period=period) for t in range(2 * period)]
    phases = [siri_phase(t, period) for t in range(2 * period)]
    for t in range(1, 2 * period):
        if phases[t] != phases[t - 1]:
            continue
        if phases[t] == "compress":
            assert lengths[t] <= lengths[t - 1], (t, lengths[t - 1], lengths[t])
        else:
            assert lengths[t] >= lengths[t - 1], (t, lengths[t - 1], lengths[t])
    assert all(8192 <= x <= 16384 for x in lengths)


# ------------------------------------------------------------------------------------ stair
def test_stair_switch_points():
    # L_min exactly for t mod 640 in [160, 480)
    got = {t: siri_stair(t, **PAPER) for t in (0, 159, 160, 320, 479, 480, 639, 640, 799, 800)}
    assert got == {0: 16384, 159: 16384, 160: 8192, 320: 8192, 479: 8192, 480: 16384, 639: 16384,
                   640: 16384, 799: 16384, 800: 8192}
    # half the cycle at each level
    cycle = [siri_stair(t, **PAPER) for t in range(640)]
    assert cycle.count(8192) == cycle.count(16384) == 320


# ------------------------------------------------------------------------------------ stair-cosine
def test_stair_cosine_hand_values():
    # T = 640: phi = pi/4 at r = 80, 3pi/4 at 240, 5pi/4 at 400, 7pi/4 at 560
    val = lambda t: siri_stair_cosine(t, **PAPER)  # noqa: E731
    assert val(0) == val(79) == 16384  # first plateau
    assert val(80) == 16384  # ramp start: 12288 + 4096 cos(0)
    # r = 81: phi - pi/4 = 2pi/640; 12288 + 4096 cos(4pi/640) = 12288 + 4095.211 = 16383.211 -> 16383
    assert val(81) == 16383
    # r = 120: cos(2 * pi/8) = cos(pi/4) -> 15184.309 -> 15184
    assert val(120) == 15184
    assert val(160) == 12288  # cos(pi/2) = 0
    # r = 239: cos(2 * (2pi*239/640 - pi/4)) = cos(318pi/320) = -0.999807 -> 12288 - 4095.211 = 8192.789 -> 8193
    assert val(239) == 8193
    assert val(240) == val(320) == val(399) == 8192  # L_min plateau [3pi/4, 5pi/4)
    assert val(400) == 8192  # ramp start: 12288 + 4096 cos(2(5pi/4 - 3pi/4)) = 12288 - 4096
    assert val(401) == 8193  # 12288 + 4096 cos(pi + 4pi/640) = 8192.789 -> 8193
    assert val(480) == 12288  # cos(2(3pi/2 - 3pi/4)) = cos(3pi/2) = 0
    assert val(559) == 16383  # cos(2pi - 4pi/640) -> 16383.211
    assert val(560) == val(639) == val(640) == 16384  # L_max plateau phi >= 7pi/4, then next cycle


def test_stair_cosine_matches_the_formula_everywhere():
    l_max, l_min, T = 16384, 8192, 640
    for t in range(T):
        phi = 2 * math.pi * t / T
        if phi < math.pi / 4 - 1e-12 or phi >= 7 * math.pi / 4 - 1e-12:
            ref = l_max
        elif phi < 3 * math.pi / 4 - 1e-12:
            ref = 12288 + 4096 * math.cos(2 * (phi - math.pi / 4))
        elif phi < 5 * math.pi / 4 - 1e-12:
            ref = l_min
        else:
            ref = 12288 + 4096 * math.cos(2 * (phi - 3 * math.pi / 4))
        assert abs(siri_stair_cosine(t, l_max, l_min, T) - ref) <= 0.5 + 1e-6, t


def test_stair_equals_stair_cosine_on_its_plateaus():
    T = 640
    for t in range(T):
        eighths = 8 * t
        if eighths < T or eighths >= 7 * T or 3 * T <= eighths < 5 * T:
            assert siri_stair(t, **PAPER) == siri_stair_cosine(t, **PAPER), t


def test_continuity_of_stair_cosine_and_cosine():
    for fn in (siri_cosine, siri_stair_cosine):
        seq = [fn(t, **PAPER) for t in range(1281)]
        assert max(abs(a - b) for a, b in zip(seq, seq[1:])) <= 81  # 4096 * 4pi/640 = 80.4 per step at most


# ------------------------------------------------------------------------------------ phases
def test_phase_and_phase_ends():
    T = 640
    assert siri_phase(0, T) == "compress" and siri_phase(319, T) == "compress"
    assert siri_phase(320, T) == "expand" and siri_phase(639, T) == "expand" and siri_phase(640, T) == "compress"
    tags = {c: siri_phase_ends(c, T) for c in range(0, 3 * T + 1) if siri_phase_ends(c, T)}
    assert tags == {320: "siri-low", 640: "siri-high", 960: "siri-low", 1280: "siri-high",
                    1600: "siri-low", 1920: "siri-high"}  # SIRI-low = step 1600, SIRI-high = 1920
    # a tag exactly when the phase of the last step run (c - 1) differs from the next (c)
    for c in range(1, 3 * T):
        changed = siri_phase(c - 1, T) != siri_phase(c, T)
        assert (siri_phase_ends(c, T) is not None) == changed


def test_phase_of_last_step_at_tags():
    # the checkpoint tagged siri-low was trained at the end of compression, just above L_min
    assert siri_phase(319, 640) == "compress" and siri_cosine(319, **PAPER) < 8192 + 5
    assert siri_phase(639, 640) == "expand" and siri_cosine(639, **PAPER) > 16384 - 5


# ------------------------------------------------------------------------------------ staged
def test_staged_thinkprune():
    kw = dict(lengths=[4000, 3000, 2000], boundaries=[180, 300])
    assert [staged(t, **kw) for t in (0, 179, 180, 299, 300, 10_000)] == [4000, 4000, 3000, 3000, 2000, 2000]
    assert staged(5, lengths=[8192], boundaries=[]) == 8192
    # DeepScaleR grows the cap; omegaconf lists work too
    cfg = OmegaConf.create({"lengths": [8192, 16384, 24576], "boundaries": [1040, 1520]})
    assert staged(1040, lengths=cfg.lengths, boundaries=cfg.boundaries) == 16384


@pytest.mark.parametrize(
    "kwargs, key",
    [
        (dict(lengths=[4000, 3000, 2000], boundaries=[300, 180]), "kwargs.boundaries must be strictly increasing"),
        (dict(lengths=[4000, 3000, 2000], boundaries=[180, 180]), "kwargs.boundaries must be strictly increasing"),
        (dict(lengths=[4000, 3000], boundaries=[180, 300]), "kwargs.boundaries must have one entry fewer"),
        (dict(lengths=[4000, 3000], boundaries=[0]), r"kwargs\.boundaries\[0\] must be an integer step >= 1"),
        (dict(lengths=[4000, -1], boundaries=[5]), r"kwargs\.lengths\[1\] must be a positive integer"),
        (dict(lengths=[], boundaries=[]), "kwargs.lengths must list at least one"),
        (dict(lengths="4000", boundaries=[]), "kwargs.lengths must be a list"),
    ],
)
def test_staged_errors(kwargs, key):
    with pytest.raises(ConfigError, match="rollout.length_schedule." + key):
        staged(0, **kwargs)


# ------------------------------------------------------------------------------------ errors
@pytest.mark.parametrize("name", SIRI)
def test_siri_config_errors(name):
    fn = LENGTH_SCHEDULES.get(name)
    with pytest.raises(ConfigError, match=r"rollout\.length_schedule\.kwargs\.l_min must be <= .*l_max"):
        fn(0, l_max=8192, l_min=16384, period=640)
    for bad in (1, 0, -4):
        with pytest.raises(ConfigError, match=r"rollout\.length_schedule\.kwargs\.period must be an integer >= 2"):
            fn(0, l_max=16384, l_min=8192, period=bad)
    with pytest.raises(ConfigError, match=r"rollout\.length_schedule\.kwargs\.period must be even"):
        fn(0, l_max=16384, l_min=8192, period=641)
    with pytest.raises(ConfigError, match=r"rollout\.length_schedule\.kwargs\.l_max must be a positive integer"):
        fn(0, l_max=16384.0, l_min=8192, period=640)
    with pytest.raises(ValueError, match="step must be a non-negative int"):
        fn(-1, **PAPER)


def test_l_min_equal_l_max_is_constant():
    assert {siri_cosine(t, 4000, 4000, 10) for t in range(20)} == {4000}


def test_period_errors_in_phase_helpers():
    with pytest.raises(ConfigError, match="kwargs.period"):
        siri_phase(0, 1)
    with pytest.raises(ConfigError, match="kwargs.period"):
        siri_phase_ends(3, 0)


def test_length_at_dispatch_and_key_errors():
    assert length_at("siri_stair", 200, PAPER) == 8192
    assert length_at("constant", 3, {"length": 4000}) == 4000
    with pytest.raises(ConfigError, match=r"unknown key\(s\) rollout\.length_schedule\.kwargs\.lmax"):
        length_at("siri_cosine", 0, {"lmax": 1, "l_min": 1, "period": 4})
    with pytest.raises(ConfigError, match=r"needs rollout\.length_schedule\.kwargs\.period"):
        length_at("siri_cosine", 0, {"l_max": 2, "l_min": 1})
    with pytest.raises(ConfigError, match="rollout.length_schedule.name"):
        length_at("cosine", 0, {})
