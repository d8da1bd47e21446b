"""AnytimeReasoner (arXiv 2505.13438; code sail-sg/AnytimeReasoner): thinking cut at budgets, summaries per cut.

The thinking is sampled up to the last budget and stops at ``</think>``. For each budget ``b_s``
the cut is at ``c_s = min(b_s, T)`` (``T`` = thinking tokens); budgets at or past the end collapse
onto one cut (code ``sample_partial_cot``), whose prompt gets ``n_summary`` summaries per collapsed
slot. A cut inside the thinking (or a thinking that hit the length cap) is closed with
``cut_text`` (code: ``"...\\n\\n...\\n\\n</think>"`` + ``"\\n\\n**Final Answer**\\n"``); a
thinking that closed itself gets only ``finished_text``. The model's own answer after ``</think>``
is never used: every budget, the last included, is scored on summaries.

``r_s`` = the mean summary score at budget ``s``; thinking tokens between cuts get the BRPO
advantages, summaries ``score - mean`` of their pool (the returns, baselines and advantages are
the pure ``brpo_*`` functions of :mod:`rlspec.trainers.advantages`). Each rollout is packed with its
summaries into one training row (:class:`PackedRollout`).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Sequence

import torch

from rlspec.data import derive_seed
from rlspec.errors import ConfigError
from rlspec.models import decode_responses
from rlspec.registry import ROLLOUT_HOOKS
from rlspec.rewards.grader import grade_batch
from rlspec.rollout.base import SamplingParams
from rlspec.trainers.advantages import (
    brpo_prior,
    brpo_returns_and_baseline,
    brpo_summary_advantages,
    brpo_token_advantages,
)
from rlspec.trainers.hooks.base import HookContext, RolloutChunk, RolloutHook
from rlspec.trainers.metrics import mean


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
    logprobs: torch.Tensor
    advantages: torch.Tensor
    loss_mask: torch.Tensor
    seg_start: torch.Tensor
    seg_cut: torch.Tensor
    positions: torch.Tensor


def pack_rollout(thinking_ids: Sequence[int], thinking_logprobs, thinking_advantages,
                 segments: Sequence[tuple[int, Sequence[int], Sequence[int], Any, float]]) -> PackedRollout:
    """Pack a thinking trace and its summaries; ``segments`` = ``(cut, closing ids, summary ids,
    summary logprobs [len], advantage)`` each.

    >>> import torch
    >>> p = pack_rollout([5, 6, 7], torch.zeros(3), torch.ones(3), [(2, [9], [4, 1], torch.zeros(2), -0.5)])
    >>> p.ids, p.positions.tolist(), p.loss_mask.tolist(), p.seg_start.tolist(), p.seg_cut.tolist()
    ([5, 6, 7, 9, 4, 1], [0, 1, 2, 2, 3, 4], [1.0, 1.0, 1.0, 0.0, 1.0, 1.0], [0, 0, 0, 3, 3, 3], [0, 0, 0, 2, 2, 2])
    """
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


@ROLLOUT_HOOKS.register("anytime", group="anytime")
class AnytimeSummaries(RolloutHook):
    """``anytime.enable``: the thinking is cut at the budgets and scored by summaries (``trainer.adv_estimator=brpo``)."""

    name = "anytime"
    config_key = "anytime"

    def __init__(self, ctx: HookContext, kwargs: dict[str, Any]) -> None:
        super().__init__(ctx, kwargs)
        at = ctx.cfg.anytime
        self.budgets = list(at.budgets or default_budgets(ctx.cfg.rollout.max_response_length, at.n_budgets))
        self.prior = brpo_prior(self.budgets, at.prior)
        self.cut_ids, self.finished_ids = ctx.encode(at.cut_text), ctx.encode(at.finished_text)
        self.think_close_id = ctx.tokenizer.convert_tokens_to_ids("</think>")
        if self.think_close_id is None or self.think_close_id == ctx.tokenizer.unk_token_id:
            raise ConfigError("anytime.enable needs a tokenizer with a single </think> token (the thinking stops at it)")

    def before_rollout(self, chunk: RolloutChunk) -> None:
        # the thinking only, up to the last budget; answers come from the forced summaries
        chunk.params = dataclasses.replace(chunk.params, max_new_tokens=self.budgets[-1],
                                           stop_strings=tuple(chunk.params.stop_strings) + ("</think>",))

    def after_rollout(self, chunk: RolloutChunk) -> None:
        """Plan the summary prompts of every cut and sample ``n_summary`` summaries per budget slot."""
        at, rc = self.ctx.cfg.anytime, self.ctx.cfg.rollout
        thinking = chunk.result
        plan = plan_summaries(chunk.prompt_ids, thinking.response_ids, self.budgets, think_close_id=self.think_close_id,
                              eos_ids=self.ctx.eos_ids, cut_ids=self.cut_ids, finished_ids=self.finished_ids)
        per_request = [at.n_summary * len(req.slots) for req in plan.requests]
        summary_prompts = [req.prompt_ids for req, k in zip(plan.requests, per_request) for _ in range(k)]
        summaries = chunk.engine.generate(summary_prompts, SamplingParams(
            max_new_tokens=at.summary_max_tokens, temperature=rc.temperature, top_p=rc.top_p, top_k=rc.top_k,
            stop_strings=tuple(rc.stop_strings), seed=derive_seed(chunk.seed, 1))) if summary_prompts else None
        if summaries:
            chunk.timing["generated_tokens"] += sum(len(r) for r in summaries.response_ids)
        self._plan, self._per_request, self._summaries = plan, per_request, summaries

    def before_scoring(self, chunk: RolloutChunk) -> None:
        """Score the summaries (correct and not reopening the thinking), then the BRPO advantages."""
        at, n, S = self.ctx.cfg.anytime, self.ctx.cfg.rollout.n, len(self.budgets)
        plan, per_request, summaries = self._plan, self._per_request, self._summaries
        prompts, thinking, tokenizer = chunk.prompt_ids, chunk.result, self.ctx.tokenizer
        summary_texts = decode_responses(tokenizer, summaries.response_ids, self.ctx.eos_ids) if summaries else []
        owners = [req for req, k in zip(plan.requests, per_request) for _ in range(k)]
        graded = grade_batch(summary_texts, [chunk.rows[req.response]["answer"] for req in owners],
                             require_think_close=False, timeout_s=self.ctx.cfg.reward.grader_timeout_s)
        scores = [float(ok and "</think>" not in text) for ok, text in zip(graded, summary_texts)]
        # r_s: mean of the n_summary scores filling budget slot s (0 for a thinking that ended with EOS)
        cut_scores = torch.zeros(len(prompts), S, dtype=torch.float64)  # [P*n, S]
        slot_of: list[int] = []  # the budget slot each summary fills
        pos = 0
        for req, k in zip(plan.requests, per_request):
            for j, s in enumerate(req.slots):
                part = scores[pos + j * at.n_summary : pos + (j + 1) * at.n_summary]
                cut_scores[req.response, s] = sum(part) / len(part)
                slot_of += [s] * at.n_summary
            pos += k
        group_t = torch.arange(len(chunk.row_indices)).repeat_interleave(n)  # [P*n]
        _, _, cut_adv = brpo_returns_and_baseline(cut_scores, self.prior, group_t, at.variance_reduction)
        token_adv = [brpo_token_advantages(cut_adv[i], plan.cuts[i], len(thinking.response_ids[i]))
                     for i in range(len(prompts))]
        pools = torch.tensor([req.pool for req in owners], dtype=torch.long)
        summary_adv = brpo_summary_advantages(
            torch.tensor(scores, dtype=torch.float32), pools, method=at.summary_method,
            cut_index=torch.tensor(slot_of, dtype=torch.long), num_cuts=S,
            group_index=torch.tensor([req.response // n for req in owners], dtype=torch.long), n_summary=at.n_summary,
        ).tolist()
        last_summary = {}  # response -> text of its first summary at the last budget (for logs)
        for m, (req, s) in enumerate(zip(owners, slot_of)):
            if s == S - 1 and req.response not in last_summary:
                last_summary[req.response] = tokenizer.decode(req.prompt_ids[len(prompts[req.response]) + req.cut:]) \
                    + summary_texts[m]
        segments: list[list[tuple]] = [[] for _ in prompts]  # per rollout: its summaries, in plan order
        for m, req in enumerate(owners):
            closing = req.prompt_ids[len(prompts[req.response]) + req.cut:]
            segments[req.response].append((req.cut, closing, summaries.response_ids[m], summaries.response_logprobs[m],
                                           summary_adv[m]))
        chunk.packed = [pack_rollout(thinking.response_ids[i], thinking.response_logprobs[i], token_adv[i], segments[i])
                        for i in range(len(prompts))]
        chunk.texts = [chunk.texts[i] + last_summary.get(i, "") for i in range(len(prompts))]
        chunk.rewards = [float(cut_scores[i, S - 1]) for i in range(len(prompts))]  # mean summary score at the full budget
        chunk.correct = [r > 0.5 for r in chunk.rewards]
        chunk.per_term = {}
        chunk.extras["cut_scores"] = [cut_scores[i].tolist() for i in range(len(prompts))]
        chunk.extras["num_summaries"] = [len(segments[i]) for i in range(len(prompts))]

    def metrics(self, groups: Sequence[Any]) -> dict[str, float]:
        """The summaries' accuracy at every budget cut."""
        cut_scores = [row for g in groups for row in g.extras.get("cut_scores", [])]
        out = {f"anytime/score_at_{b}": mean([row[s] for row in cut_scores]) for s, b in enumerate(self.budgets)}
        out["anytime/avg_score"] = mean([sum(row) / len(row) for row in cut_scores])
        out["anytime/summaries"] = float(sum(sum(g.extras.get("num_summaries", [])) for g in groups))
        return out
