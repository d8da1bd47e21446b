"""What a step logs about its rollouts, and the sampled completions it writes."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Sequence

import torch

from rlspec.rollout.base import FINISH_LENGTH
from rlspec.trainers.batch import Group


def percentile(values: Sequence[float], q: float) -> float:
    if not values:
        return float("nan")
    return float(torch.quantile(torch.tensor(values, dtype=torch.float64), q))


def mean(values: Sequence[float]) -> float:
    return sum(values) / len(values) if values else float("nan")


def rollout_metrics(generated: list[Group], kept: list[Group], chunks: int) -> dict[str, float]:
    """Rewards, accuracy, lengths and dynamic-sampling counts of a step's generated groups."""
    rewards = [r for g in generated for r in g.rewards]
    correct = [float(c) for g in generated for c in g.correct]
    lengths = [float(len(r)) for g in generated for r in g.response_ids]
    truncated = [float(f == FINISH_LENGTH) for g in generated for f in g.finish_reasons]
    len_correct = [len(r) for g in generated for r, c in zip(g.response_ids, g.correct) if c]
    len_wrong = [len(r) for g in generated for r, c in zip(g.response_ids, g.correct) if not c]
    zero_std = [float(max(g.rewards) == min(g.rewards)) for g in generated]
    metrics = {
        "reward/mean": mean(rewards),
        "reward/std": float(torch.tensor(rewards).std()) if len(rewards) > 1 else 0.0,
        "acc/mean": mean(correct),
        "response_length/mean": mean(lengths),
        "response_length/p50": percentile(lengths, 0.5),
        "response_length/p90": percentile(lengths, 0.9),
        "response_length/max": max(lengths) if lengths else float("nan"),
        "response_length/min": min(lengths) if lengths else float("nan"),
        "response_length/clip_ratio": mean(truncated),
        "response_length/correct_mean": mean(len_correct),
        "response_length/incorrect_mean": mean(len_wrong),
        "batch/frac_reward_zero_std": mean(zero_std),
        "batch/groups_generated": float(len(generated)),
        "batch/groups_kept": float(len(kept)),
        "batch/gen_chunks": float(chunks),
    }
    for name in generated[0].per_term if generated else []:
        metrics[f"reward/{name}"] = mean([v for g in generated for v in g.per_term[name]])
    return metrics


def write_completions(path: Path, step: int, groups: list[Group], rows: Sequence[dict[str, Any]],
                      per_step: int = 4) -> None:
    """Append the first completion of the first ``per_step`` groups to ``completions.jsonl``."""
    with open(path, "a", encoding="utf-8") as f:
        for group in groups[:per_step]:
            row = rows[group.row_index]
            f.write(json.dumps({
                "step": step,
                "question": row["question"],
                "answer": row["answer"],
                "completion": group.texts[0],
                "reward": group.rewards[0],
                "correct": group.correct[0],
                "tokens": len(group.response_ids[0]),
                "finish_reason": group.finish_reasons[0],
            }) + "\n")
