"""The shared answer grader: extraction, the exact numeric fast path, math-verify, time limits."""

import doctest
import signal
import time
from concurrent.futures import ThreadPoolExecutor
from fractions import Fraction

import pytest

import rlspec.rewards.grader as grader
import rlspec.rewards.terms
from rlspec.rewards.grader import as_plain_number, extract_final_answer, grade, grade_batch

# A power tower that sympy grinds on for far longer than any time limit used here.
PATHOLOGICAL = "9^{9^{9^{9}}}"


@pytest.mark.parametrize(
    "text, expected",
    [
        ("<think>2+2=4</think>\nThe answer is \\boxed{4}.<|im_end|>", "4"),
        ("\\boxed{1} then \\boxed{2} and finally \\boxed{3}", "3"),  # last box wins
        ("<think>maybe \\boxed{7}</think> so \\boxed{8}", "8"),  # only after </think>
        ("<think>a</think> x <think>b</think> \\boxed{9}", "9"),  # after the LAST </think>
        ("\\boxed{\\frac{1}{2}}", "\\frac{1}{2}"),  # nested braces
        ("\\boxed{\\text{(A) } \\{1, 2\\}}", "\\text{(A) } \\{1, 2\\}"),  # escaped braces are literal
        ("\\boxed{ 42 }", "42"),
        ("\\boxed {42}", "42"),
        ("$\\boxed 42$ done", "42"),  # brace-less form
        ("so \\boxed 17.", "17"),
        ("\\fbox{5}", "5"),
        ("\\boxed{3} \\fbox{6}", "6"),
        ("\\boxed{\\boxed{12}}", "12"),
    ],
)
def test_extract_final_answer(text, expected):
    assert extract_final_answer(text) == expected


@pytest.mark.parametrize(
    "text",
    [
        "",
        "no box at all, the answer is 4",
        "<think>\\boxed{4}</think> no box after the think",
        "\\boxed{12",  # cut off by the length limit: unbalanced
        "\\boxed{3} and then \\boxed{\\frac{1}{2}",  # last box unbalanced: earlier boxes not used
        "\\boxed{}",  # empty
        "\\boxed{   }",
        "\\boxed",  # command at the very end
        "\\boxed5",  # not LaTeX's brace-less form (needs a space)
        "\\boxedanswer{4}",  # a different command
    ],
)
def test_extract_final_answer_none(text):
    assert extract_final_answer(text) is None


def test_extract_final_answer_think_close():
    assert extract_final_answer("no think tags \\boxed{4}") == "4"
    assert extract_final_answer("no think tags \\boxed{4}", require_think_close=True) is None
    assert extract_final_answer("a</think>\\boxed{4}", require_think_close=True) == "4"
    assert extract_final_answer(None) is None  # type: ignore[arg-type]
    assert extract_final_answer(42) is None  # type: ignore[arg-type]


@pytest.mark.parametrize(
    "text, value",
    [
        ("25", Fraction(25)),
        ("025", Fraction(25)),
        ("+7", Fraction(7)),
        ("-5", Fraction(-5)),
        ("\u22125", Fraction(-5)),  # unicode minus
        ("1,000", Fraction(1000)),
        ("1{,}000", Fraction(1000)),
        ("12,345,678", Fraction(12345678)),
        ("12.0", Fraction(12)),
        ("-3.50", Fraction(-7, 2)),
        (".5", Fraction(1, 2)),
        ("25.", Fraction(25)),
        ("7/2", Fraction(7, 2)),
        ("-6/4", Fraction(-3, 2)),
        ("\\frac{1}{2}", Fraction(1, 2)),
        ("\\dfrac{3}{4}", Fraction(3, 4)),
        ("\\tfrac{3}{4}", Fraction(3, 4)),
        ("-\\frac{6}{4}", Fraction(-3, 2)),
        ("\\frac{-1}{3}", Fraction(-1, 3)),
        ("\\frac12", Fraction(1, 2)),
        ("$5$", Fraction(5)),
        ("\\$18.90", Fraction(189, 10)),
        ("10\\%", Fraction(10)),
        ("90^\\circ", Fraction(90)),
        ("90^{\\circ}", Fraction(90)),
    ],
)
def test_as_plain_number(text, value):
    assert as_plain_number(text) == value


