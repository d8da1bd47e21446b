"""Efficiency rewards (rlspec.rewards.<method>) against values computed by hand from each formula."""

import json
import math

import pytest
from omegaconf import OmegaConf

import rlspec.rewards  # noqa: F401  (the import must register the length terms)
from rlspec.errors import ConfigError
from rlspec.rewards import REWARD_TERMS, RewardBatch, score_batch
from rlspec.rewards.cosine import COSINE_CODE_MARGIN, cosine_length_reward
from rlspec.rewards.dapo import dapo_overlong_penalty
from rlspec.rewards.dler import difficulty_aware_truncation_lengths
from rlspec.rewards.grpo_lambda import grpo_lambda_reward, grpo_lambda_select_groups, tlmre_length_reward
from rlspec.rewards.hapo import HapoHistory, hapo_length_reward, hapo_length_rewards
from rlspec.rewards.hbpo import hbpo_f1, hbpo_f2, hbpo_parse_budget, hbpo_reward, hbpo_well_formed
from rlspec.rewards.kimi import kimi_length_reward
from rlspec.rewards.l1 import l1_exact_reward, l1_max_reward, l1_prompt_suffix
from rlspec.rewards.palu import palu_update_budget

LENGTH_TERMS = {"dapo_overlong", "kimi_length", "cosine", "l1_exact", "l1_max", "tlmre_length", "grpo_lambda"}


def make_batch(lengths, correct, group_ids, finish=None, columns=None):
    n = len(lengths)
    return RewardBatch(
        prompts=[f"q{g}" for g in group_ids],
        completions=["..."] * n,
        completion_ids=[[7] * L for L in lengths],
        finish_reasons=finish or ["stop"] * n,
        answers=["4"] * n,
        correct=list(correct),
        group_ids=list(group_ids),
        columns=columns or {},
    )


def empty_batch(columns=None):
    return RewardBatch(prompts=[], completions=[], completion_ids=[], finish_reasons=[], answers=[], correct=[],
                       group_ids=[], columns=columns or {})


def approx(values, abs=1e-9):
    return pytest.approx(values, abs=abs)


# ---------------------------------------------------------------------------------------- DAPO
def test_dapo_overlong_hand_values():
    # L_max=20, L_cache=4: free up to 16, linear -(L-16)/4 on (16, 20], -1 beyond.
    lengths = [0, 10, 16, 17, 18, 19, 20, 21, 100]
    assert dapo_overlong_penalty(lengths, 20, 4) == approx([0, 0, 0, -0.25, -0.5, -0.75, -1.0, -1.0, -1.0])
    assert dapo_overlong_penalty(lengths, 20, 4, factor=0.5) == approx([0, 0, 0, -0.125, -0.25, -0.375, -0.5, -0.5,
                                                                         -0.5])
    # DAPO defaults: L_max=20480, L_cache=4096 -> 18432 is 2048 tokens into the buffer: -0.5.
    assert dapo_overlong_penalty([16384, 18432, 20480], 20480, 4096) == approx([0.0, -0.5, -1.0])
    # verl's min(-(L - (L_max - L_cache)) / L_cache * factor, 0) agrees inside [0, L_max].
    for L in range(0, 21):
        assert dapo_overlong_penalty([L], 20, 4, 0.7)[0] == pytest.approx(min(-(L - 16) / 4 * 0.7, 0.0))
    assert all(math.copysign(1.0, v) == 1.0 for v in dapo_overlong_penalty([0, 5], 20, 4, 0.0))  # no -0.0
    assert dapo_overlong_penalty([], 20, 4) == []


def test_correctness_term_values_are_settable():
    """DAPO's rule-based reward (arXiv 2503.14476 Eq. 1; verl's math_dapo) is +1 / -1, not 1 / 0."""
    batch = make_batch([5, 5, 5], [True, False, True], [0, 0, 0])
    assert score_batch(batch, {"correctness": {}})[0] == [1.0, 0.0, 1.0]
    assert score_batch(batch, {"correctness": {"kwargs": {"incorrect_reward": -1.0}}})[0] == [1.0, -1.0, 1.0]
    assert score_batch(batch, {"correctness": {"kwargs": {"correct_reward": 2.0, "incorrect_reward": 0.5}}})[0] == [
        2.0, 0.5, 2.0]
    with pytest.raises(ConfigError, match="reward.terms.correctness.kwargs.correct_reward"):
        score_batch(batch, {"correctness": {"kwargs": {"correct_reward": float("nan")}}})


