"""Budget-conditioned prompts: HBPO subgroup prefills and L1 targets."""

import random

import pytest

from rlspec.errors import ConfigError
from rlspec.rewards.hbpo import HBPO_TEMPLATES
from rlspec.rewards.l1 import L1_TEMPLATE
from rlspec.trainers.hooks.hbpo import hbpo_budgeted_prompts
from rlspec.trainers.hooks.l1 import l1_budgeted_prompts


@pytest.fixture(scope="module")
def tokenizer(tiny_model_path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_model_path)


def test_hbpo_subgroups_in_budget_order_with_prefill(tokenizer):
    prompts = [[1, 2, 3], [4, 5]]
    out = hbpo_budgeted_prompts(prompts, 4, [32, 64], tokenizer, HBPO_TEMPLATES["paper"])
    assert out.budgets == [32, 32, 64, 64, 32, 32, 64, 64]
    for ids, budget, base in zip(out.prompt_ids, out.budgets, [prompts[0]] * 4 + [prompts[1]] * 4):
        assert ids[: len(base)] == base
        assert tokenizer.decode(ids[len(base):]) == f" I will answer the question within {budget} tokens.\n"
    code = hbpo_budgeted_prompts(prompts, 4, [32, 64], tokenizer, HBPO_TEMPLATES["code"])
    assert tokenizer.decode(code.prompt_ids[0][3:]) == " I will answer the question with 32 tokens"


def test_hbpo_rejects_n_not_multiple_of_budgets(tokenizer):
    with pytest.raises(ConfigError, match="rollout.n=6 must be a multiple of the 4 HBPO budgets"):
        hbpo_budgeted_prompts([[1]], 6, [1, 2, 3, 4], tokenizer, HBPO_TEMPLATES["paper"])
    with pytest.raises(ConfigError, match="budgets"):
        hbpo_budgeted_prompts([[1]], 4, [], tokenizer, HBPO_TEMPLATES["paper"])


def test_l1_target_in_the_user_message(tokenizer):
    out = l1_budgeted_prompts(["What is 2+3?", "What is 4+4?"], 2, tokenizer, "Please reason.", 10, 20,
                              L1_TEMPLATE, random.Random(0))
    assert len(out.prompt_ids) == 4 and out.budgets[0] == out.budgets[1] and out.budgets[2] == out.budgets[3]
    assert all(10 <= b <= 20 for b in out.budgets)
    text = tokenizer.decode(out.prompt_ids[0])
    assert f"What is 2+3?\nPlease reason. Think for {out.budgets[0]} tokens." in text
    again = l1_budgeted_prompts(["What is 2+3?", "What is 4+4?"], 2, tokenizer, "Please reason.", 10, 20,
                                L1_TEMPLATE, random.Random(0))
    assert again.budgets == out.budgets  # seeded: a resumed run draws the same targets
    with pytest.raises(ConfigError, match="low"):
        l1_budgeted_prompts(["q"], 1, tokenizer, "", 20, 10, L1_TEMPLATE, random.Random(0))