@pytest.mark.parametrize(
    "text",
    ["", "x", "1,2", "12,34", "1,0000", "1/0", "\\frac{x}{2}", "\\frac{1}{0}", "1e3", "(1, 2)", "2\\pi", "1 000",
     "9" * 100],
)
def test_as_plain_number_rejects(text):
    assert as_plain_number(text) is None


@pytest.mark.parametrize(
    "answer, gold, expected",
    [
        ("025", "25", True),  # AIME-style leading zeros
        ("25", "025", True),
        ("1,000", "1000", True),
        ("1000", "1{,}000", True),
        ("12.0", "12", True),
        ("-5", "-5", True),
        ("5", "-5", False),
        ("-5", "5", False),
        ("24", "25", False),
        ("\\frac{1}{2}", "0.5", True),
        ("\\dfrac{1}{2}", "\\frac12", True),
        ("0.5", "1/2", True),
        ("10\\%", "10", True),
        ("0.333", "\\frac{1}{3}", False),  # exact comparison
    ],
)
def test_grade_numbers(answer, gold, expected, monkeypatch):
    # Plain numbers never reach math-verify.
    monkeypatch.setattr(grader, "_slow_equal", lambda *a: pytest.fail("math-verify called for plain numbers"))
    assert grade(f"<think>work</think> The answer is $\\boxed{{{answer}}}$.", gold) is expected


@pytest.mark.parametrize(
    "answer, gold, expected",
    [
        ("x^2+2x+1", "(x+1)^2", True),
        ("3\\sqrt{2}", "\\sqrt{18}", True),
        ("\\frac{\\pi}{3}", "\\pi/3", True),
        ("(1,2)", "(1, 2)", True),
        ("[0,1)", "(0,1]", False),
        ("1,2", "12", False),  # a pair, not twelve
        ("\\frac{\\sqrt{3}}{2}", "\\frac12", False),
        ("2\\pi", "\\boxed{2\\pi}", True),  # a gold written as a box
    ],
)
def test_grade_math_verify(answer, gold, expected):
    assert grade(f"<think>w</think> \\boxed{{{answer}}}", gold) is expected


def test_grade_require_think_close():
    response = "I think it is \\boxed{4}"
    assert grade(response, "4") is True
    assert grade(response, "4", require_think_close=True) is False
    assert grade("<think>x</think>\\boxed{4}", "4", require_think_close=True) is True


@pytest.mark.parametrize(
    "response, gold",
    [
        ("", "4"),
        ("The answer is 4.", "4"),  # no box
        ("\\boxed{4", "4"),  # unbalanced
        ("\\boxed{4}", ""),  # no gold
        ("\\boxed{4}", None),
        ("\\boxed{4}", float("nan")),
        (None, "4"),
        (1234, "4"),
        ("\\boxed{}}}{{", "4"),
        ("\\boxed{\\frac{}{}}", "4"),
        ("\\boxed{\x00\ufffd}", "4"),
        ("\\boxed{\\begin{pmatrix}}", "4"),
        ("\\boxed{" + "(" * 500 + "}", "4"),
        ("\\boxed{" + "x" * 20000 + "}", "4"),
    ],
)
def test_grade_never_raises_on_weird_output(response, gold):
    assert grade(response, gold, timeout_s=0.5) is False


def test_grade_accepts_non_string_gold():
    assert grade("\\boxed{25}", 25) is True  # type: ignore[arg-type]
    assert grade("\\boxed{0.5}", 0.5) is True  # type: ignore[arg-type]


def test_grade_rejects_bad_timeout():
    with pytest.raises(ValueError, match="timeout_s"):
        grade("\\boxed{x}", "y", timeout_s=0)
    with pytest.raises(ValueError, match="timeout_s"):
        grade("\\boxed{x}", "y", timeout_s=float("inf"))


def test_timeout_in_main_thread_counts_as_incorrect():
    grader._RESULT_CACHE.pop((PATHOLOGICAL, "11"), None)
    start = time.monotonic()
    assert grade(f"\\boxed{{{PATHOLOGICAL}}}", "11", timeout_s=0.3) is False
    assert time.monotonic() - start < 5.0
    assert grader._RESULT_CACHE[(PATHOLOGICAL, "11")] == 0.3  # remembered: the next call is instant
    assert grade(f"\\boxed{{{PATHOLOGICAL}}}", "11", timeout_s=0.3) is False


