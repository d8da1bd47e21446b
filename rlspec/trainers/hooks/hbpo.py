"""HBPO's budget exploration (arXiv 2507.15844, Sec. 3.1): one budget prefill per subgroup.

The ``n`` rollouts of a prompt are split into equal subgroups, one per budget; each subgroup's
prompt is the chat prompt (which ends after ``<think>``) followed by an assistant *prefill* that
states the budget ("I will answer the question within {budget} tokens"; ``hbpo.variant=code``:
the released code's "with"). Evaluation uses no prefill. The reward is ``reward.terms.hbpo``
(:mod:`rlspec.rewards.hbpo`), the advantage ``trainer.adv_estimator=hbpo``: this hook gives it the
budget baseline ``f2(b)`` (Eq. 4) and logs each subgroup's length and accuracy.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

import torch

from rlspec.errors import ConfigError
from rlspec.registry import ROLLOUT_HOOKS
from rlspec.rewards.hbpo import HBPO_TEMPLATES, hbpo_f2
from rlspec.trainers.hooks.base import RolloutChunk, RolloutHook
from rlspec.trainers.metrics import mean

KEY = "rollout.budget.kwargs"
DEFAULT_BUDGETS = (512, 1024, 2048, 2560)  # the paper's, for L_max = 4096


@dataclass
class BudgetedPrompts:
    """One entry per rollout (``P * n`` of them, prompt-major like the engine's input)."""

    prompt_ids: list[list[int]]
    budgets: list[int]


def hbpo_budgeted_prompts(prompt_ids: Sequence[Sequence[int]], n: int, budgets: Sequence[int], tokenizer: Any,
                          template: str) -> BudgetedPrompts:
    """Split each prompt's ``n`` rollouts into ``len(budgets)`` equal subgroups (in budget order)
    and append the budget prefill to the prompt of each subgroup."""
    if not budgets or any(int(b) <= 0 for b in budgets):
        raise ConfigError(f"{KEY}.budgets must be a non-empty list of positive token counts, got {list(budgets)}")
    if n % len(budgets):
        raise ConfigError(
            f"rollout.n={n} must be a multiple of the {len(budgets)} HBPO budgets ({KEY}.budgets); "
            f"e.g. rollout.n={len(budgets) * max(1, n // len(budgets))}"
        )
    per = n // len(budgets)
    prefills = {int(b): list(tokenizer(template.format(budget=int(b)), add_special_tokens=False)["input_ids"])
                for b in budgets}
    ids: list[list[int]] = []
    out_budgets: list[int] = []
    for p in prompt_ids:
        for b in budgets:
            for _ in range(per):
                ids.append(list(p) + prefills[int(b)])
                out_budgets.append(int(b))
    return BudgetedPrompts(ids, out_budgets)


@ROLLOUT_HOOKS.register("hbpo", group="budget")
class HbpoBudgets(RolloutHook):
    name = "hbpo"
    config_key = KEY
    kwargs_keys = frozenset({"budgets", "template"})

    def check(self) -> None:
        if self.ctx.train_prompt_ids:
            self._prompts([self.ctx.train_prompt_ids[0]])

    def _prompts(self, prompts: Sequence[Sequence[int]]) -> BudgetedPrompts:
        template = self.kwargs.get("template") or HBPO_TEMPLATES[self.ctx.cfg.hbpo.variant]
        return hbpo_budgeted_prompts(prompts, self.ctx.cfg.rollout.n, self.kwargs.get("budgets", DEFAULT_BUDGETS),
                                     self.ctx.tokenizer, template)

    def before_rollout(self, chunk: RolloutChunk) -> None:
        out = self._prompts([self.ctx.train_prompt_ids[i] for i in chunk.row_indices])
        chunk.prompt_ids, chunk.budgets = out.prompt_ids, out.budgets
        chunk.columns["budget"] = out.budgets  # the hbpo reward term reads it

    def advantage_inputs(self, budgets: torch.Tensor | None) -> dict[str, Any]:
        h = self.ctx.cfg.hbpo
        assert budgets is not None
        return {"f2_baseline": torch.tensor([hbpo_f2(b, beta=h.beta, l_max=h.l_max) for b in budgets.tolist()]),
                "variant": h.variant}

    def metrics(self, groups: Sequence[Any]) -> dict[str, float]:
        """Does each budget subgroup answer within its budget?"""
        by_budget: dict[int, list[tuple[int, bool]]] = {}
        for g in groups:
            for b, r, c in zip(g.budgets or [], g.response_ids, g.correct):
                by_budget.setdefault(int(b), []).append((len(r), c))
        out = {}
        for b, items in sorted(by_budget.items()):
            out[f"budget/{b}/response_length_mean"] = mean([n for n, _ in items])
            out[f"budget/{b}/acc"] = mean([float(c) for _, c in items])
        return out
