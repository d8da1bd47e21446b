"""Procedural math tasks with exact integer answers, and over-thinking worked solutions.

This is the task family of the embedded default (see :mod:`rlspec.embedded`): multi-step integer
arithmetic and one-variable linear equations at five difficulty levels. Each problem carries its
structured steps, so a worked solution can be written for it, and every answer is verified by
recomputing it from the operands.

A worked solution (:func:`worked_solution`) is the assistant completion that follows the prompt's
``"<think>\\n"``: a first pass, then ``num_rechecks`` re-checks that recompute the steps, then
``"\\n</think>\\nThe answer is \\\\boxed{42}."``. The first pass is either the steps written out
(``first_pass="steps"``) or a *glance* (``"glance"``): the result stated at once ("At a glance,
6*7 is 42."), the way a long-CoT model writes its first guess before working the problem out; the
first check of a glance opens with "Let me work it out.". A first pass may carry a *slip*
(one step's result wrong, the later steps carried on from it; :func:`slip_rate` grows with the
level): the first re-check then computes the steps right, says the result differs and the answer
follows the re-check. Without a slip a re-check is pure redundancy. So checking pays on hard
problems and only costs tokens on easy ones -- the trade-off difficulty-aware efficiency methods
are about (budget forcing: cutting the checks of a hard problem costs accuracy, of an easy one not).

Levels (all intermediate and final values are non-negative integers):

====  =========  ===============================  =========================================
lvl   kind       question                         ranges
====  =========  ===============================  =========================================
1     add        a+b                              a, b in 1..9
2     add_sub    a+b-c                            a, b in 1..9, c in 1..min(9, a+b)
3     mul_add    a*b+c                            a, b in 2..9, c in 1..9
4     paren      (a+b)*c-d                        a, b in 1..9, c in 2..5, d in 1..9
5     linear     solve ax+b=c for x               a in 2..9, x in 1..9, b in 1..9

Operands are single digits (easy to copy for a small model); intermediate values have up to
two digits. The whole space is about 5,000 problems.
====  =========  ===============================  =========================================
"""

from __future__ import annotations

import random
import re
from dataclasses import dataclass, field
from typing import Callable, Iterable, Sequence

from rlspec.config import STANDARD_INSTRUCTION as INSTRUCTION
from rlspec.errors import ConfigError, DataError

ALL_LEVELS: tuple[int, ...] = (1, 2, 3, 4, 5)
KINDS: dict[int, str] = {1: "add", 2: "add_sub", 3: "mul_add", 4: "paren", 5: "linear"}
FIRST_PASS_STYLES: tuple[str, ...] = ("steps", "glance")
WORK_IT_OUT = "Let me work it out."  # the first check after a glance
# how a one-step fact reads: "12*4=48" (worked steps, fact drills) or "12*4 is 48" (re-checks); a
# glance of levels 1-4 and a drill line may take either
FACT_PHRASINGS: tuple[str, ...] = ("=", " is ")
RECHECK_OPENERS: tuple[str, ...] = (
    "Wait, let me verify.",
    "Wait, let me double-check.",
    "Hmm, let me check that again.",
    "Wait, let me recompute to be sure.",
)
# default first-pass slip rate per level (share of first passes with one wrong step); level 1 never slips
SLIP_RATES: tuple[float, ...] = (0.0, 0.1, 0.3, 0.45, 0.6)
_OPS: dict[str, Callable[[int, int], int]] = {
    "+": lambda x, y: x + y,
    "-": lambda x, y: x - y,
    "*": lambda x, y: x * y,
    "/": lambda x, y: x // y,
}


@dataclass(frozen=True)
class Step:
    """One binary operation ``left op right = result`` of a solution."""

    left: int
    op: str
    right: int
    result: int

    def text(self, sep: str = "=") -> str:
        return f"{self.left}{self.op}{self.right}{sep}{self.result}"


@dataclass
class MathProblem:
    """One procedural problem. ``answer`` is the exact integer answer as a string."""

    uid: str
    question: str
    answer: str
    level: int
    kind: str
    expression: str = ""  # canonical form, e.g. "(3+5)*4-7" or "3x+4=19"
    steps: tuple[Step, ...] = field(default_factory=tuple)


# ----------------------------------------------------------------------------------- generation


