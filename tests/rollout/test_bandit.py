"""Draft-shape bandit (rlspec.rollout.speculative.bandit) on synthetic noisy rewards with a known best arm."""

from __future__ import annotations

import json
import random

import pytest
import torch

from rlspec.errors import ConfigError
from rlspec.config import BanditConfig
from rlspec.rollout.speculative.bandit import (
    DEFAULT_ARMS,
    DEFAULT_BUCKETS,
    DraftShapeBandit,
    batch_size_group,
    parse_arm_table,
    step_reward,
)
from rlspec.rollout.speculative.draft_tree import ArmShape

torch.set_num_threads(1)

KEY = "rollout.speculative.bandit"


def simulate(bandit, means, steps, batch_sizes=(1,), noise=0.15, seed=0, start=0):
    """Pull ``steps`` times; ``means(t, batch_size) -> {arm: mean reward}``; Gaussian noise with a
    relative std of ``noise``. Returns the chosen arms (one per step)."""
    rng = random.Random(seed)
    chosen = []
    for t in range(start, start + steps):
        bs = batch_sizes[t % len(batch_sizes)]
        arm = bandit.select(bs)
        mu = means(t, bs)[arm]
        bandit.update(bs, arm, max(0.0, rng.gauss(mu, noise * mu)))
        chosen.append(arm)
    return chosen


def frac(chosen, arm):
    return sum(a == arm for a in chosen) / len(chosen)


def test_step_reward_is_tokens_per_second():
    # 1.5 accepted drafts per row + the bonus token = 2.5 tokens/row; 8 rows in 0.2 s -> 100 tokens/s
    assert step_reward(2.5, 8, 0.2) == pytest.approx(100.0)
    with pytest.raises(ValueError, match="wall_time_s"):
        step_reward(2.0, 1, 0.0)


def test_default_table_gives_every_bucket_several_valid_arms():
    table = parse_arm_table(BanditConfig())
    assert table.buckets == DEFAULT_BUCKETS == (1, 2, 5, 21)
    assert len(table.arms) == len(table.buckets)
    for arms in DEFAULT_ARMS:
        assert len(arms) > 1 and len(set(arms)) == len(arms)
        assert any(a.is_chain for a in arms) and all(a.problems() == [] for a in arms)
    # smaller drafts as the batch grows: the largest num_verify per bucket does not increase
    biggest = [max(a.num_verify for a in arms) for arms in DEFAULT_ARMS]
    assert biggest == sorted(biggest, reverse=True)


def test_bucket_lookup():
    b = DraftShapeBandit()
    assert [b.bucket_of(x) for x in (1, 2, 4, 5, 20, 21, 500)] == [0, 1, 1, 2, 2, 3, 3]
    assert b.arms_for(3) == DEFAULT_ARMS[1]
    with pytest.raises(ValueError, match="batch_size"):
        b.select(0)
    assert [batch_size_group(x) for x in (5, 33, 130, 1000)] == [5, 32, 128, 256]


ARMS3 = [["6_4_16", "4_2_8", "5_1_5"]] * 4
A0, A1, A2 = ArmShape(6, 4, 16), ArmShape(4, 2, 8), ArmShape(5, 1, 5)
MEANS = {A0: 50.0, A1: 100.0, A2: 30.0}  # A1 is best


@pytest.mark.parametrize("policy,min_frac", [("bucketed_egreedy", 0.8), ("ucb1", 0.6)])
def test_policies_converge_to_the_best_arm(policy, min_frac):
    b = DraftShapeBandit({"policy": policy, "arms": ARMS3, "seed": 1})
    chosen = simulate(b, lambda t, bs: MEANS, 1500)
    late = chosen[750:]
    print(f"{policy}: best-arm share in the last half = {frac(late, A1):.3f}")
    assert frac(late, A1) > min_frac
    assert frac(late, A1) > max(frac(late, A0), frac(late, A2))
    assert sum(b.histogram()[1].values()) == 1500


