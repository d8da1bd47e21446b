"""Budget-conditioned rollout prompts: HBPO's per-subgroup prefill and L1's target in the prompt.

Infrastructure only (which prompt each rollout gets); the rewards that use the budgets live in
:mod:`rlspec.rewards.length` and the HBPO advantage in :mod:`rlspec.trainers.advantages`.

* ``hbpo`` (arXiv 2507.15844 Sec. 3.1): the ``n`` rollouts of a prompt are split into equal
  subgroups, one per budget; each subgroup's prompt is the chat prompt (which ends after
  ``<think>``) followed by an assistant *prefill* that states the budget. Paper text: "I will
  answer the question within {budget} tokens"; the released code uses "with" instead of "within"
  (``hbpo.variant=code``). Evaluation uses no prefill.
* ``l1`` (L1 / LCPO, arXiv 2503.04697 Sec. 3): each prompt gets a target length drawn uniformly
  from ``[low, high]`` and the user message is followed by "Think for {budget} tokens."
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Any, Mapping, Sequence

from rlspec.errors import ConfigError

HBPO_TEMPLATES = {
    "paper": " I will answer the question within {budget} tokens.\n",
    "code": " I will answer the question with {budget} tokens",
}
L1_TEMPLATE = "Think for {budget} tokens."
BUDGET_KINDS = ("hbpo", "l1")


@dataclass
class BudgetedPrompts:
    """One entry per rollout (``P * n`` of them, prompt-major like the engine's input)."""

    prompt_ids: list[list[int]]
    budgets: list[int]


def _key(name: str) -> str:
    return f"rollout.budget.kwargs.{name}"


def hbpo_budgeted_prompts(
    prompt_ids: Sequence[Sequence[int]],
    n: int,
    budgets: Sequence[int],
    tokenizer: Any,
    template: str,
) -> BudgetedPrompts:
    """Split each prompt's ``n`` rollouts into ``len(budgets)`` equal subgroups (in budget order)
    and append the budget prefill to the prompt of each subgroup."""
    if not budgets or any(int(b) <= 0 for b in budgets):
        raise ConfigError(f"{_key('budgets')} must be a non-empty list of positive token counts, got {list(budgets)}")
    if n % len(budgets):
        raise ConfigError(
            f"rollout.n={n} must be a multiple of the {len(budgets)} HBPO budgets ({_key('budgets')}); "
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


def l1_budgeted_prompts(
    questions: Sequence[str],
    n: int,
    tokenizer: Any,
    instruction: str,
    low: int,
    high: int,
    template: str,
    rng: random.Random,
) -> BudgetedPrompts:
    """One target per prompt, ``U{low..high}``, appended to the user message; ``n`` copies each."""
    from rlspec.data import build_messages

    if not 0 < int(low) <= int(high):
        raise ConfigError(f"{_key('low')} and {_key('high')} must satisfy 0 < low <= high, got {low} and {high}")
    ids: list[list[int]] = []
    out_budgets: list[int] = []
    for q in questions:
        budget = rng.randint(int(low), int(high))
        messages = build_messages(f"{q}", instruction)
        messages[-1]["content"] += " " + template.format(budget=budget)
        text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        p = list(tokenizer(text, add_special_tokens=False)["input_ids"])
        ids += [p] * n
        out_budgets += [budget] * n
    return BudgetedPrompts(ids, out_budgets)


def check_budget_kwargs(name: str, kwargs: Mapping[str, Any]) -> None:
    allowed = {"hbpo": {"budgets", "template"}, "l1": {"low", "high", "template"}}[name]
    unknown = sorted(set(kwargs) - allowed)
    if unknown:
        raise ConfigError(
            f"unknown key(s) {', '.join(_key(k) for k in unknown)} for rollout.budget.name={name}; "
            f"it takes: {', '.join(sorted(allowed))}"
        )
