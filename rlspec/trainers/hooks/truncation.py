"""Per-response truncation after sampling (``rollout.truncation``): the shared cut, and DA-DLER's limits.

A truncation hook gives every response a length limit; responses longer than theirs are cut to it
(finish reason ``length``) and scored on the clipped text. Cutting after sampling yields exactly the
tokens a rollout capped at the limit would have sampled (the prefix distribution does not depend on
the cap); only compute is spent. PALU's per-question budgets are in :mod:`rlspec.trainers.hooks.palu`.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from rlspec.errors import ConfigError
from rlspec.models import decode_responses
from rlspec.registry import ROLLOUT_HOOKS
from rlspec.rewards.dler import difficulty_aware_truncation_lengths
from rlspec.rewards.grader import grade_batch
from rlspec.rollout.base import FINISH_LENGTH
from rlspec.trainers.hooks.base import RolloutChunk, RolloutHook


class TruncationHook(RolloutHook):
    """Cuts each response at :meth:`limits` before scoring (and records them as ``truncation_limit``)."""

    config_key = "rollout.truncation.kwargs"

    def __init__(self, ctx, kwargs: dict[str, Any]) -> None:
        super().__init__(ctx, kwargs)
        self.config_key = f"rollout.truncation.kwargs ({self.name})"

    def limits(self, chunk: RolloutChunk) -> list[int]:
        raise NotImplementedError

    def before_scoring(self, chunk: RolloutChunk) -> None:
        limits = self.limits(chunk)
        result = chunk.result
        ids, logprobs, reasons = [], [], []
        for i, limit in enumerate(limits):
            r = result.response_ids[i]
            if len(r) > limit:
                ids.append(r[:limit])
                logprobs.append(result.response_logprobs[i][:limit])
                reasons.append(FINISH_LENGTH)
            else:
                ids.append(r)
                logprobs.append(result.response_logprobs[i])
                reasons.append(result.finish_reasons[i])
        chunk.result = dataclasses.replace(result, response_ids=ids, response_logprobs=logprobs, finish_reasons=reasons)
        chunk.texts = decode_responses(self.ctx.tokenizer, ids, self.ctx.eos_ids)
        chunk.batch = dataclasses.replace(chunk.batch, completions=chunk.texts, completion_ids=ids, finish_reasons=reasons,
                                          correct=[], columns={**chunk.batch.columns, "truncation_limit": limits})


@ROLLOUT_HOOKS.register("difficulty_aware", group="truncation")
class DifficultyAwareTruncation(TruncationHook):
    """DA-DLER (arXiv 2510.15110 Sec. 3.5): a prompt's limit follows its group's correctness ratio on
    the full-length rollouts (``kwargs.tiers``; hard prompts keep the rollout cap)."""

    name = "difficulty_aware"
    kwargs_keys = frozenset({"tiers", "default_length"})

    def _kwargs(self, cap: int) -> dict[str, Any]:
        return {"default_length": cap, **self.kwargs}

    def check(self) -> None:
        cap = self.ctx.max_length_at(0)
        kwargs = self._kwargs(cap)
        difficulty_aware_truncation_lengths([True, False], [0, 0], **kwargs)
        lengths = [int(t[1]) for t in kwargs.get("tiers", ())] + [int(kwargs["default_length"])]
        too_long = [n for n in lengths if n > cap]
        if too_long:
            raise ConfigError(f"rollout.truncation.kwargs: truncation lengths {too_long} exceed the rollout "
                              f"cap {cap} (rollout.max_response_length); a truncation length must be <= the cap")

    def limits(self, chunk: RolloutChunk) -> list[int]:
        reward = self.ctx.cfg.reward
        # graded here without the reward terms, so stateful terms score each batch once
        full_correct = grade_batch(chunk.texts, chunk.batch.answers, require_think_close=reward.require_think_close,
                                   timeout_s=reward.grader_timeout_s, last_number_fallback=reward.last_number_fallback)
        return difficulty_aware_truncation_lengths(full_correct, chunk.batch.group_ids, **self._kwargs(chunk.max_length))