def test_dapo_recipe_reward_is_plus_minus_one_plus_the_soft_overlong_penalty():
    """The dapo recipe's total reward is DAPO's: +1 correct / -1 wrong (Eq. 1), plus R_len (Eq. 13)
    with L_max = 256 and L_cache = 51, so a wrong answer at L_max scores -2 and a correct one 0."""
    from conftest import compose_config

    from rlspec.rewards import build_reward_terms

    cfg = compose_config(["+recipe=dapo"])
    terms = build_reward_terms(cfg.reward)
    lengths = [10, 205, 206, 230, 256, 10, 205, 230, 256]
    correct = [True] * 5 + [False] * 4
    totals, _ = score_batch(make_batch(lengths, correct, [0] * 5 + [1] * 4), terms)

    def r_len(n):  # Eq. 13
        return 0.0 if n <= 256 - 51 else ((256 - 51) - n) / 51 if n <= 256 else -1.0

    assert totals == approx([(1.0 if c else -1.0) + r_len(n) for n, c in zip(lengths, correct)])
    assert totals[0] == 1.0 and totals[4] == pytest.approx(0.0) and totals[5] == -1.0 and totals[8] == approx(-2.0)


@pytest.mark.parametrize("kwargs, match", [
    (dict(max_len=0, cache_len=1), "max_len must be an int >= 1"),
    (dict(max_len=10, cache_len=11), "cache_len must be <= max_len=10"),
    (dict(max_len=10, cache_len=2, factor=-1.0), "factor must be a number >= 0"),
    (dict(max_len=10.5, cache_len=2), "max_len must be an int"),
])
def test_dapo_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        dapo_overlong_penalty([1], **kwargs)
    with pytest.raises(ValueError, match=r"lengths\[0\] must be a non-negative int"):
        dapo_overlong_penalty([-1], 10, 2)


# ---------------------------------------------------------------------------------------- Kimi
def test_kimi_hand_values():
    # group 0: lengths 10, 20, 30 -> lambda = 0.5 - (L-10)/20 = 0.5, 0.0, -0.5
    #   correct -> lambda; wrong (the 20) -> min(0, 0.0) = 0
    # group 1: lengths 10, 30 both wrong -> lambda 0.5, -0.5 -> min(0, .) = 0, -0.5
    # group 2: lengths 40, 10, 25 -> lambda = 0.5 - (L-10)/30 = -0.5, 0.5, 0.0; all correct
    lengths = [10, 20, 30, 10, 30, 40, 10, 25]
    correct = [True, False, True, False, False, True, True, True]
    groups = [0, 0, 0, 1, 1, 2, 2, 2]
    assert kimi_length_reward(lengths, correct, groups) == approx([0.5, 0.0, -0.5, 0.0, -0.5, -0.5, 0.5, 0.0])


def test_kimi_edge_cases():
    assert kimi_length_reward([], [], []) == []
    assert kimi_length_reward([12, 12, 12], [True, False, True], [3, 3, 3]) == [0.0, 0.0, 0.0]  # max == min
    assert kimi_length_reward([99], [True], ["solo"]) == [0.0]  # single-element group
    # groups are independent even when interleaved
    assert kimi_length_reward([10, 5, 20, 5], [True, True, True, True], [0, 1, 0, 1]) == approx([0.5, 0, -0.5, 0])
    with pytest.raises(ValueError, match="one entry per completion"):
        kimi_length_reward([1, 2], [True], [0, 0])


# -------------------------------------------------------------------------------------- cosine
def test_cosine_hand_values():
    # r = r_L + 0.5 (r_0 - r_L)(1 + cos(pi L / T)), T = 100.
    # correct: r_0=2, r_L=1.  L=0 -> 2;  L=50 -> 1 + 0.5*1*(1+0) = 1.5;
    #          L=25 -> 1 + 0.5*(1 + cos(pi/4)) = 1 + 0.5*(1 + 0.70710678) = 1.85355339
    # wrong:   r_0=-10, r_L=0.  L=0 -> -10;  L=50 -> 0 + 0.5*(-10)*(1+0) = -5;
    #          L=75 -> -5*(1 + cos(3pi/4)) = -5*(1 - 0.70710678) = -1.46446609
    # truncated, or L >= T -> r_exceed = -10
    lengths = [0, 50, 25, 0, 50, 75, 40, 100, 99]
    correct = [True, True, True, False, False, False, True, True, True]
    truncated = [False] * 6 + [True, False, False]
    out = cosine_length_reward(lengths, correct, truncated, max_len=100)
    half = 0.5 * (1 + math.cos(math.pi * 99 / 100))  # L=99: 1 + 0.5*(1 + cos(0.99 pi)) = 1.000247
    assert out == approx([2.0, 1.5, 1.85355339, -10.0, -5.0, -1.46446609, -10.0, -10.0, 1.0 + half], abs=1e-7)