def test_timeout_restores_an_outer_interval_timer():
    fired = []

    def outer_handler(signum, frame):
        fired.append(True)

    previous = signal.signal(signal.SIGALRM, outer_handler)
    try:
        signal.setitimer(signal.ITIMER_REAL, 60.0)
        assert grade(f"\\boxed{{{PATHOLOGICAL}}}", "12", timeout_s=0.2) is False
        remaining, _ = signal.getitimer(signal.ITIMER_REAL)
        assert 50.0 < remaining <= 60.0  # still armed with what was left
        assert signal.getsignal(signal.SIGALRM) is outer_handler
        assert not fired
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


def test_grade_from_worker_threads():
    # math-verify's own signal timeouts raise outside the main thread; ours must not.
    cases = [
        ("\\boxed{\\sqrt{8}}", "2\\sqrt{2}", True),
        ("\\boxed{\\sqrt{8}}", "3\\sqrt{2}", False),
        ("\\boxed{031}", "31", True),
        (f"\\boxed{{{PATHOLOGICAL}}}", "13", False),  # times out in the helper process
    ]
    for answer, gold, _ in cases:
        grader._RESULT_CACHE.pop((extract_final_answer(answer), gold), None)
    with ThreadPoolExecutor(max_workers=2) as pool:
        results = list(pool.map(lambda c: grade(c[0], c[1], timeout_s=1.0), cases))
    assert results == [c[2] for c in cases]
    assert grader._RESULT_CACHE[(PATHOLOGICAL, "13")] == 1.0


def test_helper_process_is_killed_when_it_hangs():
    worker = grader._VerifyWorker()
    try:
        assert worker.verify("\\frac{2}{4}", "1/2", timeout_s=5.0) is True
        first = worker._proc
        # The child would give up only after 30 s; the parent kills it after 0.5 s.
        start = time.monotonic()
        assert worker.verify(PATHOLOGICAL, "14", timeout_s=30.0, kill_after_s=0.5) is None
        assert time.monotonic() - start < 5.0
        assert worker._proc is None and first.poll() is not None
        assert worker.verify("x+x", "2x", timeout_s=5.0) is True  # a fresh child starts
    finally:
        worker.stop()


def test_grade_batch():
    responses = ["<think>a</think>\\boxed{3}", "\\boxed{4}", "nothing", "\\boxed{-1}"]
    assert grade_batch(responses, ["3", "5", "1", "-1"]) == [True, False, False, True]
    assert grade_batch(["\\boxed{4}"], ["4"], require_think_close=True) == [False]
    with pytest.raises(ValueError, match="2 responses but 1 gold"):
        grade_batch(["a", "b"], ["a"])


def test_grade_batch_integer_answers_stay_on_the_fast_path(monkeypatch):
    monkeypatch.setattr(grader, "_slow_equal", lambda *a: pytest.fail("math-verify called for integers"))
    responses = [f"<think>{'step ' * 50}</think> so \\boxed{{{i:03d}}}" for i in range(1000)]
    golds = [str(i if i % 4 else i + 1) for i in range(1000)]
    assert sum(grade_batch(responses, golds, require_think_close=True)) == 750


@pytest.mark.parametrize("module", [grader, rlspec.rewards.terms])
def test_docstring_examples(module):
    result = doctest.testmod(module)
    assert result.attempted > 0 and result.failed == 0



def test_timeout_alarm_does_not_raise_inside_finalizers():
    """A SIGALRM landing in a __del__ (garbage collection during grading) must not raise there:
    Python would only print "Exception ignored"; the interval timer re-fires in the normal flow."""
    import sys

    from rlspec.rewards.grader import _in_finalizer

    class Probe:
        seen: list = []

        def __del__(self):
            Probe.seen.append(_in_finalizer(sys._getframe()))

    Probe()  # dropped at once: __del__ runs
    assert Probe.seen == [True]
    assert _in_finalizer(sys._getframe()) is False
