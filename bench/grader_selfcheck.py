r"""Grader self-check: every benchmark file's own reference answers must grade as correct.

For each file in ``../shared/data`` (next to the checkout, or ``--data DIR``), every problem's
reference answer is written as a model output ("...</think>\nThe answer is \boxed{ANSWER}.")
and graded against the same reference with the shared grader
(:func:`rlspec.rewards.grader.grade`, ``require_think_close=True``). For MATH-500 the reference
*solution* text (which ends in its own ``\boxed{}``) is graded as well, and MATH test (which has
no answer column) uses its solutions' boxed answers as the gold. Issue 5's target: >= 99.5 % per
file. Prints n / correct / % per file and every failure.

    python bench/grader_selfcheck.py [--data DIR] [--only NAME ...] [--limit N]

Exit status 1 if any file is under the target.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from rlspec.evals.benchmarks import load_benchmark  # noqa: E402
from rlspec.rewards.grader import extract_final_answer, grade  # noqa: E402

TARGET = 0.995
DEFAULT_DATA = REPO.parent / "shared" / "data"


def as_model_output(answer: str) -> str:
    return f"<think>\nLet me work this out.\n</think>\nThe answer is $\\boxed{{{answer}}}$."


@dataclass
class Case:
    uid: str
    response: str
    gold: str


@dataclass
class FileResult:
    name: str
    n: int = 0
    correct: int = 0
    seconds: float = 0.0
    failures: list[tuple[str, str]] = field(default_factory=list)  # (uid, reason)

    @property
    def fraction(self) -> float:
        return self.correct / self.n if self.n else float("nan")


def _reason(case: Case) -> str:
    answer = extract_final_answer(case.response, require_think_close=True)
    gold = extract_final_answer(case.gold) if "\\boxed" in case.gold else case.gold
    if answer is None:
        return f"no answer extracted from the response (gold {case.gold[:80]!r})"
    if gold is None:
        return f"no gold extracted from {case.gold[:80]!r}"
    return f"extracted {answer!r} not verified equal to gold {gold!r}"


def _answer_cases(name: str, path: Path) -> list[Case]:
    return [Case(p.uid, as_model_output(p.answer), p.answer) for p in load_benchmark(name, path)]


def _json_rows(path: Path) -> list[dict]:
    text = path.read_text(encoding="utf-8")
    if path.suffix == ".json":
        return json.loads(text)
    return [json.loads(line) for line in text.splitlines() if line.strip()]


def _math500_solution_cases(path: Path) -> list[Case]:
    # the solution text itself is the model output (after a </think>); the gold is the answer column
    return [Case(p.uid, f"<think>\n</think>\n{p.solution}", p.answer) for p in load_benchmark("math500", path)]


def _plain_answer_cases(path: Path, prefix: str) -> list[Case]:
    rows = _json_rows(path)
    return [Case(f"{prefix}/{i}", as_model_output(str(r["answer"]).strip()), str(r["answer"]).strip())
            for i, r in enumerate(rows)]


def _math_test_cases(path: Path) -> list[Case]:
    # no answer column: the gold is the solution (the grader takes its last \boxed{}), and the
    # model output is that boxed answer re-boxed -- checks extraction and math-verify's parse.
    cases = []
    for i, r in enumerate(_json_rows(path)):
        boxed = extract_final_answer(r["solution"])
        cases.append(Case(f"math_test/{r.get('idx', i)}", as_model_output(boxed or ""), r["solution"]))
    return cases


def checks(data: Path) -> dict[str, Callable[[], list[Case]]]:
    return {
        "math500/test.jsonl [answer]": lambda: _answer_cases("math500", data / "math500/test.jsonl"),
        "math500/test.jsonl [solution]": lambda: _math500_solution_cases(data / "math500/test.jsonl"),
        "aime24/test.jsonl": lambda: _answer_cases("aime24", data / "aime24/test.jsonl"),
        "aime25/test.jsonl": lambda: _answer_cases("aime25", data / "aime25/test.jsonl"),
        "aime25/matharena (answers.csv)": lambda: _answer_cases("aime25", data / "aime25/matharena"),
        "amc23/test.jsonl": lambda: _answer_cases("amc23", data / "amc23/test.jsonl"),
        "gsm8k/test.jsonl": lambda: _answer_cases("gsm8k", data / "gsm8k/test.jsonl"),
        "gsm8k/train.jsonl": lambda: _answer_cases("gsm8k", data / "gsm8k/train.jsonl"),
        "math/test.jsonl [solution boxed]": lambda: _math_test_cases(data / "math/test.jsonl"),
        "math/train.json": lambda: _plain_answer_cases(data / "math/train.json", "math_train"),
        "aime_1983_2023/train.json": lambda: _plain_answer_cases(data / "aime_1983_2023/train.json", "aime_1983_2023"),
    }


def run_check(name: str, cases: Iterable[Case], limit: int | None = None) -> FileResult:
    result = FileResult(name)
    started = time.perf_counter()
    for i, case in enumerate(cases):
        if limit is not None and i >= limit:
            break
        result.n += 1
        if grade(case.response, case.gold, require_think_close=True):
            result.correct += 1
        else:
            result.failures.append((case.uid, _reason(case)))
    result.seconds = time.perf_counter() - started
    return result


def selfcheck(data: Path, only: list[str] | None = None, limit: int | None = None) -> list[FileResult]:
    results = []
    for name, make in checks(data).items():
        if only and not any(o in name for o in only):
            continue
        results.append(run_check(name, make(), limit))
    return results


def format_table(results: list[FileResult]) -> str:
    lines = ["| file | n | correct | % | s |", "| --- | ---: | ---: | ---: | ---: |"]
    for r in results:
        lines.append(f"| {r.name} | {r.n} | {r.correct} | {100 * r.fraction:.2f} | {r.seconds:.1f} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA)
    parser.add_argument("--only", nargs="*", help="substrings of the file names to check")
    parser.add_argument("--limit", type=int, default=None, help="first N problems per file")
    args = parser.parse_args(argv)
    if not args.data.is_dir():
        print(f"no data directory {args.data}; pass --data DIR", file=sys.stderr)
        return 2
    results = selfcheck(args.data, args.only, args.limit)
    print(format_table(results))
    for r in results:
        for uid, reason in r.failures:
            print(f"FAIL {r.name} {uid}: {reason}")
    below = [r.name for r in results if r.fraction < TARGET]
    if below:
        print(f"under the {100 * TARGET:.1f}% target: {', '.join(below)}")
    return 1 if below else 0


if __name__ == "__main__":
    sys.exit(main())
