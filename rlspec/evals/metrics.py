r"""Benchmark metrics over k samples per problem: pass@1, unbiased pass@k, maj@k, tokens, truncation.

All functions are pure: they take per-problem lists of per-sample verdicts / answers / token counts
and return floats. The reference is efficient-reasoning.md, "Standard evaluation protocol":
accuracy is pass@1 averaged over the k samples of each problem, lengths are response tokens.

* pass@k -- the unbiased estimator of Chen et al. 2021 ("Evaluating Large Language Models Trained
  on Code", arXiv 2107.03374, Sec. 2.1, Eq. 1): with ``n`` samples of which ``c`` are correct,
  ``pass@k = 1 - C(n - c, k) / C(n, k)``, computed in the numerically stable product form of the
  paper's Fig. 3, ``1 - prod_{i = n - c + 1}^{n} (1 - k / i)``.
* maj@k -- majority vote (self-consistency, Wang et al. 2022, arXiv 2203.11171) over the k
  samples' extracted final answers; ties go to the answer seen first; samples without an answer
  do not vote; the problem counts as solved when the voted answer grades correct.
"""

from __future__ import annotations

from typing import Any, Sequence

from rlspec.evals.efficiency import aes

__all__ = [
    "aes_against",
    "majority_answer",
    "maj_at_k",
    "mean_pass_at_1",
    "mean_pass_at_k",
    "mean_tokens",
    "pass_at_k",
    "summarize_problems",
    "truncation_rate",
]


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k of one problem with ``n`` samples, ``c`` correct (arXiv 2107.03374, Eq. 1).

    ``1 - C(n-c, k) / C(n, k) = 1 - prod_{i=n-c+1}^{n} (1 - k/i)``; 1.0 when ``n - c < k``
    (every k-subset holds a correct sample).

    >>> pass_at_k(4, 1, 2)  # 1 - C(3,2)/C(4,2) = 1 - 3/6
    0.5
    """
    for name, value in (("n", n), ("c", c), ("k", k)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise ValueError(f"pass_at_k: {name} must be an integer >= 0, got {value!r}")
    if not 1 <= k <= n:
        raise ValueError(f"pass_at_k: need 1 <= k <= n (k={k}, n={n}); draw at least k samples per problem")
    if c > n:
        raise ValueError(f"pass_at_k: c={c} correct samples out of n={n}")
    if n - c < k:
        return 1.0
    prod = 1.0
    for i in range(n - c + 1, n + 1):
        prod *= 1.0 - k / i
    return 1.0 - prod


def _check_groups(verdicts: Sequence[Sequence[bool]]) -> None:
    if not verdicts:
        raise ValueError("no problems to score")
    for i, group in enumerate(verdicts):
        if not group:
            raise ValueError(f"problem {i} has no samples")


def mean_pass_at_1(verdicts: Sequence[Sequence[bool]]) -> float:
    """pass@1 averaged over each problem's samples, then over problems: ``mean_p (c_p / n_p)``."""
    _check_groups(verdicts)
    return sum(sum(map(bool, g)) / len(g) for g in verdicts) / len(verdicts)


def mean_pass_at_k(verdicts: Sequence[Sequence[bool]], k: int) -> float:
    """Mean over problems of :func:`pass_at_k` ``(n_p, c_p, k)``."""
    _check_groups(verdicts)
    return sum(pass_at_k(len(g), sum(map(bool, g)), k) for g in verdicts) / len(verdicts)


def _vote_key(answer: str) -> str:
    return "".join(answer.split())  # "\frac{1}{2}" and "\frac{1} {2}" are one vote


def majority_answer(answers: Sequence[str | None]) -> int | None:
    """Index of the sample whose answer wins the vote; ``None`` when no sample has an answer.

    Answers are compared as text with whitespace removed; a tie goes to the answer whose first
    occurrence comes first; ``None`` (no extractable answer) does not vote.

    >>> majority_answer(["3", None, "4", "4", "3"])  # 3 and 4 tie with 2 votes; "3" came first
    0
    """
    counts: dict[str, int] = {}
    first: dict[str, int] = {}
    for i, a in enumerate(answers):
        if a is None:
            continue
        key = _vote_key(a)
        counts[key] = counts.get(key, 0) + 1
        first.setdefault(key, i)
    if not counts:
        return None
    best = max(counts, key=lambda key: (counts[key], -first[key]))
    return first[best]


def maj_at_k(answers: Sequence[Sequence[str | None]], verdicts: Sequence[Sequence[bool]]) -> float:
    """Fraction of problems whose majority-voted answer is correct.

    The voted answer's verdict is the grader's verdict on the first sample that gave it (the same
    as grading the voted answer itself: the grader only looks at the extracted answer).
    """
    _check_groups(verdicts)
    if len(answers) != len(verdicts):
        raise ValueError(f"maj_at_k: {len(answers)} answer groups but {len(verdicts)} verdict groups")
    solved = 0
    for a, v in zip(answers, verdicts):
        if len(a) != len(v):
            raise ValueError(f"maj_at_k: a problem has {len(a)} answers but {len(v)} verdicts")
        winner = majority_answer(a)
        solved += winner is not None and bool(v[winner])
    return solved / len(verdicts)


def mean_tokens(tokens: Sequence[Sequence[int]], verdicts: Sequence[Sequence[bool]]) -> dict[str, float]:
    """Mean response tokens over all samples, the correct ones and the incorrect ones (NaN if none)."""
    flat = [(int(t), bool(v)) for ts, vs in zip(tokens, verdicts, strict=True) for t, v in zip(ts, vs, strict=True)]

    def mean(xs: list[int]) -> float:
        return sum(xs) / len(xs) if xs else float("nan")

    return {
        "mean_tokens": mean([t for t, _ in flat]),
        "mean_tokens_correct": mean([t for t, v in flat if v]),
        "mean_tokens_incorrect": mean([t for t, v in flat if not v]),
    }


def truncation_rate(truncated: Sequence[Sequence[bool]]) -> float:
    """Fraction of all samples that hit the token cap."""
    flat = [bool(x) for g in truncated for x in g]
    if not flat:
        raise ValueError("no samples to score")
    return sum(flat) / len(flat)


def summarize_problems(records: Sequence[dict[str, Any]], k: int) -> dict[str, float]:
    """All metrics of a benchmark from the runner's per-problem records (``samples`` with
    ``correct``, ``answer``, ``tokens``, ``finish_reason``)."""
    verdicts = [[s["correct"] for s in r["samples"]] for r in records]
    out = {
        "num_problems": float(len(records)),
        "num_samples": float(sum(len(v) for v in verdicts)),
        "pass@1": mean_pass_at_1(verdicts),
        f"pass@{k}": mean_pass_at_k(verdicts, k),
        f"maj@{k}": maj_at_k([[s["answer"] for s in r["samples"]] for r in records], verdicts),
    }
    out.update(mean_tokens([[s["tokens"] for s in r["samples"]] for r in records], verdicts))
    out["truncation_rate"] = truncation_rate([[s["finish_reason"] == "length" for s in r["samples"]] for r in records])
    return out


def aes_against(metrics: dict[str, float], base: dict[str, float], **kwargs: float) -> float | None:
    """AES (O1-Pruner, :func:`rlspec.evals.efficiency.aes`) of ``metrics`` against a base result of
    the same benchmark and settings, on pass@1 and mean tokens; ``None`` when undefined (a base
    with 0 accuracy or 0 tokens)."""
    try:
        return aes(metrics["pass@1"], metrics["mean_tokens"], base["pass@1"], base["mean_tokens"], **kwargs)
    except ValueError:
        return None