def test_cosine_code_margin_and_constants():
    # released code: exceed when L + 16 >= max_len. L=84 -> 100 >= 100: exceed; L=83 -> cosine
    # L=83 correct: 1 + 0.5*(1 + cos(0.83 pi)) = 1 + 0.5*(1 - 0.86074203) = 1.06962899
    out = cosine_length_reward([84, 83], [True, True], [False, False], 100, exceed_margin=COSINE_CODE_MARGIN)
    assert out == approx([-10.0, 1.06962899], abs=1e-7)
    # custom constants: correct 1 -> 0.5 and wrong -1 -> -0.1 over T=10, exceed -2
    # L=5: correct 0.5 + 0.5*0.5*1 = 0.75; wrong -0.1 + 0.5*(-0.9)*1 = -0.55
    out = cosine_length_reward([5, 5, 3], [True, False, True], [False, False, True], 10, 1.0, 0.5, -1.0, -0.1, -2.0)
    assert out == approx([0.75, -0.55, -2.0])
    assert cosine_length_reward([], [], [], 10) == []
    with pytest.raises(ValueError, match="r_exceed must be a finite number"):
        cosine_length_reward([1], [True], [False], 10, r_exceed=math.nan)


# ------------------------------------------------------------------------------------------ L1
def test_l1_hand_values():
    # exact: 1[c] - 0.0003 |n_gold - n|: (T,1200,1000) -> 1 - 0.06 = 0.94; (F,500,1000) -> -0.15;
    #        (T,1000,1000) -> 1
    assert l1_exact_reward([True, False, True], [1200, 500, 1000], [1000, 1000, 1000]) == approx([0.94, -0.15, 1.0])
    # code constant alpha = 1/3000: (T, 1300, 1000) -> 1 - 300/3000 = 0.9
    assert l1_exact_reward([True], [1300], [1000], alpha=1 / 3000) == approx([0.9])
    # max: 1[c] clip(0.0003 (n_gold - n) + 0.5, 0, 1):
    #   (T,1200,1000) -> 0.5 - 0.06 = 0.44;  (T,0,4000) -> 1.2 + 0.5 -> 1;  (T,3000,1000) -> -0.1 -> 0;
    #   (T,1000,1000) -> 0.5;  (F,10,1000) -> 0
    assert l1_max_reward([True] * 4 + [False], [1200, 0, 3000, 1000, 10], [1000, 4000, 1000, 1000, 1000]) == approx(
        [0.44, 1.0, 0.0, 0.5, 0.0])
    # released code (alpha = 1/1000): (T, 1200, 1000) -> 0.5 - 0.2 = 0.3
    assert l1_max_reward([True], [1200], [1000], alpha=0.001) == approx([0.3])
    assert l1_exact_reward([], [], []) == [] and l1_max_reward([], [], []) == []
    assert l1_exact_reward([True], [10], [10.0]) == [1.0]  # integral floats (parquet) are accepted
    with pytest.raises(ValueError, match=r"target_lengths\[0\] must be a positive int"):
        l1_exact_reward([True], [10], [0])


def test_l1_prompt_suffix():
    assert l1_prompt_suffix(1024) == "Think for 1024 tokens."
    assert l1_prompt_suffix(512, max_budget=True) == "Think for maximum 512 tokens."
    with pytest.raises(ValueError, match="target must be an int >= 1"):
        l1_prompt_suffix(0)


