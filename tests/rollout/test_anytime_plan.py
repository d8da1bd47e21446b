"""AnytimeReasoner's summary plan (rlspec.trainers.hooks.anytime): cuts, collapsed budgets, closing texts."""

import pytest

from rlspec.errors import ConfigError
from rlspec.trainers.hooks.anytime import cut_positions, default_budgets, plan_summaries

CLOSE, EOS = 99, 98
CUT, FIN = [7, CLOSE, 8], [8]


def test_default_budgets_match_the_code():
    assert default_budgets(8000, 4) == [2000, 4000, 6000, 8000]
    assert default_budgets(256, 4) == [64, 128, 192, 256]
    with pytest.raises(ConfigError, match="anytime.n_budgets=0"):
        default_budgets(256, 0)


def test_plan_cuts_collapse_and_texts():
    prompts = [[1, 2], [1, 2], [3]]
    thinking = [
        [10, 11, 12, 13, 14, 15],  # hit the cap (no </think>): cuts 2, 4, 6 with the cut text
        [10, 11, 12, CLOSE],  # closed at 4 tokens: cuts 2, 4, 4 -> slot 1 and 2 share one prompt
        [10, EOS],  # ended with EOS: scores 0, no summaries
    ]
    plan = plan_summaries(prompts, thinking, [2, 4, 6], think_close_id=CLOSE, eos_ids=[EOS], cut_ids=CUT,
                          finished_ids=FIN)
    assert plan.cuts == [[2, 4, 6], [2, 4, 4], [2, 2, 2]]
    assert plan.closed == [False, True, False] and plan.scoreable == [True, True, False]
    got = [(r.response, r.cut, r.slots, r.prompt_ids) for r in plan.requests]
    assert got == [
        (0, 2, [0], [1, 2, 10, 11] + CUT),
        (0, 4, [1], [1, 2, 10, 11, 12, 13] + CUT),
        (0, 6, [2], [1, 2, 10, 11, 12, 13, 14, 15] + CUT),  # the capped thinking is cut, not "finished"
        (1, 2, [0], [1, 2, 10, 11] + CUT),
        (1, 4, [1, 2], [1, 2, 10, 11, 12, CLOSE] + FIN),  # the model closed it: only the finished text
    ]
    assert [r.pool for r in plan.requests] == [0, 1, 2, 3, 4]
    assert cut_positions(3, [2, 4, 6]) == [2, 3, 3]