def _steps_and_expr(level: int, nums: tuple[int, ...]) -> tuple[str, tuple[Step, ...], int]:
    """The canonical expression, the steps and the answer of a level's operand tuple."""
    if level == 1:
        a, b = nums
        return f"{a}+{b}", (Step(a, "+", b, a + b),), a + b
    if level == 2:
        a, b, c = nums
        s = a + b
        return f"{a}+{b}-{c}", (Step(a, "+", b, s), Step(s, "-", c, s - c)), s - c
    if level == 3:
        a, b, c = nums
        p = a * b
        return f"{a}*{b}+{c}", (Step(a, "*", b, p), Step(p, "+", c, p + c)), p + c
    if level == 4:
        a, b, c, d = nums
        s = a + b
        p = s * c
        steps = (Step(a, "+", b, s), Step(s, "*", c, p), Step(p, "-", d, p - d))
        return f"({a}+{b})*{c}-{d}", steps, p - d
    if level == 5:
        a, x, b = nums
        c = a * x + b
        steps = (Step(c, "-", b, c - b), Step(c - b, "/", a, x))
        return f"{a}x+{b}={c}", steps, x
    raise ConfigError(f"unknown task level {level}; valid levels are {list(ALL_LEVELS)}")


def _operand_space(level: int) -> list[tuple[int, ...]]:
    """Every operand tuple of a level (sorted; at most a few thousand)."""
    d = range(1, 10)
    if level == 1:
        return [(a, b) for a in d for b in d]
    if level == 2:
        return [(a, b, c) for a in d for b in d for c in range(1, min(9, a + b) + 1)]
    if level == 3:
        return [(a, b, c) for a in range(2, 10) for b in range(2, 10) for c in d]
    if level == 4:
        return [(a, b, c, e) for a in d for b in d for c in range(2, 6) for e in range(1, min(9, (a + b) * c) + 1)]
    if level == 5:
        return [(a, x, b) for a in range(2, 10) for x in d for b in d]
    raise ConfigError(f"unknown task level {level}; valid levels are {list(ALL_LEVELS)}")


def _space_size(level: int) -> int:
    """Number of distinct problems of a level (used to cap per-level sample sizes)."""
    return len(_operand_space(level))


def _question(level: int, expr: str, rng: random.Random) -> str:
    if level == 5:
        template = rng.choice(("Solve for x: {e}.", "Find x if {e}.", "What is x if {e}?"))
    else:
        template = rng.choice(("What is {e}?", "Compute {e}.", "Calculate {e}."))
    return template.format(e=expr)


def _evaluate(level: int, nums: tuple[int, ...]) -> int:
    """Recompute the answer independently of the step list (used to verify every problem)."""
    if level == 1:
        return nums[0] + nums[1]
    if level == 2:
        return nums[0] + nums[1] - nums[2]
    if level == 3:
        return nums[0] * nums[1] + nums[2]
    if level == 4:
        return (nums[0] + nums[1]) * nums[2] - nums[3]
    a, x, b = nums
    c = a * x + b
    sols = [v for v in range(-1000, 1001) if a * v + b == c]
    if len(sols) != 1:
        raise DataError(f"linear problem {nums} does not have a unique integer solution")
    return sols[0]


def verify_problem(problem: MathProblem) -> None:
    """Raise :class:`DataError` unless the problem's steps and answer are arithmetically right."""
    for s in problem.steps:
        if _OPS[s.op](s.left, s.right) != s.result or (s.op == "/" and s.left % s.right):
            raise DataError(f"problem {problem.uid}: wrong step {s.text()}")
    if not problem.steps or str(problem.steps[-1].result) != problem.answer:
        raise DataError(f"problem {problem.uid}: answer {problem.answer} does not match its last step")
    nums = tuple(int(t) for t in re.findall(r"\d+", problem.expression))
    if problem.level == 5:
        a, b, c = nums
        if a * int(problem.answer) + b != c:
            raise DataError(f"problem {problem.uid}: x = {problem.answer} does not solve {problem.expression}")
    elif str(_evaluate(problem.level, nums)) != problem.answer:
        raise DataError(f"problem {problem.uid}: {problem.expression} != {problem.answer}")


