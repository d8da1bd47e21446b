r"""Tricky equivalence cases for the shared grader, each with the verdict a careful human grader gives.

Every case is a model response (its final answer inside ``\boxed{}`` after ``</think>``) graded
against a gold answer by :func:`rlspec.rewards.grader.grade`. Verdicts marked "by design" are
the grader's documented conventions (a trailing ``%`` or degree sign is decoration, not a factor
of 1/100; numbers compare exactly, never to a rounding tolerance).
"""

import pytest

from rlspec.rewards.grader import as_plain_number, grade


def boxed(answer: str) -> str:
    return f"<think>\nwork\n</think>\nThe answer is $\\boxed{{{answer}}}$."


# (final answer written by the model, gold, expected verdict)
BOXED_CASES = [
    # fractions vs decimals, \dfrac / \tfrac
    (r"\frac{1}{2}", "0.5", True),
    (r"\dfrac{3}{4}", "0.75", True),
    (r"\tfrac{3}{4}", r"\frac34", True),
    (r"\dfrac12", "0.5", True),
    ("1/2", r"\frac{1}{2}", True),
    (r"\frac{2}{4}", r"\frac12", True),
    ("7/2", "3.5", True),
    (r"-\frac{1}{2}", "-0.5", True),
    (r"\frac{-1}{2}", r"-\frac12", True),
    (r"\frac{1}{2}", r"\frac{1}{3}", False),
    ("0.33", r"\frac13", False),  # exact comparison, no rounding tolerance
    ("1/3", "0.333333", False),
    (r"\frac{\sqrt{2}}{2}", "0.7071", False),
    (r"\dfrac{\sqrt{3}}{2}", r"\frac{\sqrt3}{2}", True),
    (r"2\frac{1}{2}", r"\frac{5}{2}", True),  # mixed number
    (r"\frac{1}{0}", "0", False),
    # repeating decimals are not parsed (math-verify 0.9); problems with them ask for the fraction
    (r"0.\overline{3}", r"\frac13", False),
    # units, degrees, money
    (r"30^\circ", "30", True),
    (r"30^{\circ}", "30", True),
    ("45°", "45", True),
    ("90", r"90^\circ", True),
    (r"30^\circ", "60", False),
    (r"\frac{\pi}{6}", r"30^\circ", False),  # degrees are decoration, not a unit conversion
    (r"10\text{ cm}", "10", True),
    (r"5 \text{ inches}", "5", True),
    (r"10\,\text{cm}^2", "10", True),
    (r"10^\circ\text{C}", "10", True),
    (r"\frac{3}{2}\text{ hours}", "1.5", True),
    (r"\$18.90", "18.90", True),
    ("18.9", "18.90", True),
    ("1.5", r"\$1.50", True),
    (r"\$5.00", "5", True),
    # percent (by design: the sign is decoration)
    (r"10\%", "10", True),
    ("25%", "25", True),
    (r"2.5\%", "2.5", True),
    (r"10\%", "0.1", False),
    # intervals and inequalities
    ("[2, 5)", "[2,5)", True),
    (r"(-\infty, 3]", r"(-\infty,3]", True),
    ("[2,5)", "(2,5)", False),
    (r"(1,2)\cup(3,4)", r"(3,4)\cup(1,2)", True),
    (r"x \in [1, 2]", "[1,2]", True),
    (r"\left[ 1, 2 \right]", "[1,2]", True),
    ("x > 3", "x>3", True),
    ("x>3", "x<3", False),
    # an inequality is not converted to an interval by math-verify 0.9 (and MATH asks for interval notation)
    (r"x \geq 2", r"[2,\infty)", False),
    # sets and lists
    (r"\{1, 2, 3\}", r"\{3, 2, 1\}", True),
    (r"\{1,2\}", r"\{1,2,3\}", False),
    ("1, 2, 3", "3, 2, 1", True),
    (r"\{-1, 2\}", "-1, 2", True),
    (r"\pm 2", "2, -2", True),
    (r"2 \text{ and } 3", "2, 3", True),
    (r"\emptyset", r"\varnothing", True),  # fixed in the grader: math-verify only knows \emptyset
    # matrices and vectors
    (r"\begin{pmatrix} 1 & 2 \\ 3 & 4 \end{pmatrix}", r"\begin{pmatrix}1&2\\3&4\end{pmatrix}", True),
    (r"\begin{bmatrix} 1 & 2 \\ 3 & 4 \end{bmatrix}", r"\begin{pmatrix}1&2\\3&4\end{pmatrix}", True),
    (r"\begin{pmatrix} 1 \\ 2 \end{pmatrix}", r"\begin{pmatrix} 2 \\ 1 \end{pmatrix}", False),
    (r"\begin{pmatrix} 1/2 \\ 0.5 \end{pmatrix}", r"\begin{pmatrix} \frac12 \\ \frac12 \end{pmatrix}", True),
    # \text{} answers and multiple-choice letters
    (r"\text{(B)}", "B", True),
    (r"\textbf{(C)}", r"\text{(C)}", True),
    (r"\mathrm{(D)}", "D", True),
    ("A", r"\text{(A)}", True),
    (r"\text{Evelyn}", r"\text{Evelyn}", True),
    (r"\text{no solution}", r"\text{No solution}", True),
    (r"\text{east}", r"\text{west}", False),
    # a choice letter together with a value is not the bare letter: the grader does not guess
    (r"\text{(A) } 0", "A", False),
    # thousands separators
    ("1,000", "1000", True),
    ("1{,}000", "1000", True),
    ("1,000,000", "10^6", True),
    (r"1\,000", "1000", True),  # fixed in the grader: thin-space separators
    (r"1\,234\,567", "1234567", True),
    (r"1\,2", "12", False),
    ("1,2", "12", False),  # a pair, not a number
    ("12", "1,2", False),
    ("1,000", "1.000", False),
    # signs
    ("-3", "-3", True),
    ("-3", "3", False),
    ("\u22123", "-3", True),  # unicode minus
    ("-0", "0", True),
    ("+5", "5", True),
    (".5", "0.5", True),
    ("3.0", "3", True),
    ("5.", "5", True),
    ("27", "27.0", True),
    # pi and roots
    (r"2\pi", r"2\pi", True),
    (r"\pi/2", r"\frac{\pi}{2}", True),
    ("6.28", r"2\pi", False),
    (r"\pi", "3.14159", False),
    ("3.14", r"\pi", False),
    (r"2\sqrt{2}", r"\sqrt{8}", True),
    (r"3\sqrt{3}", r"\sqrt{27}", True),
    (r"\sqrt{2}/2", r"\frac{1}{\sqrt{2}}", True),
    (r"\sqrt2", r"\sqrt{2}", True),
    (r"\sqrt{3}", r"\sqrt{2}", False),
    # ordered pairs / tuples
    ("(1, 2)", "(1,2)", True),
    ("(2, 1)", "(1, 2)", False),
    (r"\left( 3, \frac{\pi}{2} \right)", r"(3, \pi/2)", True),
    # equations vs values
    ("x=3", "3", True),
    ("x = 3", "4", False),
    ("y = 2x + 1", "y=2x+1", True),
    ("k=5", "k = 5", True),
    ("x=3", "y=3", False),
    # leading zeros (AIME)
    ("025", "25", True),
    ("25", "025", True),
    ("007", "7", True),
    ("250", "025", False),
    # scientific notation and powers
    (r"1.5\times10^{3}", "1500", True),
    (r"1.5 \cdot 10^3", "1500", True),
    # "e" notation is not a number to the grader ("e" may be Euler's number; test_grader.py pins
    # as_plain_number("1e3") is None) and math-verify 0.9 does not read "1e5" as 10^5 either
    ("1e5", "100000", False),
    ("1e999", "1", False),
    ("10^{-2}", "0.01", True),
    ("2^{10}", "1024", True),
    # expressions
    ("x^2+2x+1", "(x+1)^2", True),
    ("a+b", "b+a", True),
    ("x^2", "2x", False),
    (r"\frac{a}{b}", "a/b", True),
    ("1+2i", "2i+1", True),
    (r"\infty", r"\infty", True),
    # gold written with its own box
    ("5", r"\boxed{5}", True),
    ("6", r"\boxed{5}", False),
]


