"""Reward terms and their weighted sum, against hand-computed values."""

import math

import pytest
from omegaconf import OmegaConf

import rlspec.rewards.terms as terms_module
from rlspec.config import RewardTermConfig
from rlspec.errors import ConfigError
from rlspec.rewards import REWARD_TERMS, RewardBatch, compute_rewards, score_batch
from rlspec.rewards.dler import dler_truncation
from rlspec.rewards.terms import correctness, format_reward

# Four responses to "2+2" (gold 4), one group:
#   0 correct, stopped            1 correct box, then cut at the length limit
#   2 cut while still thinking    3 wrong answer, stopped
COMPLETIONS = [
    "<think>2+2=4</think>\nThe answer is \\boxed{4}.<|im_end|>",
    "<think>2+2=4</think>\nThe answer is \\boxed{4}. Let me double-check by",
    "<think>2+2 is... hmm, let me think about this very carefully and",
    "<think>2+2=5</think>\n\\boxed{5}<|im_end|>",
]
FINISH = ["stop", "length", "length", "stop"]


def make_inputs(**overrides):
    inputs = dict(
        prompts=["What is 2+2?"] * 4,
        completions=COMPLETIONS,
        completion_ids=[[1] * 10, [1] * 16, [1] * 16, [1] * 8],
        finish_reasons=FINISH,
        answers=["4"] * 4,
        group_ids=[0, 0, 0, 0],
    )
    inputs.update(overrides)
    return inputs


def make_batch(correct=(True, True, False, False), **overrides):
    return RewardBatch(**make_inputs(**overrides), correct=list(correct))


def test_correctness_term():
    assert correctness(make_batch()) == [1.0, 1.0, 0.0, 0.0]


def test_format_term():
    batch = make_batch(
        completions=[
            "a</think>\\boxed{4}",  # ok
            "a</think>\\boxed{4}",  # ok but cut at the length limit
            "a\\boxed{4}",  # no </think>
            "a</think> the answer is 4",  # no box
            "\\boxed{4}</think> four",  # box only inside the thinking
            "a</think>\\boxed{4",  # unbalanced box
        ],
        finish_reasons=["stop", "length", "stop", "stop", "stop", "stop"],
        prompts=["q"] * 6, completion_ids=[[1]] * 6, answers=["4"] * 6, group_ids=[0] * 6,
        correct=[True] * 6,
    )
    assert format_reward(batch) == [1.0, 0.0, 0.0, 0.0, 0.0, 0.0]


def test_dler_truncation_term():
    batch = make_batch()
    assert dler_truncation(batch) == [0.0, -1.0, 0.0, 0.0]
    assert dler_truncation(batch, penalty_coef=0.1) == pytest.approx([0.0, -0.9, 0.0, 0.0])
    assert all(math.copysign(1.0, v) == 1.0 for v in dler_truncation(batch) if v == 0.0)  # no -0.0
    for bad in (-0.1, 1.5):
        with pytest.raises(ConfigError, match="penalty_coef must be in"):
            dler_truncation(batch, penalty_coef=bad)


@pytest.mark.parametrize("coef, expected", [(0.0, [1.0, 0.0, 0.0, 0.0]), (0.1, [1.0, 0.1, 0.0, 0.0])])
def test_dler_totals_paper_and_code(coef, expected):
    # Graded here (require_think_close like DeepScaleR): correct = [T, T, F, F].
    totals, raw, correct = compute_rewards(
        make_batch(correct=[]),
        {"correctness": {"weight": 1.0}, "dler_truncation": {"weight": 1.0, "kwargs": {"penalty_coef": coef}}},
        require_think_close=True,
    )
    assert correct == [True, True, False, False]
    assert totals == pytest.approx(expected)
    assert raw["correctness"] == [1.0, 1.0, 0.0, 0.0]
    assert raw["dler_truncation"] == pytest.approx([0.0, -(1 - coef), 0.0, 0.0])


def test_weights_and_raw_values():
    totals, raw, _ = compute_rewards(
        make_batch(correct=[]),
        {"correctness": {"weight": 2.0, "kwargs": {}}, "format": {"weight": 0.5}},
        require_think_close=True,
    )
    assert raw == {"correctness": [1.0, 1.0, 0.0, 0.0], "format": [1.0, 0.0, 0.0, 1.0]}
    assert totals == pytest.approx([2.5, 2.0, 0.0, 0.5])


def test_precomputed_correct_skips_the_grader(monkeypatch):
    monkeypatch.setattr(terms_module, "grade_batch", lambda *a, **k: pytest.fail("graded twice"))
    totals, _, correct = compute_rewards(make_batch(correct=[False, True, True, False]), {"correctness": {}})
    assert totals == [0.0, 1.0, 1.0, 0.0]
    assert correct == [False, True, True, False]


