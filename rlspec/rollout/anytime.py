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
from typing import Any, Sequence

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


@dataclass
class PackedRollout:
    """One rollout's thinking and all its summaries as a single training sequence (the released
    code's "tree" packing): ``[thinking | closing text + summary | closing text + summary | ...]``.

    A summary segment sees the prompt, the thinking up to its cut and itself (never the thinking
    after its cut or another summary); its RoPE positions continue from the cut. Per token (``R``
    = total length): ``ids``, ``logprobs`` (sampling-time, 0 on the closing texts), ``advantages``,
    ``loss_mask`` (0 on the closing texts: they were inserted, not sampled), and the attention
    rule ``seg_start`` / ``seg_cut``: token ``j`` attends to response columns ``k < seg_cut[j]`` and
    ``seg_start[j] <= k <= j`` (thinking tokens: ``seg_start = seg_cut = 0``, i.e. causal), and
    ``positions`` (offsets from the prompt's length).
    """

    ids: list[int]
    logprobs: "torch.Tensor"
    advantages: "torch.Tensor"
    loss_mask: "torch.Tensor"
    seg_start: "torch.Tensor"
    seg_cut: "torch.Tensor"
    positions: "torch.Tensor"


def pack_rollout(thinking_ids: Sequence[int], thinking_logprobs, thinking_advantages,
                 segments: Sequence[tuple[int, Sequence[int], Sequence[int], Any, float]]) -> PackedRollout:
    """Pack a thinking trace and its summaries; ``segments`` = ``(cut, closing ids, summary ids,
    summary logprobs [len], advantage)`` each.

    >>> import torch
    >>> p = pack_rollout([5, 6, 7], torch.zeros(3), torch.ones(3), [(2, [9], [4, 1], torch.zeros(2), -0.5)])
    >>> p.ids, p.positions.tolist(), p.loss_mask.tolist(), p.seg_start.tolist(), p.seg_cut.tolist()
    ([5, 6, 7, 9, 4, 1], [0, 1, 2, 2, 3, 4], [1.0, 1.0, 1.0, 0.0, 1.0, 1.0], [0, 0, 0, 3, 3, 3], [0, 0, 0, 2, 2, 2])
    """
    import torch

    t = len(thinking_ids)
    ids = list(thinking_ids)
    logprobs = [torch.as_tensor(thinking_logprobs, dtype=torch.float32).reshape(-1)]
    advantages = [torch.as_tensor(thinking_advantages, dtype=torch.float32).reshape(-1)]
    mask = [torch.ones(t)]
    seg_start = [torch.zeros(t, dtype=torch.long)]
    seg_cut = [torch.zeros(t, dtype=torch.long)]
    positions = [torch.arange(t)]
    for cut, closing, summary, summary_logprobs, adv in segments:
        if not closing:
            raise ConfigError("anytime: the closing text before a summary must not be empty (it carries the "
                              "prediction of the summary's first token); set anytime.finished_text / cut_text")
        start, length = len(ids), len(closing) + len(summary)
        ids += list(closing) + list(summary)
        logprobs.append(torch.cat([torch.zeros(len(closing)), torch.as_tensor(summary_logprobs, dtype=torch.float32).reshape(-1)]))
        advantages.append(torch.full((length,), float(adv)))
        mask.append(torch.cat([torch.zeros(len(closing)), torch.ones(len(summary))]))
        seg_start.append(torch.full((length,), start, dtype=torch.long))
        seg_cut.append(torch.full((length,), int(cut), dtype=torch.long))
        positions.append(int(cut) + torch.arange(length))
    return PackedRollout(ids, torch.cat(logprobs), torch.cat(advantages), torch.cat(mask).float(), torch.cat(seg_start),
                         torch.cat(seg_cut), torch.cat(positions))