@pytest.mark.parametrize("answer, gold, expected", BOXED_CASES, ids=[f"{a}|{g}" for a, g, _ in BOXED_CASES])
def test_boxed_answer_verdict(answer, gold, expected):
    assert grade(boxed(answer), gold) is expected


# (whole response, gold, require_think_close, expected verdict)
RESPONSE_CASES = [
    (r"\boxed{3} hmm, actually \boxed{5}", "5", False, True),  # the last box counts
    (r"\boxed{3} hmm, actually \boxed{5}", "3", False, False),
    (r"<think>\boxed{5}</think> so \boxed{3}", "5", False, False),  # boxes inside the thinking do not count
    (r"<think>\boxed{5}</think> so \boxed{3}", "3", True, True),
    (r"</think>\boxed{\frac{1}{2}", "0.5", False, False),  # unbalanced: cut off mid-answer
    (r"</think>\boxed{3} then \boxed{\frac{1}{2}", "3", False, False),  # an unbalanced last box is no answer
    (r"</think>\boxed{2}} extra", "2", False, True),  # a stray closing brace after the box
    (r"\boxed{4}", "4", False, True),  # no </think>, not required
    (r"\boxed{4}", "4", True, False),  # no </think>, required (DeepScaleR)
    (r"<think>never closed \boxed{4}", "4", True, False),
    ("", "4", False, False),  # empty output
    ("</think>", "4", False, False),
    (r"</think>\boxed{}", "4", False, False),
    ("</think> the answer is 4", "4", False, False),  # no box: no answer
    (r"</think>$\boxed 42$", "42", False, True),  # brace-less \boxed
    (r"</think>\fbox{7}", "7", False, True),
    (r"</think>\boxed{7}", "", False, False),  # no gold
]