def make_problem(level: int, nums: tuple[int, ...], uid: str, rng: random.Random) -> MathProblem:
    """Build (and verify) the problem of a level with the given operands."""
    expr, steps, answer = _steps_and_expr(level, nums)
    if _evaluate(level, nums) != answer:
        raise DataError(f"problem {uid}: steps give {answer}, direct evaluation gives {_evaluate(level, nums)}")
    p = MathProblem(uid=uid, question=_question(level, expr, rng), answer=str(answer), level=level,
                    kind=KINDS[level], expression=expr, steps=steps)
    verify_problem(p)
    return p


def make_splits(
    seed: int = 0,
    n_train: int = 4000,
    n_test: int = 256,
    levels: Sequence[int] = ALL_LEVELS,
) -> tuple[list[MathProblem], list[MathProblem]]:
    """Deterministic train/test splits, spread evenly over ``levels``.

    The splits are disjoint by canonical expression (so also by question text): a test problem's
    exact computation never appears in train, though its single-step facts do (other levels and
    other problems share them). A level's train share is capped by how many distinct problems it
    has; the remainder is given to the other levels. Every answer is verified by recomputation.
    """
    levels = tuple(levels)
    if not levels or any(lv not in ALL_LEVELS for lv in levels):
        raise ConfigError(f"task levels must be a non-empty subset of {list(ALL_LEVELS)}, got {list(levels)}")
    if n_train < 0 or n_test < 0:
        raise ConfigError(f"n_train and n_test must be >= 0, got {n_train} and {n_test}")
    rng = random.Random(f"rlspec-tasks-{seed}")
    test_quota = _spread(n_test, levels, {lv: _space_size(lv) // 4 for lv in levels}, "n_test")
    seen: set[str] = set()
    test: list[MathProblem] = []
    for lv in levels:
        test += _draw(lv, test_quota[lv], rng, seen, f"test-L{lv}")
    random.Random(f"rlspec-tasks-test-order-{seed}").shuffle(test)  # any prefix mixes the levels
    left = {lv: _space_size(lv) - test_quota[lv] for lv in levels}
    train_quota = _spread(n_train, levels, left, "n_train")
    train: list[MathProblem] = []
    for lv in levels:
        train += _draw(lv, train_quota[lv], rng, seen, f"train-L{lv}")
    random.Random(f"rlspec-tasks-order-{seed}").shuffle(train)
    return train, test


def _spread(n: int, levels: tuple[int, ...], cap: dict[int, int], what: str) -> dict[int, int]:
    if n > sum(cap.values()):
        raise ConfigError(f"{what}={n} is more than the {sum(cap.values())} distinct problems of levels "
                          f"{list(levels)}; lower it")
    quota = {lv: 0 for lv in levels}
    remaining = n
    while remaining:
        open_lv = [lv for lv in levels if quota[lv] < cap[lv]]
        share = max(1, remaining // len(open_lv))
        for lv in open_lv:
            take = min(share, cap[lv] - quota[lv], remaining)
            quota[lv] += take
            remaining -= take
            if not remaining:
                break
    return quota


def _draw(level: int, n: int, rng: random.Random, seen: set[str], prefix: str) -> list[MathProblem]:
    space = [nums for nums in _operand_space(level) if _steps_and_expr(level, nums)[0] not in seen]
    out: list[MathProblem] = []
    for nums in rng.sample(space, n):
        seen.add(_steps_and_expr(level, nums)[0])
        out.append(make_problem(level, nums, f"{prefix}-{len(out):05d}", rng))
    return out


# ------------------------------------------------------------------------------ worked solutions


def slip_rate(level: int, rates: Sequence[float] = SLIP_RATES) -> float:
    """The share of first passes of a ``level`` problem that carry a slip (``rates[level - 1]``)."""
    return float(rates[level - 1])


def slip_index(problem: MathProblem) -> int:
    """The step a first pass can slip on: the last multiplication or division, else the last step."""
    hard = [i for i, s in enumerate(problem.steps) if s.op in "*/"]
    return hard[-1] if hard else len(problem.steps) - 1


def slipped_steps(problem: MathProblem) -> tuple[Step, ...]:
    """The problem's steps with one slip: the result of :func:`slip_index`'s step too high by a
    fixed amount (``a*b`` gives ``a*(b+1)``, the others one more), the later steps carried on from
    it. A slip is always the same for the same fact, like a person's recurring mistake, so a
    model that learns it keeps it at low temperatures too; upwards, so values stay >= 0."""
    k = slip_index(problem)
    out = list(problem.steps[:k])
    s = problem.steps[k]
    wrong = s.result + (s.left if s.op == "*" else 1)
    out.append(Step(s.left, s.op, s.right, wrong))
    carried = wrong
    for t in problem.steps[k + 1:]:
        value = _OPS[t.op](carried, t.right)
        out.append(Step(carried, t.op, t.right, value))
        carried = value
    return tuple(out)


def _step_line(i: int, n: int, s: Step, sep: str) -> str:
    if n == 1:
        return f"{s.text(sep)}."
    word = "First" if i == 0 else ("Finally" if i == n - 1 else "Then")
    return f"{word}, {s.text(sep)}."


def _step_lines(problem: MathProblem, steps: Sequence[Step] | None = None, sep: str = "=") -> list[str]:
    """The step lines; a re-check writes ``a*b is c`` (``sep=" is "``) where the first pass wrote
    ``a*b=c``, so it recomputes each result instead of copying the first pass's line."""
    steps = problem.steps if steps is None else tuple(steps)
    if problem.level == 5:
        a_str, rest = problem.expression.split("x+")
        b_str = rest.split("=")[0]
        sub, div = steps
        return [f"Subtract {b_str} from both sides: {a_str}x={sub.text(sep)}.",
                f"Divide both sides by {a_str}: x={div.text(sep)}."]
    return [_step_line(i, len(steps), s, sep) for i, s in enumerate(steps)]


def _solution_body(problem: MathProblem, steps: Sequence[Step] | None = None) -> str:
    steps = problem.steps if steps is None else tuple(steps)
    result = steps[-1].result
    if problem.level == 5:
        head, tail = f"We need to solve {problem.expression} for x.", f"So x = {result}."
    else:
        head, tail = f"We need to compute {problem.expression}.", f"So the result is {result}."
    return "\n".join([head, *_step_lines(problem, steps), tail]) + "\n"


def _glance_body(problem: MathProblem, value: int, sep: str = " is ") -> str:
    """The glance restates the expression before its value ("At a glance, 3+5 is 8.", the way a
    re-check line reads; with ``sep="="`` "At a glance, 3+5=8.", the way a worked step and a fact
    drill read): a one-step problem is then a fact the model knows, while a multi-step one must be
    computed in a single token, which a small model cannot do reliably."""
    if problem.level == 5:
        return f"We need to solve {problem.expression} for x.\nAt a glance, x = {value}.\n"
    return f"We need to compute {problem.expression}.\nAt a glance, {problem.expression}{sep}{value}.\n"


def glance_value_span(text: str) -> tuple[int, int] | None:
    """The character span of a glance's value in a completion ("At a glance, 3+5 is **8**."), or
    None without a glance: the tokens an SFT build may leave out of the loss."""
    m = _GLANCE_VALUE.search(text)
    return m.span(1) if m else None


def first_pass_end(text: str) -> int:
    """The index just past the first pass's closing line ("So the result is N." / "So x = N.", or a
    glance's "At a glance, 3+5 is 8." / "At a glance, 3+5=8." / "At a glance, x = N.") in a
    completion, or -1 when there is none (budget forcing cuts the thinking there)."""
    m = _FIRST_PASS_END.search(text)
    return m.end() if m else -1


def _recheck(problem: MathProblem, opener: str, believed: int, sep: str = " is ") -> str:
    """One re-check: the step lines computed right, then the result -- confirmed when it is what
    the solution believed so far, else corrected."""
    what = "x" if problem.level == 5 else "it"
    verdict = (f"Yes, {what} is {problem.answer}." if str(believed) == problem.answer
               else f"No, {what} is {problem.answer}, not {believed}.")
    return "\n".join([opener, *_step_lines(problem, sep=sep), verdict]) + "\n"


def sample_num_rechecks(rng: random.Random, max_rechecks: int = 4) -> int:
    """The number of redundant re-checks of a training solution: uniform over 0..max_rechecks."""
    if max_rechecks < 0:
        raise ConfigError(f"max_rechecks must be >= 0, got {max_rechecks}")
    return rng.randint(0, max_rechecks)


def worked_solution(problem: MathProblem, rng: random.Random, num_rechecks: int, slip: bool = False,
                    close: bool = True, first_pass: str = "steps", glance_sep: str = " is ") -> str:
    """The assistant completion after the prompt's ``"<think>\\n"``.

    A first pass through the steps (with one :func:`slipped_steps` slip when ``slip``), then
    ``num_rechecks`` re-checks (each recomputes the steps right, in its own words: ``8*4 is 32``
    where the first pass wrote ``8*4=32``, so it cannot copy a slipped line; the first one after a
    slip corrects the result, all others confirm it), then
    ``"\\n</think>\\nThe answer is \\boxed{A}."`` with the result believed last -- wrong when a
    slip had no re-check. ``close=False`` leaves the think block open (an over-thinking spiral cut
    off by the length cap). ``rng`` only picks the wording of the re-check openers.

    ``first_pass="glance"``: the first pass states the result without steps (the slipped result
    when ``slip``) and the first check, opened by :data:`WORK_IT_OUT`, is the worked steps
    (``a*b=c``); the later checks are re-checks as above. A glance is a guess that only working
    out can confirm, so its checks pay wherever glances go wrong. ``glance_sep`` phrases the glance
    of levels 1-4: ``" is "`` ("3+5 is 8") or ``"="`` ("3+5=8").
    """
    if num_rechecks < 0:
        raise ConfigError(f"num_rechecks must be >= 0, got {num_rechecks}")
    if first_pass not in FIRST_PASS_STYLES:
        raise ConfigError(f"first_pass must be one of {list(FIRST_PASS_STYLES)}, got {first_pass!r}")
    steps = slipped_steps(problem) if slip else problem.steps
    believed = steps[-1].result
    glance = first_pass == "glance"
    if glance_sep not in FACT_PHRASINGS:
        raise ConfigError(f"glance_sep must be one of {list(FACT_PHRASINGS)}, got {glance_sep!r}")
    parts = [_glance_body(problem, believed, glance_sep) if glance else _solution_body(problem, steps)]
    for i in range(num_rechecks):
        if glance and i == 0:
            parts.append(_recheck(problem, WORK_IT_OUT, believed, sep="="))
        else:
            parts.append(_recheck(problem, rng.choice(RECHECK_OPENERS), believed))
        believed = int(problem.answer)
    text = "".join(parts).rstrip("\n")
    return text + f"\n</think>\nThe answer is \\boxed{{{believed}}}." if close else text


# ------------------------------------------------------------------------------- prompts / rows


def format_prompt_messages(problem: MathProblem) -> list[dict]:
    """The chat messages of a problem's prompt (a single user turn)."""
    return [{"role": "user", "content": f"{problem.question}\n{INSTRUCTION}"}]


def rows(problems: Iterable[MathProblem]) -> list[dict]:
    """Dataset rows with keys question/answer/level/uid (the JSONL schema of the data splits)."""
    return [{"question": p.question, "answer": p.answer, "level": p.level, "uid": p.uid} for p in problems]


_BOXED = re.compile(r"\\boxed\{\s*(-?\d+)\s*\}")
_GLANCE = r"At a glance, (?:[^\n]* is |x = |[^\n =]+=)"  # "At a glance, 3+5 is " / "x = " / "3+5="
_FIRST_PASS_END = re.compile(rf"(?:(?:So (?:the result is|x =) )|{_GLANCE})-?\d+\.")
_GLANCE_VALUE = re.compile(rf"{_GLANCE}(-?\d+)\.")
_RECHECK = re.compile("|".join(re.escape(o) for o in (WORK_IT_OUT, *RECHECK_OPENERS)))


def extract_boxed_int(text: str) -> str | None:
    """The integer inside the last ``\\boxed{...}`` of a response, or None."""
    found = _BOXED.findall(text)
    return found[-1] if found else None


def count_rechecks(response: str) -> int:
    """Number of re-check openers in a response's think block (for length diagnostics)."""
    return len(_RECHECK.findall(response.split("</think>")[0]))


def is_well_formed(response: str) -> bool:
    """True when the response closes its think block and then gives a boxed integer."""
    head, sep, tail = response.partition("</think>")
    return bool(sep) and extract_boxed_int(tail) is not None
