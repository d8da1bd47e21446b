"""Held-out evaluation: pass@1 averaged over k samples, tokens per answer, truncation rate.

Used by the trainer at the start and end of a run (and every ``eval.every`` steps); every sample
is written to a JSONL file so numbers can be audited.
"""

from __future__ import annotations

import json
import time
from collections import defaultdict
from pathlib import Path
from typing import Any, Callable, Sequence

from rlspec.config import EvalConfig
from rlspec.models import decode_responses
from rlspec.rewards.grader import grade_batch
from rlspec.rollout.base import FINISH_LENGTH, RolloutEngine, SamplingParams


def summarize(records: Sequence[dict[str, Any]]) -> dict[str, float]:
    """Aggregate per-sample records (``correct``, ``tokens``, ``truncated``, ``level``)."""
    n = len(records)
    if n == 0:
        return {}
    correct = [r for r in records if r["correct"]]
    wrong = [r for r in records if not r["correct"]]
    mean = lambda xs: sum(xs) / len(xs) if xs else float("nan")  # noqa: E731
    accuracy = len(correct) / n
    mean_tokens = mean([r["tokens"] for r in records])
    out = {
        "eval/accuracy": accuracy,
        "eval/mean_tokens": mean_tokens,
        "eval/mean_tokens_correct": mean([r["tokens"] for r in correct]),
        "eval/mean_tokens_incorrect": mean([r["tokens"] for r in wrong]),
        "eval/truncation_rate": mean([float(r["truncated"]) for r in records]),
        "eval/accuracy_per_1k_tokens": 1000.0 * accuracy / mean_tokens if mean_tokens else float("nan"),
        "eval/num_samples": float(n),
    }
    by_level: dict[Any, list[dict[str, Any]]] = defaultdict(list)
    for r in records:
        if r.get("level") is not None:
            by_level[r["level"]].append(r)
    for level, rs in sorted(by_level.items(), key=lambda kv: str(kv[0])):
        out[f"eval/level{level}/accuracy"] = mean([float(r["correct"]) for r in rs])
        out[f"eval/level{level}/mean_tokens"] = mean([r["tokens"] for r in rs])
    return out


def heldout_streams(positions: Sequence[int], k: int) -> tuple[int, ...]:
    """Stream keys of ``k`` samples of the problems at ``positions`` of the eval list: ``i * k + s``
    -- the request index of one call over the whole list, so one call samples what it did before
    streams existed.

    >>> heldout_streams([0, 2], 2)
    (0, 1, 4, 5)
    """
    return tuple(i * k + s for i in positions for s in range(k))


def evaluate(
    engine: RolloutEngine,
    tokenizer: Any,
    rows: Sequence[dict[str, Any]],
    prompt_ids: Sequence[Sequence[int]],
    settings: EvalConfig,
    eos_ids: Sequence[int],
    *,
    require_think_close: bool = False,
    grader_timeout_s: float = 5.0,
    last_number_fallback: bool = False,
    out_path: str | Path | None = None,
    decide_think_close: Callable[[list[str], list[str]], bool] | None = None,
) -> dict[str, float]:
    """Sample ``k`` responses per problem (``eval.*``: samples, sampling, seed), grade them
    (``reward.require_think_close``, ``reward.grader_timeout_s``, ``reward.last_number_fallback``),
    return summary metrics.

    ``prompt_ids[i]`` is the tokenised chat prompt of ``rows[i]``. Sample ``s`` of problem ``i``
    draws from random stream ``i * k + s`` (:func:`heldout_streams`) under ``eval.seed``, so its
    tokens do not depend on ``eval.num_problems``, on the engine's batch size, on Ray's chunks or
    on the data-parallel ranks (``rlspec.eval`` with ``eval.seeding=shared`` draws the same).
    """
    k = settings.samples_per_problem
    params = SamplingParams(
        max_new_tokens=settings.max_new_tokens,
        temperature=settings.temperature,
        top_p=settings.top_p,
        top_k=settings.top_k,
        seed=settings.seed,
        streams=heldout_streams(range(len(prompt_ids)), k),
    )
    started = time.perf_counter()
    repeated = [list(p) for p in prompt_ids for _ in range(k)]
    result = engine.generate(repeated, params)
    texts = decode_responses(tokenizer, result.response_ids, eos_ids)
    if decide_think_close is not None:  # the trainer's reward.think_tags check, before grading
        require_think_close = decide_think_close(texts, result.finish_reasons)
    golds = [rows[i // k]["answer"] for i in range(len(repeated))]
    verdicts = grade_batch(texts, golds, require_think_close=require_think_close, timeout_s=grader_timeout_s,
                           last_number_fallback=last_number_fallback)
    records = []
    for i, (text, ok) in enumerate(zip(texts, verdicts)):
        row = rows[i // k]
        records.append(
            {
                "problem": i // k,
                "sample": i % k,
                "uid": row.get("uid"),
                "level": row.get("level"),
                "answer": row["answer"],
                "correct": bool(ok),
                "tokens": len(result.response_ids[i]),
                "truncated": result.finish_reasons[i] == FINISH_LENGTH,
                "response": text,
            }
        )
    metrics = summarize(records)
    metrics["eval/seconds"] = time.perf_counter() - started
    if out_path is not None:
        out_path = Path(out_path)
        out_path.parent.mkdir(parents=True, exist_ok=True)
        with open(out_path, "w", encoding="utf-8") as f:
            for record in records:
                f.write(json.dumps(record) + "\n")
    return metrics