def test_require_think_close_is_passed_to_the_grader():
    # Response 0 boxed 4 without ever closing </think>: correct only when that is allowed.
    batch = make_batch(correct=[], completions=["<think>\\boxed{4} is my guess, let me", *COMPLETIONS[1:]])
    assert compute_rewards(batch, {"correctness": {}})[2] == [True, True, False, False]
    assert compute_rewards(batch, {"correctness": {}}, require_think_close=True)[2] == [False, True, False, False]



def test_last_number_fallback_is_passed_to_the_grader():
    # A model that does not box: "so 4" is its answer only under reward.last_number_fallback.
    batch = make_batch(correct=[], completions=["2+2 is 4, so 4", "2+2, so 5", "\\boxed{4}", "no number"],
                       finish_reasons=["stop"] * 4)
    assert compute_rewards(batch, {"correctness": {}})[2] == [False, False, True, False]
    assert compute_rewards(batch, {"correctness": {}}, last_number_fallback=True)[2] == [True, False, True, False]


def test_term_config_forms():
    batch = make_batch()
    as_dataclass = {"correctness": RewardTermConfig(weight=3.0)}
    as_omegaconf = OmegaConf.create({"dler_truncation": {"weight": 1.0, "kwargs": {"penalty_coef": 0.5}}})
    assert score_batch(batch, as_dataclass)[0] == [3.0, 3.0, 0.0, 0.0]
    assert score_batch(batch, as_omegaconf)[0] == [0.0, -0.5, 0.0, 0.0]
    assert score_batch(batch, {"correctness": None})[0] == [1.0, 1.0, 0.0, 0.0]
    assert score_batch(batch, {"correctness": 0.5})[0] == [0.5, 0.5, 0.0, 0.0]


def test_empty_batch():
    batch = make_batch(correct=[], prompts=[], completions=[], completion_ids=[], finish_reasons=[], answers=[],
                       group_ids=[])
    assert compute_rewards(batch, {"correctness": {}}) == ([], {"correctness": []}, [])


def test_score_batch_needs_a_graded_batch():
    with pytest.raises(ValueError, match="batch.correct is empty"):
        score_batch(make_batch(correct=[]), {"correctness": {}})


@REWARD_TERMS.register("test_terms_constant")
def _constant(batch, value=0.0):
    return [value] * len(batch)


@REWARD_TERMS.register("test_terms_wrong_length")
def _wrong_length(batch):
    return [1.0]


@REWARD_TERMS.register("test_terms_not_a_list")
def _not_a_list(batch):
    return 1.0


@pytest.mark.parametrize("value", [math.nan, math.inf, -math.inf])
def test_non_finite_term_names_the_term(value):
    with pytest.raises(ConfigError, match="'test_terms_constant' returned .* for completion 0"):
        score_batch(make_batch(), {"test_terms_constant": {"kwargs": {"value": value}}})


@pytest.mark.parametrize(
    "terms, message",
    [
        ({"corectness": {}}, "unknown reward term 'corectness'.*Did you mean 'correctness'"),
        ({"dler_truncation": {"kwargs": {"coef": 0.1}}},
         r"reward.terms.dler_truncation.kwargs \['coef'\].*penalty_coef"),
        ({"correctness": {"weigth": 1.0}}, "unknown key.*weigth"),
        ({"correctness": {"weight": "high"}}, "weight must be a finite number"),
        ({"correctness": {"weight": math.nan}}, "weight must be a finite number"),
        ({"correctness": {"kwargs": [1]}}, "kwargs must be a mapping"),
        ({"correctness": "yes"}, "must be {weight"),
        ({"test_terms_wrong_length": {}}, "returned 1 values for 4 completions"),
        ({"test_terms_not_a_list": {}}, "returned a float for 4 completions"),
        ({}, "no reward terms configured"),
    ],
)
def test_bad_terms_give_one_line_errors(terms, message):
    with pytest.raises(ConfigError, match=message) as info:
        score_batch(make_batch(), terms)
    assert "\n" not in str(info.value)


def test_reward_batch_checks_lengths():
    with pytest.raises(ValueError, match="RewardBatch.answers has 3 entries for 4 completions"):
        make_batch(answers=["4"] * 3)
    with pytest.raises(ValueError, match=r"RewardBatch.columns\['level'\] has 1 entries"):
        make_batch(columns={"level": [1]})
    with pytest.raises(ValueError, match="RewardBatch.correct has 2 entries"):
        make_batch(correct=[True, False])


def test_builtin_terms_registered():
    assert {"correctness", "format", "dler_truncation"} <= set(REWARD_TERMS.names())
