"""AnytimeReasoner's budget-truncated summaries (arXiv 2505.13438; code sail-sg/AnytimeReasoner).

Infrastructure only: where each thinking trace is cut, which summary prompts are generated and
which budget slot each summary fills. The returns, baselines and advantages are pure functions in
:mod:`rlspec.trainers.advantages` (``brpo_*``).

The thinking is sampled up to the last budget and stops at ``</think>``. For each budget
``b_s`` the cut is at ``c_s = min(b_s, T)`` (``T`` = thinking tokens); budgets at or past the end
collapse onto one cut (code ``sample_partial_cot``), whose prompt gets ``n_summary`` summaries per
collapsed slot. A cut inside the thinking (or a thinking that hit the length cap) is closed with
``cut_text`` (code: ``"...\\n\\n...\\n\\n</think>"`` + ``"\\n\\n**Final Answer**\\n"``); a thinking that
closed itself gets only ``finished_text`` (code: ``"\\n\\n**Final Answer**\\n"``). The model's own
answer after ``</think>`` is never used: every budget, the last included, is scored on summaries.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Sequence

from rlspec.errors import ConfigError


def default_budgets(max_length: int, n_budgets: int) -> list[int]:
    """The code's training budgets: ``max_length // n * i`` for ``i = 1..n`` (8000, 4 -> 2000..8000)."""
    if n_budgets < 1 or max_length // n_budgets < 1:
        raise ConfigError(f"anytime.n_budgets={n_budgets} must be >= 1 and <= rollout.max_response_length={max_length}")
    return [max_length // n_budgets * i for i in range(1, n_budgets + 1)]


def cut_positions(thinking_length: int, budgets: Sequence[int]) -> list[int]:
    """``c_s = min(b_s, T)`` for every budget (non-decreasing).

    >>> cut_positions(150, [64, 128, 192, 256])
    [64, 128, 150, 150]
    """
    return [min(int(b), thinking_length) for b in budgets]


@dataclass
class SummaryRequest:
    """One summary prompt: ``count`` summaries for the budget slots ``slots`` (``n_summary`` each)."""

    response: int  # index of the thinking rollout
    cut: int  # token position of the cut in the thinking
    slots: list[int]  # budget slots sharing this cut (collapsed cuts share one prompt)
    prompt_ids: list[int]
    pool: int  # summaries of one request share the summary baseline (code: same split id)


@dataclass
class SummaryPlan:
    """All summary requests of a batch of thinking rollouts, plus each rollout's cut positions."""

    requests: list[SummaryRequest] = field(default_factory=list)
    cuts: list[list[int]] = field(default_factory=list)  # [N][S]
    closed: list[bool] = field(default_factory=list)  # [N] thinking ended with </think>
    scoreable: list[bool] = field(default_factory=list)  # [N] False: the thinking ended with EOS (scores 0)


def plan_summaries(
    prompt_ids: Sequence[Sequence[int]],
    thinking_ids: Sequence[Sequence[int]],
    budgets: Sequence[int],
    *,
    think_close_id: int,
    eos_ids: Sequence[int],
    cut_ids: Sequence[int],
    finished_ids: Sequence[int],
) -> SummaryPlan:
    """The summary prompts of every thinking rollout (``prompt_ids[i]`` + ``thinking_ids[i]``).

    A thinking that ended with EOS instead of ``</think>`` gets no summaries: the code scores
    every budget of it 0 (``is_formatted`` fails), so its summaries could only add zero-advantage
    rows.
    """
    plan = SummaryPlan()
    eos = set(eos_ids)
    for i, (prompt, think) in enumerate(zip(prompt_ids, thinking_ids)):
        cuts = cut_positions(len(think), budgets)
        closed = bool(think) and think[-1] == think_close_id
        scoreable = not (think and think[-1] in eos)
        plan.cuts.append(cuts)
        plan.closed.append(closed)
        plan.scoreable.append(scoreable)
        if not scoreable:
            continue
        by_cut: dict[int, list[int]] = {}
        for s, c in enumerate(cuts):
            by_cut.setdefault(c, []).append(s)
        for c, slots in by_cut.items():
            ending = finished_ids if (closed and c == len(think)) else cut_ids
            plan.requests.append(SummaryRequest(i, c, slots, list(prompt) + list(think[:c]) + list(ending),
                                                pool=len(plan.requests)))
    return plan