def test_fixed_policy_follows_the_table_whatever_the_rewards():
    b = DraftShapeBandit({"policy": "fixed", "arms": ARMS3})  # default table: first arm of each bucket
    assert set(simulate(b, lambda t, bs: MEANS, 100, batch_sizes=(1, 3, 9, 40))) == {A0}
    b2 = DraftShapeBandit({"policy": "fixed", "fixed_arms": ["5_1_5", "4_1_4", "3_1_3", "2_1_2"]})
    assert [b2.select(x) for x in (1, 3, 9, 40)] == [
        ArmShape(5, 1, 5),
        ArmShape(4, 1, 4),
        ArmShape(3, 1, 3),
        ArmShape(2, 1, 2),
    ]


def test_epsilon_exploration_pulls_the_other_arms():
    explore = DraftShapeBandit({"arms": ARMS3, "epsilon": 0.1, "seed": 2})
    greedy = DraftShapeBandit({"arms": ARMS3, "epsilon": 0.0, "seed": 2})
    late_e = simulate(explore, lambda t, bs: MEANS, 2000)[1000:]
    late_g = simulate(greedy, lambda t, bs: MEANS, 2000)[1000:]
    # epsilon 0.1 over 3 arms: each other arm gets ~1000 * 0.1 / 3 = 33 pulls
    assert sum(a == A0 for a in late_e) >= 15 and sum(a == A2 for a in late_e) >= 15
    # epsilon 0: only the window's forced re-tries (an arm absent from the last 300 pulls)
    assert sum(a != A1 for a in late_g) <= 10
    assert sum(a != A1 for a in late_e) > 3 * sum(a != A1 for a in late_g)


def test_buckets_learn_independently():
    b = DraftShapeBandit({"arms": ARMS3, "seed": 3})

    def means(t, bs):
        return MEANS if bs == 1 else {A0: 30.0, A1: 50.0, A2: 100.0}  # bucket 5..20 prefers A2

    chosen = simulate(b, means, 3000, batch_sizes=(1, 10))
    late_1, late_10 = chosen[1500::2], chosen[1501::2]
    assert frac(late_1, A1) > 0.8 and frac(late_10, A2) > 0.8
    hist = b.histogram()
    assert sum(hist[1].values()) == 1500 and sum(hist[5].values()) == 1500
    assert sum(hist[2].values()) == 0 and sum(hist[21].values()) == 0
    # pulls in one bucket leave the others untouched
    before = json.dumps(b.state_dict()["states"]["2:0"])
    simulate(b, means, 50, batch_sizes=(1,))
    assert json.dumps(b.state_dict()["states"]["2:0"]) == before


def test_sliding_window_follows_reward_drift():
    before = {A0: 100.0, A1: 60.0, A2: 40.0}
    after = {A0: 50.0, A1: 60.0, A2: 120.0}  # the best arm becomes one that was rarely pulled

    def means(t, bs):
        return before if t < 1500 else after

    b = DraftShapeBandit({"arms": ARMS3, "seed": 4})
    chosen = simulate(b, means, 2500)
    assert frac(chosen[1000:1500], A0) > 0.8
    assert frac(chosen[2000:], A2) > 0.8  # followed within 500 pulls
    # contrast: TLT's per-arm windows keep A2's stale rewards, so it has not switched yet
    tlt = DraftShapeBandit({"arms": ARMS3, "seed": 4, "window_scope": "arm"})
    chosen_tlt = simulate(tlt, means, 2500)
    print(
        f"drift: A2 share in the last 500 pulls: window_scope=bucket {frac(chosen[2000:], A2):.3f}, "
        f"arm {frac(chosen_tlt[2000:], A2):.3f}"
    )
    assert frac(chosen_tlt[2000:], A2) < 0.5


def test_group_by_batch_size_separates_batch_sizes_inside_a_bucket():
    def means(t, bs):  # inside bucket 5..20 the best arm depends on the batch size
        return {A0: 100.0, A1: 40.0, A2: 30.0} if bs == 5 else {A0: 30.0, A1: 40.0, A2: 100.0}

    b = DraftShapeBandit({"arms": ARMS3, "seed": 5, "group_by": "batch_size"})
    chosen = simulate(b, means, 3000, batch_sizes=(5, 20))
    assert frac(chosen[1500::2], A0) > 0.8 and frac(chosen[1501::2], A2) > 0.8
    assert set(b.state_dict()["states"]) == {"2:5", "2:20"}


