"""L1 / LCPO (arXiv 2503.04697, Sec. 3): a target length in every prompt.

Each prompt gets a target ``n_gold`` drawn uniformly from ``[low, high]`` (seeded per chunk, so a
resumed run draws the same targets) and the user message is followed by "Think for {n} tokens."
(L1-Max: "Think for maximum {n} tokens."). The targets go to the ``l1_exact`` / ``l1_max`` reward
terms (:mod:`rlspec.rewards.l1`) as the ``target_length`` column.
"""

from __future__ import annotations

import random
from typing import Any, Sequence

from rlspec.data import build_prompt_ids
from rlspec.errors import ConfigError
from rlspec.registry import ROLLOUT_HOOKS
from rlspec.rewards.l1 import L1_TEMPLATE
from rlspec.trainers.hooks.base import RolloutChunk, RolloutHook
from rlspec.trainers.hooks.hbpo import KEY, BudgetedPrompts


def l1_budgeted_prompts(questions: Sequence[str], n: int, tokenizer: Any, instruction: str, low: int, high: int,
                        template: str, rng: random.Random, prompt_template: str = "chat") -> BudgetedPrompts:
    """One target per prompt, ``U{low..high}``, appended to the user message (the ``{question}`` of a
    plain ``data.prompt_template``); ``n`` copies each."""
    if not 0 < int(low) <= int(high):
        raise ConfigError(f"{KEY}.low and {KEY}.high must satisfy 0 < low <= high, got {low} and {high}")
    ids: list[list[int]] = []
    out_budgets: list[int] = []
    for q in questions:
        budget = rng.randint(int(low), int(high))
        target = template.format(budget=budget)
        row = {"question": f"{q}" if instruction else f"{q} {target}"}
        p = build_prompt_ids(tokenizer, [row], f"{instruction} {target}" if instruction else "", prompt_template)[0]
        ids += [p] * n
        out_budgets += [budget] * n
    return BudgetedPrompts(ids, out_budgets)


@ROLLOUT_HOOKS.register("l1", group="budget")
class L1Targets(RolloutHook):
    name = "l1"
    config_key = KEY
    kwargs_keys = frozenset({"low", "high", "template"})

    def check(self) -> None:
        if self.ctx.train_rows:
            self._prompts([0], 0)

    def _prompts(self, row_indices: list[int], seed: int) -> BudgetedPrompts:
        kw, cfg = self.kwargs, self.ctx.cfg
        return l1_budgeted_prompts(
            [self.ctx.train_rows[i]["question"] for i in row_indices], cfg.rollout.n, self.ctx.tokenizer,
            cfg.data.instruction, kw.get("low", 100), kw.get("high", 4000), kw.get("template") or L1_TEMPLATE,
            random.Random(seed), cfg.data.prompt_template,
        )

    def before_rollout(self, chunk: RolloutChunk) -> None:
        out = self._prompts(chunk.row_indices, chunk.seed)
        chunk.prompt_ids, chunk.budgets = out.prompt_ids, out.budgets
        chunk.columns["target_length"] = out.budgets  # the l1_exact / l1_max reward terms read it