@pytest.mark.parametrize("response, gold, require_close, expected", RESPONSE_CASES)
def test_response_verdict(response, gold, require_close, expected):
    assert grade(response, gold, require_think_close=require_close) is expected


@pytest.mark.parametrize(
    "text, value",
    [
        (r"1\,000", 1000),
        (r"12\,345\,678.5", 12345678.5),
        ("-1\\,000", -1000),
    ],
)
def test_plain_number_extensions(text, value):
    from fractions import Fraction

    assert as_plain_number(text) == Fraction(str(value))


@pytest.mark.parametrize("text", [r"1\,2", r"1\,0000", r"1\,00", r"\,100", "1.5e3"])
def test_plain_number_extensions_reject(text):
    assert as_plain_number(text) is None


def test_case_count():
    assert len(BOXED_CASES) + len(RESPONSE_CASES) >= 60


# ------------------------------------------------------------------ boxed relations
# math-verify grades a relation by its right-hand side, so "2+2=5" would match 5. A boxed relation
# counts only as an answer "name = value": its left side a lone variable (x, y_1, \theta, f(x),
# (x, y)), one relation per clause. Against a gold that is itself a relation math-verify decides.
RELATION_CASES = [
    ("2+2=5", "5", False),
    ("3=4", "4", False),
    ("x=5", "5", True),
    ("y = 5", "5", True),
    ("a=b=5", "5", False),  # a chain is not a single assignment
    ("x = 3 = 3", "3", False),
    ("x+1=5", "5", False),
    ("2x=10", "10", False),
    ("x^2 = 4", "4", False),
    (r"\frac{6}{2}=3", "3", False),
    (r"2 \cdot 3 = 6", "6", False),
    (r"\pi = 3", "3", False),  # a constant, not a variable
    ("(2+2=5)", "5", False),  # brackets do not hide the relation
    (r"\left[2+2=5\right]", "5", False),
    (r"\{2+2=5\}", "5", False),
    (r"2+2 \approx 4", "4", False),
    (r"3 \equiv 4", "4", False),
    ("3 == 4", "4", False),
    (r"x^2 = 4 \implies x = 2", "2", False),  # a derivation, not an answer
    ("2+2=4, 5", "4, 5", False),
    ("x_1 = 3", "3", True),
    (r"x_{1} = 2, x_{2} = 3", "2, 3", True),
    (r"\theta = 30^\circ", "30", True),
    (r"\alpha_{1} = 2", "2", True),
    ("x' = 3", "3", True),
    ("f(x) = 2x + 1", "2x+1", True),
    ("p(2) = 5", "5", True),
    ("x = 1, y = 2", "1, 2", True),
    ("(x, y) = (1, 2)", "(1, 2)", True),
    ("(x=1, y=2)", "(1,2)", True),
    (r"x = 2 \text{ or } x = 3", "2, 3", True),
    (r"x = 1 \text{ and } y = 2", "1, 2", True),
    ("x = 1; y = 2", "1, 2", True),
    ("x = 2, 3", "2, 3", True),
    (r"x=\pm 2", "2, -2", True),
    (r"x \approx 3.14", "3.14", True),
    ("x := 5", "5", True),
    (r"\text{Area} = 12", "12", True),
    ("AB = 5", "5", True),  # a segment's name
    (r"\overline{AB} = 5", "5", True),
    (r"m\angle ABC = 30^\circ", "30", True),
    (r"x = 5 \text{ cm}", "5", True),
    ("n = 7", "7", True),
    # relations the grader handled before are untouched: membership, inequalities, intervals
    (r"x \in [1, 2]", "[1,2]", True),
    (r"2 \in [1, 2]", "[1,2]", False),
    ("x<3", "3", False),
    (r"1 \le x \le 2", "[1,2]", False),
    # the gold is a relation: math-verify compares the two relations
    ("2x+1=y", "y=2x+1", True),
    ("3=4", "x=4", False),
    ("x = 4, y = 5", "x=4, y=5", True),
    ("5", "x=5", True),
]