def test_state_dict_round_trip_reproduces_the_run():
    cfg = {"arms": ARMS3, "seed": 6}
    a = DraftShapeBandit(cfg)
    simulate(a, lambda t, bs: MEANS, 300, batch_sizes=(1, 7))
    saved = json.loads(json.dumps(a.state_dict()))  # JSON-friendly
    b = DraftShapeBandit(BanditConfig(**cfg))
    b.load_state_dict(saved)
    assert b.histogram() == a.histogram()
    rest_a = simulate(a, lambda t, bs: MEANS, 200, batch_sizes=(1, 7), seed=9, start=300)
    rest_b = simulate(b, lambda t, bs: MEANS, 200, batch_sizes=(1, 7), seed=9, start=300)
    assert rest_a == rest_b
    with pytest.raises(ValueError, match=f"{KEY}.arms"):
        DraftShapeBandit().load_state_dict(saved)


def test_update_checks_arm_and_reward():
    b = DraftShapeBandit()
    with pytest.raises(ValueError, match="not an arm"):
        b.update(1, "3_1_3", 10.0)  # 3_1_3 belongs to larger buckets
    with pytest.raises(ValueError, match="reward"):
        b.update(1, "6_4_16", float("nan"))
    b.update(1, "6_4_16", 10.0)  # strings are accepted


@pytest.mark.parametrize(
    "cfg,match",
    [
        ({"buckets": [2, 5, 9, 30]}, f"{KEY}.buckets must start at 1"),
        ({"buckets": [1, 5, 5, 21]}, f"{KEY}.buckets must start at 1 and strictly increase"),
        ({"buckets": [1, 8]}, f"{KEY}.buckets has 2 buckets but the default {KEY}.arms has 4"),
        ({"buckets": "1,2"}, f"{KEY}.buckets must be a list"),
        ({"arms": [["6_4_16", "5_1_5"]]}, f"{KEY}.arms has 1 arm lists but {KEY}.buckets has 4"),
        (
            {"arms": [["6_4_16"], ["5_4_12", "4_1_4"], ["4_2_6", "3_1_3"], ["3_1_3", "2_1_2"]]},
            r"arms\[0\].*never explores",
        ),
        ({"arms": [["6_4_999", "5_1_5"]] * 4}, r"arms\[0\]\[0\] = '6_4_999': num_verify \(999\) >"),
        ({"arms": [["x", "5_1_5"]] * 4}, r"arms\[0\]\[0\] = 'x'"),
        ({"arms": [[3, 1, 3]] * 4}, r"arms\[0\] must be a list of arms"),
        ({"arms": [["5_1_5", "5_1_5"]] * 4}, r"arms\[0\] lists an arm twice"),
        ({"arms": {1: ARMS3[0], 3: ARMS3[0]}}, f"{KEY}.arms keys"),
        ({"epsilon": 1.5}, f"{KEY}.epsilon: must be a number in"),
        ({"window": 0}, f"{KEY}.window: must be an int"),
        ({"window_scope": "global"}, f"{KEY}.window_scope='global' is not valid"),
        ({"group_by": "bs"}, f"{KEY}.group_by='bs' is not valid"),
        ({"seed": "zero"}, f"{KEY}.seed must be an int"),
        ({"fixed_arms": ["5_1_5"]}, f"{KEY}.fixed_arms must list one arm per bucket"),
        ({"policy": "ucb"}, f"{KEY}.policy.*Did you mean 'ucb1'"),
        ({"windwo": 3}, f"unknown config key '{KEY}.windwo' \\(did you mean '{KEY}.window'"),
    ],
)
def test_bad_configs_name_the_key(cfg, match):
    with pytest.raises(ConfigError, match=match):
        DraftShapeBandit(cfg)


def test_config_accepts_mappings_lists_and_one_arm_tables_for_fixed():
    b = DraftShapeBandit({"buckets": [1, 3], "arms": {"1": ["4_2_6", [3, 1, 3]], "3": ["2_1_2", ArmShape(3, 2, 4)]}})
    assert b.arms_for(2) == (ArmShape(4, 2, 6), ArmShape(3, 1, 3)) and b.arms_for(3) == (
        ArmShape(2, 1, 2),
        ArmShape(3, 2, 4),
    )
    fixed = DraftShapeBandit({"policy": "fixed", "buckets": [1], "arms": [["5_1_5"]]})
    assert fixed.select(7) == ArmShape(5, 1, 5)