# ------------------------------------------------------------------------------- TLMRE, GRPO-λ
def test_tlmre_hand_values():
    # group 0: correct lengths 10, 20, 30: mean 20, population std sqrt(200/3) = 8.1650;
    #   z = -10/8.1650 = -sqrt(1.5), 0, +sqrt(1.5); r = 1 - 0.5 sigmoid(z); the wrong 40 -> 0
    # group 1: one correct (std 0) -> z = 0 -> 1 - 0.5*0.5 = 0.75; wrong -> 0
    # group 2: no correct -> 0, 0
    # group 3: two correct of equal length (std 0) -> 0.75 each
    s = math.sqrt(1.5)
    sig = lambda x: 1 / (1 + math.exp(-x))  # noqa: E731
    lengths = [10, 20, 30, 40, 7, 3, 5, 6, 9, 9]
    correct = [True, True, True, False, True, False, False, False, True, True]
    groups = [0, 0, 0, 0, 1, 1, 2, 2, 3, 3]
    expected = [1 - 0.5 * sig(-s), 0.75, 1 - 0.5 * sig(s), 0.0, 0.75, 0.0, 0.0, 0.0, 0.75, 0.75]
    assert tlmre_length_reward(correct, lengths, groups, 0.5) == approx(expected)
    assert expected[0] == pytest.approx(0.886449, abs=1e-6)  # 1 - 0.5 * 0.227102
    assert tlmre_length_reward(correct, lengths, groups, 0.0) == [float(c) for c in correct]  # alpha 0: plain 0/1
    assert tlmre_length_reward([], [], [], 0.3) == []
    with pytest.raises(ValueError, match=r"alpha must be a number in \[0.0, 1.0\]"):
        tlmre_length_reward([True], [1], [0], 1.5)


def test_grpo_lambda_selection():
    # ratios: g0 1/4, g1 3/4, g2 2/4, g3 3/4, g4 0/4 (5 groups)
    correct = [1, 0, 0, 0] + [1, 1, 1, 0] + [1, 1, 0, 0] + [0, 1, 1, 1] + [0, 0, 0, 0]
    groups = [g for g in range(5) for _ in range(4)]
    assert grpo_lambda_select_groups(correct, groups, 0.4) == {1, 3}  # k = floor(0.4*5) = 2
    assert grpo_lambda_select_groups(correct, groups, 0.2) == {1}  # k = 1; tie 1 vs 3 -> smaller id
    assert grpo_lambda_select_groups(correct, groups, 0.6) == {1, 2, 3}  # k = 3
    assert grpo_lambda_select_groups(correct, groups, 0.1) == set()  # k = floor(0.5) = 0
    assert grpo_lambda_select_groups(correct, groups, 1.0) == {0, 1, 2, 3, 4}
    # 0.3 * 10 = 3.0000000000000004 and 0.29 * 100 = 28.999999999999996 snap to 3 and 29
    assert len(grpo_lambda_select_groups([1] * 10, list(range(10)), 0.3)) == 3
    assert len(grpo_lambda_select_groups([1] * 100, list(range(100)), 0.29)) == 29
    # tie-break does not depend on the order the groups appear in
    assert grpo_lambda_select_groups([1, 1], [9, 2], 0.5) == {2}
    assert grpo_lambda_select_groups([], [], 0.2) == set()


def test_grpo_lambda_reward_hand_values():
    # g0: correct [1, 1, 0], lengths [10, 30, 5] -> ratio 2/3, selected (k = floor(0.5 * 2) = 1)
    #     correct lengths 10, 30: mean 20, std 10, z = -1, +1 -> 1 - 0.6 sigmoid(-1) = 0.838635,
    #     1 - 0.6 sigmoid(1) = 0.561365; wrong -> 0
    # g1: ratio 1/3, not selected -> plain 1, 0, 0
    out = grpo_lambda_reward([1, 1, 0, 1, 0, 0], [10, 30, 5, 10, 30, 5], [0, 0, 0, 1, 1, 1], 0.5, 0.6)
    assert out == approx([1 - 0.6 / (1 + math.e), 1 - 0.6 / (1 + math.exp(-1)), 0.0, 1.0, 0.0, 0.0])
    assert out[0] == pytest.approx(0.838635, abs=1e-6)
    # nothing selected -> exactly the 0/1 reward
    assert grpo_lambda_reward([1, 0, 1], [5, 6, 7], [0, 0, 1], top_lambda=0.0) == [1.0, 0.0, 1.0]