@pytest.mark.parametrize("answer, gold, expected", RELATION_CASES, ids=[f"{a}|{g}" for a, g, _ in RELATION_CASES])
def test_boxed_relation_verdict(answer, gold, expected):
    assert grade(boxed(answer), gold) is expected


# ------------------------------------------------------------------ GSM8K's last-number fallback
@pytest.mark.parametrize("response,gold,expected", [
    ("<think>...</think> 3 apples and 4 more make 7 apples.", "7", True),
    ("<think>...</think> The total is $1,234.", "1234", True),
    ("<think>...</think> She pays -5 dollars net.", "-5", True),
    ("<think>...</think> It costs 2.50 per item, so 10.", "10", True),
    ("<think>...</think> The answer is 8, not 9.", "8", False),  # the last number wins: 9
    ("<think>...</think> \\boxed{6} (or maybe 7)", "6", True),  # a box always takes precedence
    ("<think>...</think> no number here", "3", False),
    ("<think>12 then 13</think>", "13", False),  # nothing after </think>
    ("<think>12 then 13", "13", False),  # cut off while thinking: no answer yet
    ("So 7. <think>maybe 8 or 9", "7", True),  # what came before the unclosed <think> counts
    ("no tags, just 21", "21", True),
])
def test_last_number_fallback(response, gold, expected):
    from rlspec.rewards.grader import grade

    assert grade(response, gold, last_number_fallback=True) is expected
    if "\\boxed" not in response:  # without the fallback an unboxed response is never correct
        assert grade(response, gold) is False
