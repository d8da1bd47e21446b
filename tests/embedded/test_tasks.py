import random
import re

import pytest

from rlspec import tasks
from rlspec.errors import ConfigError, DataError


@pytest.fixture(scope="module")
def splits():
    return tasks.make_splits(seed=0, n_train=2000, n_test=200)


def _recompute(p: tasks.MathProblem) -> int:
    """Independent evaluation of the question text (not the stored steps)."""
    if p.level == 5:
        a, b, c = map(int, re.fullmatch(r"(\d+)x\+(\d+)=(\d+)", p.expression).groups())
        (x,) = [x for x in range(-200, 201) if a * x + b == c]
        return x
    expr = re.search(r"(?:What is|Compute|Calculate) (.+?)[?.]$", p.question).group(1)
    assert re.fullmatch(r"[\d+\-*() ]+", expr)
    return eval(expr)  # noqa: S307 - digits and + - * ( ) only


def test_answers_verified(splits):
    train, test = splits
    for p in train + test:
        assert int(p.answer) == _recompute(p), p
        assert int(p.answer) >= 0
        assert all(s.result >= 0 for s in p.steps)
        tasks.verify_problem(p)


def test_known_problem():
    p = tasks.make_problem(4, (3, 5, 4, 7), "x", random.Random(0))
    assert p.expression == "(3+5)*4-7" and p.answer == "25"
    assert [s.text() for s in p.steps] == ["3+5=8", "8*4=32", "32-7=25"]
    q = tasks.make_problem(5, (3, 6, 4), "y", random.Random(0))  # 3x+4=22
    assert q.expression == "3x+4=22" and q.answer == "6"
    assert [s.text() for s in q.steps] == ["22-4=18", "18/3=6"]


def test_verify_problem_catches_wrong_answer():
    p = tasks.make_problem(3, (7, 8, 5), "z", random.Random(0))
    p.answer = "60"
    with pytest.raises(DataError):
        tasks.verify_problem(p)


def test_splits_disjoint_balanced_deterministic(splits):
    train, test = splits
    assert len(train) == 2000 and len(test) == 200
    assert not {p.question for p in train} & {p.question for p in test}
    assert not {p.expression for p in train} & {p.expression for p in test}
    assert len({p.expression for p in train}) == len(train)
    assert len({p.uid for p in train + test}) == len(train) + len(test)
    assert {p.level for p in test} == set(tasks.ALL_LEVELS)
    assert {p.level for p in test[:20]} != {test[0].level}  # shuffled: a prefix mixes levels
    train2, test2 = tasks.make_splits(seed=0, n_train=2000, n_test=200)
    assert [p.question for p in train2] == [p.question for p in train]
    assert [p.question for p in test2] == [p.question for p in test]
    _, test3 = tasks.make_splits(seed=1, n_train=2000, n_test=200)
    assert [p.question for p in test3] != [p.question for p in test]


def test_levels_subset_and_errors():
    train, test = tasks.make_splits(seed=0, n_train=100, n_test=10, levels=[1, 3])
    assert {p.level for p in train + test} == {1, 3}
    with pytest.raises(ConfigError, match="levels"):
        tasks.make_splits(levels=[9])
    with pytest.raises(ConfigError, match="n_train"):
        tasks.make_splits(n_train=10**6, n_test=10, levels=[1])


def test_solution_format_and_answer(splits):
    _, test = splits
    rng = random.Random(0)
    for p in test[:50]:
        k = tasks.sample_num_rechecks(rng, 4)
        sol = tasks.worked_solution(p, rng, k)
        assert sol.endswith(f"\n</think>\nThe answer is \\boxed{{{p.answer}}}.")
        assert sol.count("</think>") == 1 and "<think>" not in sol
        assert tasks.extract_boxed_int(sol) == p.answer
        assert tasks.is_well_formed(sol)
        assert tasks.count_rechecks(sol) == k
        for s in p.steps:  # every step is written out
            assert s.text() in sol