# ---------------------------------------------------------------------------------------- HAPO
def test_hapo_hand_values():
    # h = 100: c = cos(L/100 * pi/2) for L < 200, else -1
    #   L=50:  c = cos(pi/4) = 0.70711 -> correct 0.70711, wrong min(0, c) = 0
    #   L=100: c = cos(pi/2) = 0       -> 0 both
    #   L=150: c = cos(3pi/4) = -0.70711 -> correct max(-0.7, c) = -0.7, wrong -0.70711
    #   L=200: c = -1 -> correct -0.7, wrong -1;  L=0: c = 1 -> correct 1, wrong 0
    r = math.sqrt(0.5)
    cases = [(50, True, r), (50, False, 0.0), (100, True, 0.0), (100, False, 0.0), (150, True, -0.7),
             (150, False, -r), (200, True, -0.7), (200, False, -1.0), (0, True, 1.0), (0, False, 0.0)]
    for length, ok, expected in cases:
        assert hapo_length_reward(length, ok, 100) == pytest.approx(expected, abs=1e-12), (length, ok)
    assert hapo_length_reward(50, True, 100, w=0.5) == pytest.approx(0.5 * r)
    assert hapo_length_reward(50, True, None) == 0.0  # no history yet
    assert hapo_length_reward(50, False, 0) == 0.0  # the code treats h <= 0 as no history


def test_hapo_history_update_and_checkpoint_roundtrip():
    history = HapoHistory()
    uids = ["p1", "p1", "p2", "p3"]
    # first batch: no history -> all 0; then record min correct length: p1 -> 80, p2 -> 40, p3 none
    assert hapo_length_rewards(uids, [100, 80, 40, 10], [True, True, True, False], history) == [0.0] * 4
    history.update(uids, [100, 80, 40, 10], [True, True, True, False])
    assert (history.get("p1"), history.get("p2"), history.get("p3")) == (80, 40, None)
    # second batch: p1 at 40 (h=80): cos(pi/4) = 0.70711; p2 at 60 (h=40) wrong: cos(3pi/4) = -0.70711
    out = hapo_length_rewards(["p1", "p2"], [40, 60], [True, False], history)
    assert out == approx([math.sqrt(0.5), -math.sqrt(0.5)])
    history.update(["p1", "p2"], [40, 60], [True, False])
    assert history.get("p1") == 40 and history.get("p2") == 40  # min only moves down; wrong ignored

    restored = HapoHistory()
    restored.load_state_dict(json.loads(json.dumps(history.state_dict())))  # through JSON, as in a checkpoint
    assert restored.state_dict() == history.state_dict() == {"version": 1,
                                                             "min_correct_length": {"p1": 40, "p2": 40}}
    assert len(restored) == 2 and "p1" in restored
    with pytest.raises(ValueError, match="prompt ids must be strings"):
        history.update([7], [10], [True])
    with pytest.raises(ValueError, match="not a HapoHistory state"):
        restored.load_state_dict({"min_correct_length": {}})
    with pytest.raises(ValueError, match="must be an int >= 0"):
        restored.load_state_dict({"version": 1, "min_correct_length": {"p": -3}})
    history.update([], [], [])  # empty batch
    assert len(history) == 2


# ---------------------------------------------------------------------------------------- HBPO
def test_hbpo_f2_values():
    # f2(b) = 4 cos(pi b / 8192): 4cos(pi/16) = 3.923, 4cos(pi/8) = 3.696, 4cos(pi/4) = 2.828,
    # 4cos(5pi/16) = 2.222
    for b, expected in [(512, 3.923), (1024, 3.696), (2048, 2.828), (2560, 2.222)]:
        assert round(hbpo_f2(b), 3) == expected
        assert round(hbpo_f2(b, pi=3.1416), 3) == expected
    # f1(n, b) = 4 cos(pi n / 8192) - |n - b| / 4096: f1(1024, 512) = 3.69552 - 0.125
    assert hbpo_f1(1024, 512) == pytest.approx(4 * math.cos(math.pi / 8) - 0.125)


def test_hbpo_reward_paper_vs_code():
    # b=512, n=4096: f1 = 4 cos(pi/2) - 3584/4096 = 0 - 0.875 (code: min(f1, f2) = f1)
    assert hbpo_reward(4096, 512, True, True, "code") == pytest.approx(-0.875, abs=1e-4)
    assert hbpo_reward(4096, 512, True, True, "paper") == pytest.approx(-0.875, abs=1e-9)
    # b=512, n=0: code min(4 - 512/4096, 3.923) = 3.875; paper n <= b -> f2(512) = 3.923
    assert hbpo_reward(0, 512, True, True, "code") == pytest.approx(3.875, abs=1e-4)
    assert round(hbpo_reward(0, 512, True, True, "paper"), 3) == 3.923
    # b=512, n=300: paper f2 = 3.923; code 4 cos(300 pi / 8192) - 212/4096 = 3.97356 - 0.05176 = 3.92180
    assert round(hbpo_reward(300, 512, True, True, "paper"), 3) == 3.923
    assert hbpo_reward(300, 512, True, True, "code") == pytest.approx(3.92180, abs=1e-4)
    # b=512, n=1024 (over budget): both f1 = 3.69552 - 0.125 = 3.57052
    assert hbpo_reward(1024, 512, True, True, "paper") == pytest.approx(3.57052, abs=1e-5)
    assert hbpo_reward(1024, 512, True, True, "code") == pytest.approx(3.57052, abs=1e-4)
    # correct but longer than L_max, or wrong -> 0 in both
    for variant in ("paper", "code"):
        assert hbpo_reward(5000, 512, True, True, variant) == 0.0
        assert hbpo_reward(100, 512, False, True, variant) == 0.0
    # format error: code -1 (even if graded "correct"), paper 0
    assert hbpo_reward(100, 512, False, False, "code") == -1.0
    assert hbpo_reward(100, 512, False, False, "paper") == 0.0
    # no budget: code round(4 cos(3.1416 n / 8192), 2): n=2048 -> round(2.8284, 2) = 2.83
    assert hbpo_reward(2048, None, True, True, "code") == 2.83
    with pytest.raises(ValueError, match="needs the budget b"):
        hbpo_reward(2048, None, True, True, "paper")
    with pytest.raises(ValueError, match="variant must be 'paper' or 'code'"):
        hbpo_reward(1, 512, True, True, "verl")


def test_hbpo_format_check_and_budget_parse():
    boxed = "<think> I will answer the question with 512 tokens. 2+2=4</think>So \\boxed{4}"
    no_box = "<think>2+2=4</think>The answer is 4."
    no_close = "<think>2+2=4 so \\boxed{4}"
    assert hbpo_well_formed(boxed) and not hbpo_well_formed(no_box) and not hbpo_well_formed(no_close)
    # the code only looks between the first and the second </think>
    assert not hbpo_well_formed("<think>a</think> b </think> \\boxed{4}")
    assert hbpo_parse_budget(boxed) == 512 and hbpo_parse_budget(no_box) is None
    # response with no \boxed under the code variant: format error -1 regardless of length
    rewards = [hbpo_reward(n, hbpo_parse_budget(t), ok, hbpo_well_formed(t), "code")
               for t, n, ok in [(boxed, 300, True), (no_box, 300, False)]]
    assert rewards == pytest.approx([3.92180, -1.0], abs=1e-4)


# ------------------------------------------------------------------------------------- DA-DLER
def test_da_dler_lengths_released_setting():
    # rho: g0 3/4 -> easy 2000; g1 1/4 -> hard 4000; g2 2/4 = 0.5 -> easy (rho >= 0.5); g3 single
    # correct 1/1 -> 2000; g4 single wrong 0/1 -> 4000
    correct = [1, 1, 1, 0, 1, 0, 0, 0, 1, 1, 0, 0, 1, 0]
    groups = [0] * 4 + [1] * 4 + [2] * 4 + [3, 4]
    assert difficulty_aware_truncation_lengths(correct, groups) == [2000] * 4 + [4000] * 4 + [2000] * 4 + [2000, 4000]
    assert difficulty_aware_truncation_lengths([], []) == []


def test_da_dler_tiers_mapping():
    # tiers sorted: (0.25, 3000), (0.75, 1000); rho < 0.25 -> 5000; [0.25, 0.75) -> 3000; >= 0.75 -> 1000
    tiers = [[0.75, 1000], [0.25, 3000]]  # unsorted, lists (as from YAML)
    correct = [0, 0, 0, 0] + [1, 0, 0, 0] + [1, 1, 0, 0] + [1, 1, 1, 0] + [1, 1, 1, 1]
    groups = [g for g in range(5) for _ in range(4)]
    out = difficulty_aware_truncation_lengths(correct, groups, tiers, default_length=5000)
    assert out[::4] == [5000, 3000, 3000, 1000, 1000]
    # kwargs as the trainer passes them from rollout.truncation.kwargs (OmegaConf lists)
    yaml_tiers = OmegaConf.create({"tiers": [[0.5, 64]]}).tiers
    assert difficulty_aware_truncation_lengths([1, 0, 0, 0], [0, 0, 1, 1], yaml_tiers, 128) == [64, 64, 128, 128]
    # 3 of 10 correct is exactly rho = 0.3 -> on the 0.3 tier despite float rounding
    assert difficulty_aware_truncation_lengths([1] * 3 + [0] * 7, [0] * 10, [(0.3, 7)], 9)[0] == 7
    for bad, match in [([(0.5, 100), (0.5, 200)], "distinct"), ([(1.5, 100)], r"threshold must be a number in"),
                       ([(0.5, 0)], "length must be an int >= 1"), ([0.5], r"\[threshold, length\] pairs")]:
        with pytest.raises(ValueError, match=match):
            difficulty_aware_truncation_lengths([1], [0], bad)