def test_rechecks_redundant_and_dominate_length(splits):
    _, test = splits
    rng = random.Random(0)
    for p in test[:30]:
        base = tasks.worked_solution(p, rng, 0)
        lens = [len(tasks.worked_solution(p, rng, k)) for k in range(5)]
        assert lens == sorted(lens) and len(set(lens)) == 5
        assert lens[4] > 2 * lens[0]
        four = tasks.worked_solution(p, rng, 4)
        body = four.split("</think>")[0]
        # re-checks only restate numbers already in the zero-recheck solution, and the same result
        assert set(re.findall(r"\d+", body)) <= set(re.findall(r"\d+", base))
        assert re.findall(r"Yes, (?:it|x) is (\d+)\.", body) == [p.answer] * 4


def test_sample_num_rechecks_uniform():
    rng = random.Random(0)
    draws = [tasks.sample_num_rechecks(rng, 4) for _ in range(5000)]
    assert set(draws) == {0, 1, 2, 3, 4}
    assert 0.17 < draws.count(0) / len(draws) < 0.23
    with pytest.raises(ConfigError):
        tasks.worked_solution(tasks.make_problem(1, (1, 2), "a", rng), rng, -1)


def test_prompt_messages_and_rows(splits):
    _, test = splits
    msgs = tasks.format_prompt_messages(test[0])
    assert msgs == [{"role": "user", "content": f"{test[0].question}\n{tasks.INSTRUCTION}"}]
    assert "\\boxed{}" in msgs[0]["content"]
    r = tasks.rows(test[:3])
    assert r[0] == {"question": test[0].question, "answer": test[0].answer, "level": test[0].level,
                    "uid": test[0].uid}
    assert len(r) == 3


def test_parsers():
    assert tasks.extract_boxed_int("a \\boxed{3} then \\boxed{ 42 }") == "42"
    assert tasks.extract_boxed_int("no box") is None
    assert not tasks.is_well_formed("1 + 2 = 3. The answer is \\boxed{3}.")
    assert tasks.is_well_formed("1 + 2 = 3.\n</think>\nThe answer is \\boxed{3}.")
    assert tasks.count_rechecks("x\nWait, let me verify.\ny\nHmm, let me check that again.\n</think>\nWait, let me verify.") == 2


def test_slip_known_problem_and_correction():
    """(3+5)*4-7: the slip is on the multiplication (8*4=40, not 32) and carries on (40-7=33); the
    first re-check corrects it, later ones confirm; without a re-check the wrong answer stands."""
    p = tasks.make_problem(4, (3, 5, 4, 7), "x", random.Random(0))
    assert tasks.slip_index(p) == 1
    assert [s.text() for s in tasks.slipped_steps(p)] == ["3+5=8", "8*4=40", "40-7=33"]
    none = tasks.worked_solution(p, random.Random(0), 0, slip=True)
    assert "8*4=40" in none and tasks.extract_boxed_int(none) == "33"
    two = tasks.worked_solution(p, random.Random(0), 2, slip=True)
    assert tasks.extract_boxed_int(two) == "25" and tasks.count_rechecks(two) == 2
    assert two.count("Then, 8*4 is 32.") == 2  # a re-check recomputes in its own words, it cannot copy
    assert re.findall(r"(?:Yes|No), it is [^\n]+", two) == ["No, it is 25, not 33.", "Yes, it is 25."]
    assert two[: tasks.first_pass_end(two)].endswith("Finally, 40-7=33.\nSo the result is 33.")
    q = tasks.make_problem(5, (3, 6, 4), "y", random.Random(0))  # 3x+4=22: the division slips, x=7
    cut = tasks.worked_solution(q, random.Random(0), 1, slip=True)
    assert cut[: tasks.first_pass_end(cut)].endswith("x=18/3=7.\nSo x = 7.")
    assert tasks.extract_boxed_int(cut) == "6" and "No, x is 6, not 7." in cut
    assert tasks.first_pass_end("no first pass here") == -1