def test_difficulty_aware_limits_follow_each_group():
    # easy group (2/2 correct) and a group exactly at the threshold (1/2) both get the short limit
    correct = [True, True, False, True]
    assert difficulty_aware_truncation_lengths(correct, [0, 0, 1, 1]) == [2000, 2000, 2000, 2000]
    # below the threshold the group keeps the long limit
    assert difficulty_aware_truncation_lengths([False, False, True, False], [0, 0, 1, 1]) == [4000, 4000, 2000, 2000]


# ---------------------------------------------------------------------------------------- PALU
def test_palu_hand_values():
    # correct lengths 1000..4000: Q_1.0 = 4000, Q_0.5 = (2000 + 3000)/2 = 2500 -> step 1500
    assert palu_update_budget(4000, 8000, 0.9, [4000, 1000, 3000, 2000]) == 2500
    assert palu_update_budget(4000, 8000, 0.8, [1000, 2000, 3000, 4000]) == 2500  # pass_rate == C shrinks
    assert palu_update_budget(4000, 8000, 0.79, [1000, 2000, 3000, 4000]) == 8000  # below C: reset to L_max
    assert palu_update_budget(4000, 8000, 1.0, []) == 8000  # no correct lengths
    # tau = 1: Q_1.0 - Q_0 = max - min = 3000 -> 1000
    assert palu_update_budget(4000, 8000, 0.9, [1000, 2000, 3000, 4000], tau=1.0) == 1000
    # fractional gap: [1, 2] -> Q_1 = 2, Q_0.5 = 1.5, gap 0.5 -> step floor(0.5) = 0
    assert palu_update_budget(10, 100, 1.0, [1, 2]) == 10
    # floor: budget 300, lengths [100, 300] -> gap 300 - 200 = 100 -> 200; with min_budget 256 -> 256
    assert palu_update_budget(300, 4000, 1.0, [100, 300]) == 200
    assert palu_update_budget(300, 4000, 1.0, [100, 300], min_budget=256) == 256
    assert palu_update_budget(5, 4000, 1.0, [0, 4000]) == 1  # never below 1
    with pytest.raises(ValueError, match="budget must be <= l_max"):
        palu_update_budget(5000, 4000, 1.0, [1])
    with pytest.raises(ValueError, match=r"pass_rate must be a number in \[0.0, 1.0\]"):
        palu_update_budget(100, 4000, 1.5, [1])


# ------------------------------------------------------------------------------ registered terms
def test_terms_registered_on_import():
    assert LENGTH_TERMS <= set(REWARD_TERMS.names())


def test_terms_match_pure_functions():
    lengths = [10, 20, 30, 40, 7, 3]
    correct = [True, False, True, True, True, False]
    groups = [0, 0, 0, 0, 1, 1]
    finish = ["stop", "stop", "stop", "length", "stop", "stop"]
    batch = make_batch(lengths, correct, groups, finish, columns={"target_length": [20] * 4 + [5] * 2})
    terms = {
        "dapo_overlong": {"kwargs": {"max_len": 40, "cache_len": 20}},
        "kimi_length": {},
        "cosine": {"kwargs": {"max_len": 40}},
        "l1_exact": {}, "l1_max": {},
        "tlmre_length": {"kwargs": {"alpha": 0.4}},
        "grpo_lambda": {"kwargs": {"top_lambda": 0.5}},
    }
    totals, raw = score_batch(batch, terms)
    # dapo: free to 20, then -(L-20)/20: 10, 20 -> 0; 30 -> -0.5; 40 -> -1
    assert raw["dapo_overlong"] == approx([0, 0, -0.5, -1, 0, 0])
    assert raw["kimi_length"] == kimi_length_reward(lengths, correct, groups)
    # response 3 was cut (finish "length") -> r_exceed; L=40 also hits L_max
    assert raw["cosine"] == cosine_length_reward(lengths, correct, [f == "length" for f in finish], 40)
    assert raw["cosine"][3] == -10.0
    targets = [20] * 4 + [5] * 2
    assert raw["l1_exact"] == l1_exact_reward(correct, lengths, targets)
    assert raw["l1_max"] == l1_max_reward(correct, lengths, targets)
    assert raw["tlmre_length"] == tlmre_length_reward(correct, lengths, groups, 0.4)
    # grpo_lambda: ratios g0 3/4, g1 1/2; k = floor(0.5*2) = 1 -> g0 shaped, g1 plain 0/1
    assert raw["grpo_lambda"] == grpo_lambda_reward(correct, lengths, groups, 0.5, 0.6)
    assert raw["grpo_lambda"][4:] == [1.0, 0.0]
    assert totals == approx([sum(raw[name][i] for name in terms) for i in range(6)])