def test_glance_first_pass_is_checked_by_working_it_out():
    """(3+5)*4-7 glance-first: the glance restates the expression with the (slipped) result, the
    first check works the steps out ("=") and corrects it, the next re-checks in its own words
    ("is"); budget forcing cuts right after the glance, whose value span is found for masking."""
    p = tasks.make_problem(4, (3, 5, 4, 7), "x", random.Random(0))
    text = tasks.worked_solution(p, random.Random(0), 2, slip=True, first_pass="glance")
    assert text.startswith("We need to compute (3+5)*4-7.\nAt a glance, (3+5)*4-7 is 33.\nLet me work it out.\n"
                           "First, 3+5=8.\nThen, 8*4=32.\nFinally, 32-7=25.\nNo, it is 25, not 33.\n")
    assert "Then, 8*4 is 32." in text and text.endswith("Yes, it is 25.\n</think>\nThe answer is \\boxed{25}.")
    assert tasks.count_rechecks(text) == 2 and tasks.extract_boxed_int(text) == "25"
    assert text[: tasks.first_pass_end(text)].endswith("At a glance, (3+5)*4-7 is 33.")
    lo, hi = tasks.glance_value_span(text)
    assert text[lo:hi] == "33" and text[hi:].startswith(".\nLet me work it out.")
    alone = tasks.worked_solution(p, random.Random(0), 0, first_pass="glance")  # a right glance, no check
    assert alone == "We need to compute (3+5)*4-7.\nAt a glance, (3+5)*4-7 is 25.\n</think>\nThe answer is \\boxed{25}."
    q = tasks.make_problem(5, (3, 6, 4), "y", random.Random(0))
    cut = tasks.worked_solution(q, random.Random(0), 1, slip=True, first_pass="glance")
    assert "At a glance, x = 7.\nLet me work it out.\nSubtract 4 from both sides: 3x=22-4=18." in cut
    assert tasks.extract_boxed_int(cut) == "6" and "No, x is 6, not 7." in cut
    assert cut[slice(*tasks.glance_value_span(cut))] == "7"
    assert tasks.glance_value_span(tasks.worked_solution(p, random.Random(0), 1)) is None  # steps: no glance
    with pytest.raises(ConfigError, match="first_pass"):
        tasks.worked_solution(p, random.Random(0), 1, first_pass="skim")


def test_a_glance_can_read_like_a_drilled_fact():
    """glance_sep="=": the glance of levels 1-4 reads "3+5=8", token for token a drilled fact, and
    is still found by first_pass_end / glance_value_span (level 5's "x = N" is unchanged)."""
    p = tasks.make_problem(1, (3, 5), "x", random.Random(0))
    text = tasks.worked_solution(p, random.Random(0), 1, slip=True, first_pass="glance", glance_sep="=")
    assert text == ("We need to compute 3+5.\nAt a glance, 3+5=9.\nLet me work it out.\n3+5=8.\nNo, it is 8, not 9.\n"
                    "</think>\nThe answer is \\boxed{8}.")  # a slipped glance, worked out and corrected
    assert text[: tasks.first_pass_end(text)].endswith("At a glance, 3+5=9.")
    assert text[slice(*tasks.glance_value_span(text))] == "9"
    four = tasks.make_problem(4, (3, 5, 4, 7), "x", random.Random(0))
    alone = tasks.worked_solution(four, random.Random(0), 0, first_pass="glance", glance_sep="=")
    assert alone == "We need to compute (3+5)*4-7.\nAt a glance, (3+5)*4-7=25.\n</think>\nThe answer is \\boxed{25}."
    assert alone[slice(*tasks.glance_value_span(alone))] == "25"
    q = tasks.make_problem(5, (3, 6, 4), "y", random.Random(0))
    assert tasks.worked_solution(q, random.Random(0), 0, first_pass="glance", glance_sep="=") == \
        tasks.worked_solution(q, random.Random(0), 0, first_pass="glance")
    with pytest.raises(ConfigError, match="glance_sep"):
        tasks.worked_solution(p, random.Random(0), 1, first_pass="glance", glance_sep=" equals ")


def test_slips_grow_with_level_and_stay_non_negative(splits):
    train, _ = splits
    rates = [tasks.slip_rate(lv) for lv in tasks.ALL_LEVELS]
    assert rates[0] == 0.0 and rates == sorted(rates) and rates[-1] >= 0.3
    for p in train:
        wrong = tasks.slipped_steps(p)
        assert wrong[-1].result != int(p.answer) and all(s.result >= 0 for s in wrong)
        assert sum(a != b for a, b in zip(wrong, p.steps)) >= 1


def test_open_spiral_has_no_answer(splits):
    _, test = splits
    text = tasks.worked_solution(test[0], random.Random(0), 12, close=False)
    assert "</think>" not in text and tasks.extract_boxed_int(text) is None and tasks.count_rechecks(text) == 12