def test_terms_on_empty_batch():
    kwargs = {"dapo_overlong": {"max_len": 10, "cache_len": 2}, "cosine": {"max_len": 10},
              "tlmre_length": {"alpha": 0.1}}
    for name in LENGTH_TERMS:
        batch = empty_batch(columns={"target_length": []} if name.startswith("l1") else None)
        assert REWARD_TERMS.get(name)(batch, **kwargs.get(name, {})) == []


def test_term_config_errors_name_the_key():
    batch = make_batch([10, 20], [True, False], [0, 0])
    cases = [
        ("dapo_overlong", {}, r"reward.terms.dapo_overlong.kwargs.max_len must be set"),
        ("dapo_overlong", {"max_len": 100}, r"reward.terms.dapo_overlong.kwargs.cache_len must be set"),
        ("dapo_overlong", {"max_len": 100, "cache_len": 200},
         r"reward.terms.dapo_overlong.kwargs.cache_len must be <= max_len=100"),
        ("dapo_overlong", {"max_len": 100, "cache_len": 20, "factor": -1},
         r"reward.terms.dapo_overlong.kwargs.factor must be a number >= 0"),
        ("cosine", {}, r"reward.terms.cosine.kwargs.max_len must be set"),
        ("cosine", {"max_len": 10, "r0_correct": "high"}, r"reward.terms.cosine.kwargs.r0_correct must be a finite"),
        ("cosine", {"max_len": 10, "exceed_margin": -1}, r"reward.terms.cosine.kwargs.exceed_margin must be an int"),
        ("tlmre_length", {}, r"reward.terms.tlmre_length.kwargs.alpha must be set"),
        ("tlmre_length", {"alpha": 2.0}, r"reward.terms.tlmre_length.kwargs.alpha must be a number in \[0.0, 1.0\]"),
        ("grpo_lambda", {"top_lambda": -0.1}, r"reward.terms.grpo_lambda.kwargs.top_lambda must be a number in"),
        ("l1_exact", {"alpha": -1.0}, r"reward.terms.l1_exact.kwargs.alpha must be a number >= 0"),
        ("l1_max", {"delta": math.inf}, r"reward.terms.l1_max.kwargs.delta must be a finite number"),
    ]
    for name, kwargs, match in cases:
        with pytest.raises(ConfigError, match=match) as info:
            score_batch(batch, {name: {"kwargs": kwargs}})
        assert "\n" not in str(info.value)
    with pytest.raises(ConfigError, match=r"reward.terms.kimi_length.kwargs \['alpha'\] do not fit"):
        score_batch(batch, {"kimi_length": {"kwargs": {"alpha": 1.0}}})


def test_l1_terms_need_the_target_column():
    batch = make_batch([10, 20], [True, False], [0, 0], columns={"level": [1, 1]})
    for name in ("l1_exact", "l1_max"):
        with pytest.raises(ConfigError, match=rf"reward.terms.{name} needs .* column 'target_length'.*data.path.*"
                                              r"l1_prompt_suffix"):
            score_batch(batch, {name: {}})
    bad = make_batch([10, 20], [True, False], [0, 0], columns={"target_length": [100, None]})
    with pytest.raises(ConfigError, match=r"reward.terms.l1_exact: column 'target_length' row\[1\] must be"):
        score_batch(bad, {"l1_exact": {}})
