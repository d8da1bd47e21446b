"""The GRPO trainer loop (DeepSeekMath GRPO, with the DAPO/DLER knobs).

One step reads top to bottom, like nanochat's ``chat_rl.py``:

    generate (n responses per prompt, dynamic sampling refills filtered groups)
    -> score (math-verify correctness + length terms)
    -> advantage (group or batch normalisation)
    -> loss (PPO-clip with clip-higher, token-level aggregation, optional KL)
    -> optimizer step -> push weights to the rollout engine
    -> log (and checkpoint / evaluate on schedule)

All maths lives in :mod:`rlspec.trainers.advantages`, :mod:`rlspec.trainers.losses` and
:mod:`rlspec.rewards`; this module only moves data between them.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import math
import os
import random
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Sequence

import torch

from rlspec.checkpoint import (
    checkpoint_root,
    find_latest_checkpoint,
    load_trainer_state,
    rng_state,
    save_checkpoint,
    set_rng_state,
    step_dir_name,
)
from rlspec.config import RLSpecConfig
from rlspec.data import PromptSampler
from rlspec.errors import ConfigError, RLSpecError, TrainingError
from rlspec.evals.heldout import EvalSettings, evaluate
from rlspec.models import decode_responses
from rlspec.rewards import RewardBatch, compute_rewards, grade_batch
from rlspec.rollout.base import FINISH_LENGTH, RolloutEngine, SamplingParams
from rlspec.tracking import MetricsLogger, plot_training_curves, truncate_jsonl
from rlspec.trainers.advantages import compute_advantages
from rlspec.trainers.schedules import length_at, siri_phase_ends
from rlspec.trainers.strategy import LocalStrategy
from rlspec.trainers.losses import (
    LossNormalizer,
    aggregate_loss,
    kl_penalty,
    ppo_clip_policy_loss,
    token_logprobs_and_entropy,
)


def derive_seed(base: int, *parts: int) -> int:
    """A per-(step, chunk) sampling seed, so a resumed run samples exactly what it would have."""
    seed = base
    for part in parts:
        seed = (seed * 1_000_003 + part * 7919 + 17) % (2**31 - 1)
    return seed


@dataclass
class Group:
    """The n responses sampled for one prompt."""

    row_index: int
    prompt_ids: list[int]
    response_ids: list[list[int]]
    old_logprobs: list[torch.Tensor]
    finish_reasons: list[str]
    texts: list[str]
    rewards: list[float]
    correct: list[bool]
    per_term: dict[str, list[float]] = field(default_factory=dict)
    # budget-conditioned rollouts (HBPO prefill, L1 target): each response's own prompt and budget
    response_prompt_ids: list[list[int]] | None = None
    budgets: list[int] | None = None
    # AnytimeReasoner: each rollout packed with its summaries (per-token advantages, tree mask)
    packed: list[Any] | None = None  # [n] rlspec.rollout.anytime.PackedRollout
    cut_scores: list[list[float]] | None = None  # [n][S]
    num_summaries: int = 0


@dataclass
class TrainBatch:
    """Flattened groups ready for the policy update. ``B`` = responses."""

    prompt_ids: list[list[int]]
    response_ids: list[list[int]]
    old_logprobs: list[torch.Tensor]
    rewards: torch.Tensor  # [B]
    group_index: torch.Tensor  # [B] long
    advantages: torch.Tensor  # [B]
    budgets: torch.Tensor | None = None  # [B] float, budget-conditioned rollouts only
    group_rows: list[list[int]] = field(default_factory=list)  # rows of each group, for mini-batches
    # AnytimeReasoner's packed rows: per-token advantages, loss mask, tree-attention rule, positions
    token_advantages: list[torch.Tensor] | None = None  # [B] of [R_i]
    loss_masks: list[torch.Tensor] | None = None  # [B] of [R_i]; None = every response token
    seg_start: list[torch.Tensor] | None = None  # [B] of [R_i] (see rlspec.rollout.anytime.PackedRollout)
    seg_cut: list[torch.Tensor] | None = None
    positions: list[torch.Tensor] | None = None  # [B] of [R_i], offsets from the prompt length

    @property
    def size(self) -> int:
        return len(self.response_ids)


def _percentile(values: Sequence[float], q: float) -> float:
    if not values:
        return float("nan")
    return float(torch.quantile(torch.tensor(values, dtype=torch.float64), q))


def _mean(values: Sequence[float]) -> float:
    return sum(values) / len(values) if values else float("nan")


class GRPOTrainer:
    def __init__(
        self,
        cfg: RLSpecConfig,
        *,
        model: torch.nn.Module,
        tokenizer: Any,
        engine: RolloutEngine,
        eos_ids: Sequence[int],
        train_rows: Sequence[dict[str, Any]],
        eval_rows: Sequence[dict[str, Any]],
        train_prompt_ids: Sequence[Sequence[int]],
        eval_prompt_ids: Sequence[Sequence[int]],
        run_dir: str | Path,
        reward_terms: Mapping[str, Mapping[str, Any]],
        logger: MetricsLogger | None = None,
        start_model_path: str | None = None,
        spot_trainer: Any = None,
        strategy: Any = None,
    ) -> None:
        self.cfg = cfg
        self.start_model_path = start_model_path  # recorded in summary.json (export's merge.base=start)
        # TLT spot trainer (rollout.speculative.online): trains the engine's drafter during the long tail
        self.spot = spot_trainer
        self._spot_added: set[int] = set()
        self._in_training_rollout = False  # the long-tail hook trains the drafter only then, not in evals
        if spot_trainer is not None:
            engine.on_long_tail = self._on_long_tail
        self.tc = cfg.trainer
        # the policy the engine samples from and checkpoints save (full weights); the strategy
        # owns the optimizer and the module training forwards run through (DeepSpeed: its engine)
        self.strategy = strategy if strategy is not None else LocalStrategy(model, cfg.trainer)
        self.model = self.strategy.policy
        self.train_module = self.strategy.train_module
        self.is_main = self.strategy.is_main
        self.tokenizer = tokenizer
        self.engine = engine
        self.eos_ids = list(eos_ids)
        self.train_rows = list(train_rows)
        self.eval_rows = list(eval_rows)
        self.train_prompt_ids = [list(p) for p in train_prompt_ids]
        self.eval_prompt_ids = [list(p) for p in eval_prompt_ids]
        self.run_dir = Path(run_dir)
        self.logger = logger
        self.reward_terms = {name: dict(term) for name, term in reward_terms.items()}
        if "hbpo" in self.reward_terms:  # one source for HBPO's constants: the `hbpo` config section
            if self.reward_terms["hbpo"].get("kwargs"):
                raise ConfigError("set HBPO's constants in the `hbpo` section (hbpo.variant, hbpo.l_max, hbpo.beta, "
                                  "hbpo.alpha), not in reward.terms.hbpo.kwargs: the prefill and advantage use them too")
            self.reward_terms["hbpo"]["kwargs"] = {k: getattr(cfg.hbpo, k) for k in ("variant", "l_max", "beta", "alpha")}
        if self.tc.adv_estimator in ("hbpo", "hbpo_code") and cfg.rollout.budget.name != "hbpo":
            raise ConfigError(f"trainer.adv_estimator={self.tc.adv_estimator} needs rollout.budget.name=hbpo "
                              f"(the budget subgroups it normalises over); recipe=hbpo sets both")
        self.global_step = 0
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else self.eos_ids[0]
        self.sampler = PromptSampler(len(self.train_rows), seed=self.tc.seed, shuffle=cfg.data.shuffle)
        self.ref_model = None
        if self.tc.kl_coef > 0:
            self.ref_model = copy.deepcopy(self.model).eval().requires_grad_(False)
        self.optimizer = self.strategy.optimizer  # the LR schedule acts on its param groups
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, self._lr_factor)
        self.eval_history: dict[int, dict[str, float]] = {}
        self.reward_state: dict[str, Any] = {}  # stateful reward terms (HAPO history), checkpointed
        self.checkpoint_tags: dict[str, list[str]] = {}  # tag (e.g. "siri-low") -> checkpoint dir names
        self.max_length_at(0)  # a bad length schedule fails at start, not at step N
        self._check_rollout_hooks()
        self.anytime_budgets: list[int] = []
        if cfg.anytime.enable:
            from rlspec.rollout.anytime import default_budgets
            from rlspec.trainers.advantages import brpo_prior

            at = cfg.anytime
            self.anytime_budgets = list(at.budgets or default_budgets(cfg.rollout.max_response_length, at.n_budgets))
            self.anytime_prior = brpo_prior(self.anytime_budgets, at.prior)
            encode = lambda text: list(tokenizer(text, add_special_tokens=False)["input_ids"])  # noqa: E731
            self.anytime_cut_ids, self.anytime_finished_ids = encode(at.cut_text), encode(at.finished_text)
            self.think_close_id = tokenizer.convert_tokens_to_ids("</think>")
            if self.think_close_id is None or self.think_close_id == tokenizer.unk_token_id:
                raise ConfigError("anytime.enable needs a tokenizer with a single </think> token (the thinking stops at it)")

    # ------------------------------------------------------------------ schedule
    def _lr_factor(self, step: int) -> float:
        warmup = self.tc.warmup_steps
        if warmup and step < warmup:
            return (step + 1) / warmup
        if self.tc.lr_schedule == "cosine":
            progress = (step - warmup) / max(1, self.tc.steps - warmup)
            return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))
        return 1.0

    # ------------------------------------------------------------------ 1. generate + 2. score
    def max_length_at(self, step: int) -> int:
        """The rollout cap of 0-based ``step``: ``rollout.length_schedule`` if set (SIRI,
        ThinkPrune), else ``rollout.max_response_length``."""
        sched = self.cfg.rollout.length_schedule
        if sched.name is None:
            return self.cfg.rollout.max_response_length
        return length_at(sched.name, step, sched.kwargs)

    def _check_rollout_hooks(self) -> None:
        """Try the budget and truncation hooks once on the first training prompt, so a bad
        ``rollout.budget`` / ``rollout.truncation`` setting fails at start with its key named."""
        rc = self.cfg.rollout
        if rc.budget.name is not None and self.train_rows:
            try:
                self._rollout_prompts([0], 0)
            except (ValueError, TypeError) as err:
                raise ConfigError(f"rollout.budget.kwargs: {err}") from None
        trunc = rc.truncation
        if trunc.name is None:
            return
        from rlspec.rewards.length import difficulty_aware_truncation_lengths, palu_update_budget

        cap = self.max_length_at(0)
        try:
            if trunc.name == "palu":
                palu_update_budget(cap, cap, 1.0, [1, 2], **self._palu_kwargs())
                return
            kwargs = {"default_length": cap, **trunc.kwargs}
            difficulty_aware_truncation_lengths([True, False], [0, 0], **kwargs)
        except (ValueError, TypeError) as err:
            raise ConfigError(f"rollout.truncation.kwargs ({trunc.name}): {err}") from None
        lengths = [int(t[1]) for t in kwargs.get("tiers", ())] + [int(kwargs["default_length"])]
        too_long = [n for n in lengths if n > cap]
        if too_long:
            raise ConfigError(f"rollout.truncation.kwargs: truncation lengths {too_long} exceed the rollout "
                              f"cap {cap} (rollout.max_response_length); a truncation length must be <= the cap")

    def _palu_kwargs(self) -> dict[str, Any]:
        """``C``, ``tau``, ``min_budget`` of ``rollout.truncation.kwargs`` (PALU), with the paper's defaults."""
        kwargs = dict(self.cfg.rollout.truncation.kwargs)
        unknown = sorted(set(kwargs) - {"C", "tau", "min_budget"})
        if unknown:
            raise ConfigError(f"unknown key(s) {unknown} in rollout.truncation.kwargs for palu; it takes C, tau, min_budget")
        return {"C": kwargs.get("C", 0.8), "tau": kwargs.get("tau", 0.5), "min_budget": kwargs.get("min_budget", 1)}

    def _sampling_params(self, seed: int) -> SamplingParams:
        rc = self.cfg.rollout
        return SamplingParams(
            max_new_tokens=self.anytime_budgets[-1] if self.anytime_budgets else self.max_length_at(self.global_step),
            temperature=rc.temperature,
            top_p=rc.top_p,
            top_k=rc.top_k,
            # AnytimeReasoner samples the thinking only; answers come from the forced summaries
            stop_strings=tuple(rc.stop_strings) + (("</think>",) if self.anytime_budgets else ()),
            seed=seed,
        )

    def _rollout_prompts(self, row_indices: list[int], seed: int) -> tuple[list[list[int]], list[int] | None]:
        """The prompt of every rollout (``P * n``, prompt-major) and its budget, if any."""
        n = self.cfg.rollout.n
        budget = self.cfg.rollout.budget
        prompts = [self.train_prompt_ids[i] for i in row_indices]
        if budget.name is None:
            return [p for p in prompts for _ in range(n)], None
        from rlspec.rollout import budgets as bp

        kwargs = dict(budget.kwargs)
        if budget.name == "hbpo":
            template = kwargs.get("template") or bp.HBPO_TEMPLATES[self.cfg.hbpo.variant]
            out = bp.hbpo_budgeted_prompts(prompts, n, kwargs.get("budgets", [512, 1024, 2048, 2560]),
                                           self.tokenizer, template)
        else:  # l1
            out = bp.l1_budgeted_prompts(
                [self.train_rows[i]["question"] for i in row_indices], n, self.tokenizer, self.cfg.data.instruction,
                kwargs.get("low", 100), kwargs.get("high", 4000), kwargs.get("template") or bp.L1_TEMPLATE,
                random.Random(seed),
            )
        return out.prompt_ids, out.budgets

    def _generate_groups(self, row_indices: list[int], seed: int, timing: dict[str, float]) -> list[Group]:
        if self.anytime_budgets:
            return self._generate_anytime_groups(row_indices, seed, timing)
        n = self.cfg.rollout.n
        repeated, budgets = self._rollout_prompts(row_indices, seed)  # [P * n]
        t0 = time.perf_counter()
        if self.spot is not None:
            self._spot_added = set()
            self._in_training_rollout = True
            try:
                result = self.engine.generate(repeated, self._sampling_params(seed), return_hidden_states=True)
            finally:
                self._in_training_rollout = False
            self._spec_metrics.update(self.spot.stop(self.global_step + 1))  # preempt + publish with the policy
            self._buffer_rollout(repeated, result)
        else:
            result = self.engine.generate(repeated, self._sampling_params(seed))
        timing["rollout"] += time.perf_counter() - t0
        self._record_engine_stats(result.stats)
        timing["generated_tokens"] += sum(len(r) for r in result.response_ids)  # before any truncation
        t0 = time.perf_counter()
        texts = decode_responses(self.tokenizer, result.response_ids, self.eos_ids)
        rows = [self.train_rows[i] for i in row_indices for _ in range(n)]
        columns = {
            key: [row.get(key) for row in rows]
            for key in rows[0]
            if key not in ("question", "answer")
        }
        if budgets is not None:
            columns["budget" if self.cfg.rollout.budget.name == "hbpo" else "target_length"] = budgets
        batch = RewardBatch(
            prompts=[row["question"] for row in rows],
            completions=texts,
            completion_ids=result.response_ids,
            finish_reasons=result.finish_reasons,
            answers=[row["answer"] for row in rows],
            correct=[],
            group_ids=[g for g in range(len(row_indices)) for _ in range(n)],
            step=self.global_step,
            columns=columns,
            state=self.reward_state,
        )
        if self.cfg.rollout.truncation.name is not None:
            # the limits need only the full-length rollouts' correctness (DA-DLER) or nothing
            # (PALU): grade without the reward terms, so stateful terms score each batch once
            full_correct = [] if self.cfg.rollout.truncation.name == "palu" else grade_batch(
                texts, batch.answers, require_think_close=self.cfg.reward.require_think_close,
                timeout_s=self.cfg.reward.grader_timeout_s)
            batch, result = self._truncate(batch, result, full_correct)
            texts = batch.completions
        rewards, per_term, correct = self._score(batch)
        if self.cfg.rollout.truncation.name == "palu":
            self._record_palu(batch, correct)
        timing["reward"] += time.perf_counter() - t0
        groups = []
        for g, row_index in enumerate(row_indices):
            sl = slice(g * n, (g + 1) * n)
            groups.append(
                Group(
                    row_index=row_index,
                    prompt_ids=self.train_prompt_ids[row_index],
                    response_ids=result.response_ids[sl],
                    old_logprobs=result.response_logprobs[sl],
                    finish_reasons=result.finish_reasons[sl],
                    texts=texts[sl],
                    rewards=rewards[sl],
                    correct=correct[sl],
                    per_term={k: v[sl] for k, v in per_term.items()},
                    response_prompt_ids=repeated[sl] if budgets is not None else None,
                    budgets=budgets[sl] if budgets is not None else None,
                )
            )
        return groups

    def _generate_anytime_groups(self, row_indices: list[int], seed: int, timing: dict[str, float]) -> list[Group]:
        """AnytimeReasoner (arXiv 2505.13438): thinking, summaries at every budget cut, BRPO advantages.

        1. sample the thinking up to the last budget (stops at ``</think>``);
        2. at each cut sample ``n_summary`` summaries per budget slot and score them 0/1;
        3. ``r_s`` = mean summary score at budget ``s``; thinking tokens get the per-segment BRPO
           advantages, summaries ``score - mean`` of their pool (or the group, ``n_summary=1``).
        """
        from rlspec.rollout.anytime import pack_rollout, plan_summaries
        from rlspec.trainers.advantages import brpo_returns_and_baseline, brpo_summary_advantages, brpo_token_advantages

        at, n, S = self.cfg.anytime, self.cfg.rollout.n, len(self.anytime_budgets)
        prompts = [self.train_prompt_ids[i] for i in row_indices for _ in range(n)]  # [P * n]
        rows = [self.train_rows[i] for i in row_indices for _ in range(n)]
        t0 = time.perf_counter()
        thinking = self.engine.generate(prompts, self._sampling_params(seed))
        self._record_engine_stats(thinking.stats)
        plan = plan_summaries(prompts, thinking.response_ids, self.anytime_budgets, think_close_id=self.think_close_id,
                              eos_ids=self.eos_ids, cut_ids=self.anytime_cut_ids,
                              finished_ids=self.anytime_finished_ids)
        per_request = [at.n_summary * len(req.slots) for req in plan.requests]
        summary_prompts = [req.prompt_ids for req, k in zip(plan.requests, per_request) for _ in range(k)]
        rc = self.cfg.rollout
        summaries = self.engine.generate(summary_prompts, SamplingParams(
            max_new_tokens=at.summary_max_tokens, temperature=rc.temperature, top_p=rc.top_p, top_k=rc.top_k,
            stop_strings=tuple(rc.stop_strings), seed=derive_seed(seed, 1))) if summary_prompts else None
        timing["rollout"] += time.perf_counter() - t0
        timing["generated_tokens"] += sum(len(r) for r in thinking.response_ids)
        t0 = time.perf_counter()
        # score: a summary counts if it answers correctly and does not reopen/close the thinking
        summary_texts = decode_responses(self.tokenizer, summaries.response_ids, self.eos_ids) if summaries else []
        if summaries:
            timing["generated_tokens"] += sum(len(r) for r in summaries.response_ids)
        owners = [req for req, k in zip(plan.requests, per_request) for _ in range(k)]
        graded = grade_batch(summary_texts, [rows[req.response]["answer"] for req in owners],
                             require_think_close=False, timeout_s=self.cfg.reward.grader_timeout_s)
        scores = [float(ok and "</think>" not in text) for ok, text in zip(graded, summary_texts)]
        # r_s: mean of the n_summary scores filling budget slot s (0 for a thinking that ended with EOS)
        cut_scores = torch.zeros(len(prompts), S, dtype=torch.float64)  # [P*n, S]
        slot_of: list[int] = []  # the budget slot each summary fills
        pos = 0
        for req, k in zip(plan.requests, per_request):
            for j, s in enumerate(req.slots):
                chunk = scores[pos + j * at.n_summary : pos + (j + 1) * at.n_summary]
                cut_scores[req.response, s] = sum(chunk) / len(chunk)
                slot_of += [s] * at.n_summary
            pos += k
        group_t = torch.arange(len(row_indices)).repeat_interleave(n)  # [P*n]
        _, _, cut_adv = brpo_returns_and_baseline(cut_scores, self.anytime_prior, group_t, at.variance_reduction)
        token_adv = [brpo_token_advantages(cut_adv[i], plan.cuts[i], len(thinking.response_ids[i]))
                     for i in range(len(prompts))]
        pools = torch.tensor([req.pool for req in owners], dtype=torch.long)
        summary_adv = brpo_summary_advantages(
            torch.tensor(scores, dtype=torch.float32), pools, method=at.summary_method,
            cut_index=torch.tensor(slot_of, dtype=torch.long), num_cuts=S,
            group_index=torch.tensor([req.response // n for req in owners], dtype=torch.long), n_summary=at.n_summary,
        ).tolist()
        timing["reward"] += time.perf_counter() - t0
        thinking_texts = decode_responses(self.tokenizer, thinking.response_ids, self.eos_ids)
        last_summary = {}  # response -> text of its first summary at the last budget (for logs)
        for m, (req, s) in enumerate(zip(owners, slot_of)):
            if s == S - 1 and req.response not in last_summary:
                last_summary[req.response] = self.tokenizer.decode(req.prompt_ids[len(prompts[req.response]) + req.cut:]) \
                    + summary_texts[m]
        segments: list[list[tuple]] = [[] for _ in prompts]  # per rollout: its summaries, in plan order
        for m, req in enumerate(owners):
            closing = req.prompt_ids[len(prompts[req.response]) + req.cut:]
            segments[req.response].append((req.cut, closing, summaries.response_ids[m], summaries.response_logprobs[m],
                                           summary_adv[m]))
        packed = [pack_rollout(thinking.response_ids[i], thinking.response_logprobs[i], token_adv[i], segments[i])
                  for i in range(len(prompts))]
        groups = []
        for g, row_index in enumerate(row_indices):
            sl = range(g * n, (g + 1) * n)
            final = [float(cut_scores[i, S - 1]) for i in sl]
            groups.append(Group(
                row_index=row_index,
                prompt_ids=self.train_prompt_ids[row_index],
                response_ids=[thinking.response_ids[i] for i in sl],
                old_logprobs=[thinking.response_logprobs[i] for i in sl],
                finish_reasons=[thinking.finish_reasons[i] for i in sl],
                texts=[thinking_texts[i] + last_summary.get(i, "") for i in sl],
                rewards=final,  # mean summary score at the full budget
                correct=[r > 0.5 for r in final],
                packed=[packed[i] for i in sl],
                cut_scores=[cut_scores[i].tolist() for i in sl],
                num_summaries=sum(len(segments[i]) for i in sl),
            ))
        return groups

    def _on_long_tail(self, finished: list[tuple[list[int], list[int], torch.Tensor]]) -> None:
        """The engine reached the long tail: buffer the responses finished so far (this step's
        data, mixed with the previous steps' long ones) and start training the drafter. Evaluation
        rollouts reach a long tail too: there it does nothing, since nothing would stop the
        training before the next checkpoint or publish it with the policy."""
        if not self._in_training_rollout:
            return
        step = self.global_step + 1
        for prompt, response, hidden in finished:
            if self.spot.buffer.add_response(step, prompt, response, hidden):
                self._spot_added.add(hash((tuple(prompt), tuple(response))))
        self.spot.start()

    def _buffer_rollout(self, prompts: list[list[int]], result: Any) -> None:
        """After the rollout: buffer the responses the long-tail hook did not already add."""
        step = self.global_step + 1
        for prompt, response, hidden in zip(prompts, result.response_ids, result.response_hidden_states):
            if hash((tuple(prompt), tuple(response))) not in self._spot_added:
                self.spot.buffer.add_response(step, prompt, response, hidden)

    def _record_engine_stats(self, stats: Mapping[str, float]) -> None:
        """Keep the engine's speculative-decoding counters (``spec/*``) and the Ray pool's (``ray/*``)
        of this step's rollouts."""
        for key, value in stats.items():
            if key.startswith(("spec/", "ray/")):
                self._spec_metrics[key] = float(value)

    def _score(self, batch: RewardBatch) -> tuple[list[float], dict[str, list[float]], list[bool]]:
        batch.correct = []  # (re-)grade: the completions may have been clipped
        return compute_rewards(
            batch,
            self.reward_terms,
            require_think_close=self.cfg.reward.require_think_close,
            timeout_s=self.cfg.reward.grader_timeout_s,
        )

    def _truncation_limits(self, batch: RewardBatch, correct: list[bool]) -> list[int]:
        """Per-response length limits of ``rollout.truncation`` (one per completion).

        * ``difficulty_aware`` (DA-DLER, arXiv 2510.15110 Sec. 3.5): from the group's correctness
          ratio on the full-length rollouts (tiers of ``kwargs.tiers``).
        * ``palu`` (arXiv 2510.10168): each question's budget, updated from its previous visit's
          pass rate and correct lengths (:func:`rlspec.rewards.length.palu_update_budget`).
        """
        from rlspec.rewards.length import difficulty_aware_truncation_lengths, palu_update_budget

        trunc = self.cfg.rollout.truncation
        kwargs = dict(trunc.kwargs)
        cap = self.max_length_at(self.global_step)
        if trunc.name == "difficulty_aware":
            kwargs.setdefault("default_length", cap)
            return difficulty_aware_truncation_lengths(correct, batch.group_ids, **kwargs)
        # palu: budgets in the checkpointed run state, keyed like HAPO's history
        palu = self._palu_kwargs()
        records = self.reward_state.setdefault("palu", {})
        limits = []
        for uid in batch.prompt_uids():
            rec = records.get(uid)
            if rec is None:
                limits.append(cap)
            else:
                limits.append(palu_update_budget(min(rec["budget"], cap), cap, rec["pass_rate"], rec["correct_lengths"],
                                                 **palu))
        return limits

    def _record_palu(self, batch: RewardBatch, correct: list[bool]) -> None:
        """PALU: remember each question's budget, pass rate and correct lengths for its next visit."""
        limits = batch.columns["truncation_limit"]
        per_uid: dict[str, dict[str, Any]] = {}
        for uid, limit, ids, c in zip(batch.prompt_uids(), limits, batch.completion_ids, correct):
            rec = per_uid.setdefault(uid, {"budget": int(limit), "n": 0, "correct": 0, "correct_lengths": []})
            rec["n"] += 1
            if c:
                rec["correct"] += 1
                rec["correct_lengths"].append(len(ids))
        records = self.reward_state.setdefault("palu", {})
        for uid, rec in per_uid.items():
            records[uid] = {"budget": rec["budget"], "pass_rate": rec["correct"] / rec["n"],
                            "correct_lengths": rec["correct_lengths"]}

    def _truncate(self, batch: RewardBatch, result: Any, correct: list[bool]) -> tuple[RewardBatch, Any]:
        """Cut responses longer than their per-response limit (``rollout.truncation``) and
        return the clipped batch and rollout result (finish reason ``length``), to be re-scored.

        Cutting after sampling yields exactly the tokens a rollout capped at the limit would
        have sampled (the prefix distribution does not depend on the cap); only compute is spent.
        """
        limits = self._truncation_limits(batch, correct)
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
        clipped = dataclasses.replace(result, response_ids=ids, response_logprobs=logprobs, finish_reasons=reasons)
        texts = decode_responses(self.tokenizer, ids, self.eos_ids)
        batch = dataclasses.replace(batch, completions=texts, completion_ids=ids, finish_reasons=reasons,
                                    correct=[], columns={**batch.columns, "truncation_limit": limits})
        return batch, clipped

    def _informative(self, group: Group) -> bool:
        """DAPO dynamic sampling keeps groups whose metric is not all-equal (0 < #correct < n)."""
        values = [float(c) for c in group.correct] if self.tc.filter_groups.metric == "acc" else group.rewards
        return max(values) != min(values)

    def collect_rollouts(self, step: int, timing: dict[str, float]) -> tuple[list[Group], list[Group], int]:
        """Generate until ``prompts_per_step`` groups are kept. Returns (kept, all generated, chunks)."""
        target = self.tc.prompts_per_step
        fg = self.tc.filter_groups
        chunk_size = self.tc.gen_batch_size or target
        max_chunks = fg.max_num_gen_batches if fg.enable else 1
        kept: list[Group] = []
        generated: list[Group] = []
        chunks = 0
        while chunks < max_chunks and len(kept) < target:
            size = chunk_size if fg.enable else target
            groups = self._generate_groups(self.sampler.take(size), derive_seed(self.tc.seed, step, chunks), timing)
            chunks += 1
            generated.extend(groups)
            kept.extend(g for g in groups if (self._informative(g) or not fg.enable))
        return kept[:target], generated, chunks

    # ------------------------------------------------------------------ 3. advantage
    def build_batch(self, groups: list[Group]) -> TrainBatch:
        if groups and groups[0].packed is not None:
            return self._build_anytime_batch(groups)
        prompt_ids, response_ids, old_logprobs, rewards, group_index, budgets = [], [], [], [], [], []
        for g, group in enumerate(groups):
            for i in range(len(group.response_ids)):
                prompt_ids.append(group.response_prompt_ids[i] if group.response_prompt_ids else group.prompt_ids)
                if group.budgets is not None:
                    budgets.append(float(group.budgets[i]))
                response_ids.append(group.response_ids[i])
                old_logprobs.append(group.old_logprobs[i])
                rewards.append(group.rewards[i])
                group_index.append(g)
        rewards_t = torch.tensor(rewards, dtype=torch.float32)  # [B]
        group_t = torch.tensor(group_index, dtype=torch.long)  # [B]
        lengths = torch.tensor([len(r) for r in response_ids], dtype=torch.float32)  # [B]
        budgets_t = torch.tensor(budgets, dtype=torch.float32) if len(budgets) == len(response_ids) else None  # [B]
        extra: dict[str, Any] = {}
        if budgets_t is not None:
            extra["budgets"] = budgets_t
            if self.cfg.rollout.budget.name == "hbpo":  # HBPO's budget baseline f2(b), Eq. 4
                from rlspec.rewards.length import hbpo_f2

                h = self.cfg.hbpo
                extra["f2_baseline"] = torch.tensor([hbpo_f2(b, beta=h.beta, l_max=h.l_max) for b in budgets])
                extra["variant"] = h.variant
        advantages = compute_advantages(
            self.tc.adv_estimator,
            rewards_t,
            group_t,
            norm_by_std=self.tc.norm_adv_by_std,
            response_lengths=lengths if self.tc.adv_token_weighted else None,
            extra=extra,
        )
        n = self.cfg.rollout.n
        return TrainBatch(prompt_ids, response_ids, old_logprobs, rewards_t, group_t, advantages, budgets_t,
                          group_rows=[list(range(g * n, (g + 1) * n)) for g in range(len(groups))])

    def _build_anytime_batch(self, groups: list[Group]) -> TrainBatch:
        """One packed row per rollout: its thinking (per-segment BRPO advantages) and summaries."""
        rows = [(g, group, p) for g, group in enumerate(groups) for p in group.packed]
        n = self.cfg.rollout.n
        token_adv = [p.advantages for _, _, p in rows]
        advantages = torch.stack([(a * p.loss_mask).sum() / p.loss_mask.sum().clamp(min=1)
                                  for a, (_, _, p) in zip(token_adv, rows)])  # [B] mean over trained tokens
        rewards = torch.tensor([r for group in groups for r in group.rewards], dtype=torch.float32)
        return TrainBatch(
            [group.prompt_ids for _, group, _ in rows], [p.ids for _, _, p in rows], [p.logprobs for _, _, p in rows],
            rewards, torch.tensor([g for g, _, _ in rows], dtype=torch.long), advantages, None,
            group_rows=[list(range(g * n, (g + 1) * n)) for g in range(len(groups))], token_advantages=token_adv,
            loss_masks=[p.loss_mask for _, _, p in rows], seg_start=[p.seg_start for _, _, p in rows],
            seg_cut=[p.seg_cut for _, _, p in rows], positions=[p.positions for _, _, p in rows],
        )

    # ------------------------------------------------------------------ 4. loss
    def _micro_tensors(self, batch: TrainBatch, idx: list[int]) -> dict[str, torch.Tensor]:
        """Left-padded prompts + right-padded responses for the responses ``idx``."""
        p_len = max(len(batch.prompt_ids[i]) for i in idx)
        r_len = max(len(batch.response_ids[i]) for i in idx)
        input_ids = torch.full((len(idx), p_len + r_len), self.pad_id, dtype=torch.long)  # [b, P+R]
        attention = torch.zeros((len(idx), p_len + r_len), dtype=torch.long)  # [b, P+R]
        response = torch.full((len(idx), r_len), self.pad_id, dtype=torch.long)  # [b, R]
        mask = torch.zeros((len(idx), r_len), dtype=torch.float32)  # [b, R]
        old = torch.zeros((len(idx), r_len), dtype=torch.float32)  # [b, R]
        for row, i in enumerate(idx):
            prompt, resp = batch.prompt_ids[i], batch.response_ids[i]
            input_ids[row, p_len - len(prompt) : p_len] = torch.tensor(prompt)
            input_ids[row, p_len : p_len + len(resp)] = torch.tensor(resp)
            attention[row, p_len - len(prompt) : p_len + len(resp)] = 1
            response[row, : len(resp)] = torch.tensor(resp)
            mask[row, : len(resp)] = 1.0
            old[row, : len(resp)] = batch.old_logprobs[i].float()
        position_ids = (attention.cumsum(-1) - 1).clamp(min=0)  # [b, P+R]
        attention_mask: torch.Tensor = attention
        if batch.seg_start is not None:  # AnytimeReasoner's packed rows: tree mask, positions, loss mask
            attention_mask, position_ids = self._packed_attention(batch, idx, p_len, r_len, attention)
            for row, i in enumerate(idx):
                mask[row, : len(batch.response_ids[i])] = batch.loss_masks[i]
        device = next(self.model.parameters()).device  # built on the CPU, used where the policy lives
        tensors = {
            "input_ids": input_ids,
            "attention_mask": attention_mask,
            "position_ids": position_ids,
            "response": response,
            "mask": mask,
            "old_logprobs": old,
            "advantages": self._micro_advantages(batch, idx, r_len),
        }
        out = {k: v.to(device, non_blocking=True) for k, v in tensors.items()}
        out["r_len"] = torch.tensor(r_len)
        return out

    @staticmethod
    def _packed_attention(batch: TrainBatch, idx: list[int], p_len: int, r_len: int,
                          attention: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Additive ``[b, 1, P+R, P+R]`` mask and ``[b, P+R]`` positions for packed rows.

        Prompt queries: causal over the row's prompt. Response query ``j``: the prompt and response
        columns ``k < seg_cut[j]`` or ``seg_start[j] <= k <= j`` (a summary sees the thinking up to
        its cut and itself). Padding queries attend to themselves only (no all-masked rows).
        """
        b, width = len(idx), p_len + r_len
        allowed = torch.zeros(b, width, width, dtype=torch.bool)  # [b, Q, K]
        positions = torch.zeros(b, width, dtype=torch.long)
        k = torch.arange(r_len)
        for row, i in enumerate(idx):
            p = len(batch.prompt_ids[i])
            r = len(batch.response_ids[i])
            ps = p_len - p  # first prompt column (left padding)
            allowed[row, ps:p_len, ps:p_len] = torch.ones(p, p, dtype=torch.bool).tril()
            start, cut = batch.seg_start[i], batch.seg_cut[i]  # [r]
            j = torch.arange(r)[:, None]
            resp = (k[None, :] < cut[:, None]) | ((k[None, :] >= start[:, None]) & (k[None, :] <= j))  # [r, R]
            resp &= k[None, :] < r
            allowed[row, p_len : p_len + r, ps:p_len] = True
            allowed[row, p_len : p_len + r, p_len:] = resp
            positions[row, ps:p_len] = torch.arange(p)
            positions[row, p_len : p_len + r] = p + batch.positions[i]
        diag = torch.arange(width)
        allowed[:, diag, diag] = True
        bias = torch.zeros(b, 1, width, width).masked_fill_(~allowed[:, None], float("-inf"))
        return bias, positions

    @staticmethod
    def _micro_advantages(batch: TrainBatch, idx: list[int], r_len: int) -> torch.Tensor:
        """``[b]`` per-response advantages, or ``[b, R]`` when the batch has per-token ones."""
        if batch.token_advantages is None:
            return batch.advantages[idx]
        out = torch.zeros((len(idx), r_len), dtype=torch.float32)  # [b, R]
        for row, i in enumerate(idx):
            out[row, : batch.token_advantages[i].numel()] = batch.token_advantages[i]
        return out

    def _response_logprobs(
        self, model: torch.nn.Module, t: dict[str, torch.Tensor], with_entropy: bool
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        r_len = int(t["r_len"])
        out = model(
            input_ids=t["input_ids"],
            attention_mask=t["attention_mask"],
            position_ids=t["position_ids"],
            logits_to_keep=r_len + 1,
            use_cache=False,
        )
        logits = out.logits[:, :-1]  # [b, R, V]: position P-1+j predicts response token j
        return token_logprobs_and_entropy(logits, t["response"], self.cfg.rollout.temperature, with_entropy)

    def _micro_batches(self, batch: TrainBatch, members: list[int]) -> list[list[int]]:
        """Split ``members`` into micro-batches, sorted by total length so each pads little.

        At most ``micro_batch_size`` rows each and, when ``micro_batch_tokens`` is set, at most
        that many padded tokens (rows x (longest prompt + longest response)), as verl's dynamic
        batch size. A single row longer than the budget forms its own micro-batch.
        """
        ordered = sorted(members, key=lambda i: len(batch.prompt_ids[i]) + len(batch.response_ids[i]))
        size, budget = self.tc.micro_batch_size, self.tc.micro_batch_tokens
        micros: list[list[int]] = []
        current: list[int] = []
        p_max = r_max = 0
        for i in ordered:
            p, r = max(p_max, len(batch.prompt_ids[i])), max(r_max, len(batch.response_ids[i]))
            if current and (len(current) >= size or (budget and (len(current) + 1) * (p + r) > budget)):
                micros.append(current)
                current = []
                p, r = len(batch.prompt_ids[i]), len(batch.response_ids[i])
            current.append(i)
            p_max, r_max = p, r
        if current:
            micros.append(current)
        return micros

    def recompute_old_logprobs(self, batch: TrainBatch) -> None:
        with torch.no_grad():
            for micro in self._micro_batches(batch, list(range(batch.size))):
                t = self._micro_tensors(batch, micro)
                logprobs, _ = self._response_logprobs(self.model, t, with_entropy=False)
                for row, i in enumerate(micro):
                    batch.old_logprobs[i] = logprobs[row, : len(batch.response_ids[i])].detach().cpu()

    def update_policy(self, batch: TrainBatch, step: int) -> dict[str, float]:
        """PPO epochs x mini-batches (one optimizer step each) x micro-batches (accumulated)."""
        tc = self.tc
        num_groups = len(batch.group_rows)
        mini_groups = tc.mini_batch_size or tc.prompts_per_step
        sums: dict[str, float] = {}
        token_total = 0.0
        ratio_max = 0.0
        grad_norms: list[float] = []
        shuffle = torch.Generator().manual_seed(derive_seed(tc.seed, step, 99))
        strategy = self.strategy
        self.train_module.train()
        for _epoch in range(tc.ppo_epochs):
            order = torch.randperm(num_groups, generator=shuffle).tolist()
            for start in range(0, num_groups, mini_groups):
                members = [i for g in order[start : start + mini_groups] for i in batch.group_rows[g]]
                lengths = [len(batch.response_ids[i]) if batch.loss_masks is None else float(batch.loss_masks[i].sum())
                           for i in members]
                normalizer = LossNormalizer(
                    num_tokens=float(max(sum(lengths), 1)),
                    num_seqs=float(len(members)),
                    max_response_length=float(self.cfg.rollout.max_response_length),
                )
                strategy.zero_grad()
                # this rank's micro-batches (all of them in one process); `counted=False` pads a
                # rank that is short of one so every rank runs the same forwards/backwards
                mine = strategy.deal(self._micro_batches(batch, members))
                for k, (micro, counted) in enumerate(mine):
                    t = self._micro_tensors(batch, micro)
                    logprobs, entropy = self._response_logprobs(self.train_module, t, with_entropy=True)
                    mask = t["mask"]
                    pg = ppo_clip_policy_loss(
                        logprobs,
                        t["old_logprobs"],
                        t["advantages"],
                        clip_ratio_low=tc.clip_ratio_low,
                        clip_ratio_high=tc.clip_ratio_high,
                        clip_ratio_c=tc.clip_ratio_c,
                    )
                    pg_loss = aggregate_loss(pg.loss_mat, mask, tc.loss_agg_mode, normalizer)
                    loss = pg_loss
                    tok = float(mask.sum())
                    kl = None
                    if self.ref_model is not None:
                        with torch.no_grad():
                            ref_logprobs, _ = self._response_logprobs(self.ref_model, t, with_entropy=False)
                        kl = kl_penalty(logprobs, ref_logprobs, tc.kl_estimator)  # [b, R]
                        loss = loss + tc.kl_coef * aggregate_loss(kl, mask, tc.loss_agg_mode, normalizer)
                    if tc.entropy_coef:
                        loss = loss - tc.entropy_coef * aggregate_loss(entropy, mask, tc.loss_agg_mode, normalizer)
                    if not torch.isfinite(loss):
                        raise TrainingError(
                            f"non-finite loss ({loss.item()}) at step {step}; lower trainer.lr or check the "
                            f"reward values; the run resumes from the last checkpoint with trainer.resume=auto"
                        )
                    strategy.backward(loss * (strategy.loss_scale if counted else 0.0), last=k == len(mine) - 1)
                    if not counted:
                        continue
                    masked = lambda x: float((x.float() * mask).sum())  # noqa: E731
                    for key, value in (
                        ("actor/pg_loss", float(pg_loss.detach()) * normalizer.num_tokens),
                        ("actor/entropy", masked(entropy.detach())),
                        ("actor/pg_clipfrac_high", masked(pg.clipped_high)),
                        ("actor/pg_clipfrac_low", masked(pg.clipped_low)),
                        ("actor/pg_clipfrac_dual", masked(pg.dual_clipped)),
                        ("actor/ppo_kl", masked(pg.approx_kl)),
                        ("actor/kl", masked(kl.detach()) if kl is not None else None),
                    ):
                        if value is not None:
                            sums[key] = sums.get(key, 0.0) + value
                    ratio_max = max(ratio_max, float((pg.ratio * mask).max()))
                    token_total += tok
                grad_norms.append(strategy.step(tc.grad_clip, step))
        self.train_module.eval()
        sums["_tokens"] = token_total
        sums = strategy.all_reduce_sum(sums)  # data parallel: every rank saw a share of the micro-batches
        token_total = sums.pop("_tokens")
        sums["actor/ratio_max"] = strategy.all_reduce_max({"r": ratio_max})["r"]
        metrics = {k: (v if k == "actor/ratio_max" else v / max(token_total, 1.0)) for k, v in sums.items()}
        metrics["actor/pg_loss"] = sums.get("actor/pg_loss", 0.0) / max(token_total, 1.0)
        metrics["actor/pg_clipfrac"] = metrics.get("actor/pg_clipfrac_high", 0.0) + metrics.get("actor/pg_clipfrac_low", 0.0)
        metrics["actor/grad_norm"] = _mean(grad_norms)
        metrics["actor/lr"] = self.scheduler.get_last_lr()[0]
        metrics["actor/num_updates"] = float(len(grad_norms))
        return metrics

    # ------------------------------------------------------------------ one RL step
    def train_step(self) -> dict[str, float]:
        step = self.global_step + 1
        timing = {"rollout": 0.0, "reward": 0.0, "generated_tokens": 0.0}
        t_step = time.perf_counter()
        self._spec_metrics: dict[str, float] = {}
        kept, generated, chunks = self.collect_rollouts(step, timing)  # 1-2. generate + score
        metrics = self._rollout_metrics(generated, kept, chunks)
        metrics["rollout/max_length"] = float(self.max_length_at(step - 1))
        metrics.update(self._spec_metrics)  # speculative decoding (rollout.speculative): accept length, arms, ...
        t_train = time.perf_counter()
        if kept:
            batch = self.build_batch(kept)  # 3. advantage
            if self.tc.old_logprobs == "recompute":
                self.recompute_old_logprobs(batch)
            metrics.update(self.update_policy(batch, step))  # 4-5. loss + optimizer step
            metrics["adv/mean"] = float(batch.advantages.mean())
            metrics["adv/abs_mean"] = float(batch.advantages.abs().mean())
            self.strategy.sync_policy()  # ZeRO-3: gather the new weights into the policy copy
            self.engine.update_weights()
        else:
            metrics["actor/num_updates"] = 0.0
        self.scheduler.step()
        self.global_step = step
        now = time.perf_counter()
        metrics["timing_s/rollout"] = timing["rollout"]
        metrics["timing_s/reward"] = timing["reward"]
        metrics["timing_s/train"] = now - t_train
        metrics["timing_s/step"] = now - t_step
        metrics["perf/tokens_per_s"] = timing["generated_tokens"] / max(timing["rollout"], 1e-9)
        metrics["perf/generated_tokens"] = timing["generated_tokens"]
        if self.is_main and self.tc.log_completions_every and step % self.tc.log_completions_every == 0:
            self._write_completions(step, generated)
        return metrics

    def _rollout_metrics(self, generated: list[Group], kept: list[Group], chunks: int) -> dict[str, float]:
        rewards = [r for g in generated for r in g.rewards]
        correct = [float(c) for g in generated for c in g.correct]
        lengths = [float(len(r)) for g in generated for r in g.response_ids]
        truncated = [float(f == FINISH_LENGTH) for g in generated for f in g.finish_reasons]
        len_correct = [len(r) for g in generated for r, c in zip(g.response_ids, g.correct) if c]
        len_wrong = [len(r) for g in generated for r, c in zip(g.response_ids, g.correct) if not c]
        zero_std = [float(max(g.rewards) == min(g.rewards)) for g in generated]
        metrics = {
            "reward/mean": _mean(rewards),
            "reward/std": float(torch.tensor(rewards).std()) if len(rewards) > 1 else 0.0,
            "acc/mean": _mean(correct),
            "response_length/mean": _mean(lengths),
            "response_length/p50": _percentile(lengths, 0.5),
            "response_length/p90": _percentile(lengths, 0.9),
            "response_length/max": max(lengths) if lengths else float("nan"),
            "response_length/min": min(lengths) if lengths else float("nan"),
            "response_length/clip_ratio": _mean(truncated),
            "response_length/correct_mean": _mean(len_correct),
            "response_length/incorrect_mean": _mean(len_wrong),
            "batch/frac_reward_zero_std": _mean(zero_std),
            "batch/groups_generated": float(len(generated)),
            "batch/groups_kept": float(len(kept)),
            "batch/gen_chunks": float(chunks),
        }
        for name in generated[0].per_term if generated else []:
            metrics[f"reward/{name}"] = _mean([v for g in generated for v in g.per_term[name]])
        if self.anytime_budgets:  # AnytimeReasoner: summary accuracy at every budget cut
            cut_scores = [row for g in generated for row in (g.cut_scores or [])]
            for s, b in enumerate(self.anytime_budgets):
                metrics[f"anytime/score_at_{b}"] = _mean([row[s] for row in cut_scores])
            metrics["anytime/avg_score"] = _mean([sum(row) / len(row) for row in cut_scores])
            metrics["anytime/summaries"] = float(sum(g.num_summaries for g in generated))
        if self.cfg.rollout.budget.name == "hbpo":  # does each budget subgroup answer within its budget?
            by_budget: dict[int, list[tuple[int, bool]]] = {}
            for g in generated:
                for b, r, c in zip(g.budgets or [], g.response_ids, g.correct):
                    by_budget.setdefault(int(b), []).append((len(r), c))
            for b, items in sorted(by_budget.items()):
                metrics[f"budget/{b}/response_length_mean"] = _mean([n for n, _ in items])
                metrics[f"budget/{b}/acc"] = _mean([float(c) for _, c in items])
        return metrics

    def _write_completions(self, step: int, groups: list[Group], per_step: int = 4) -> None:
        path = self.run_dir / "completions.jsonl"
        with open(path, "a", encoding="utf-8") as f:
            for group in groups[:per_step]:
                row = self.train_rows[group.row_index]
                i = 0
                f.write(
                    json.dumps(
                        {
                            "step": step,
                            "question": row["question"],
                            "answer": row["answer"],
                            "completion": group.texts[i],
                            "reward": group.rewards[i],
                            "correct": group.correct[i],
                            "tokens": len(group.response_ids[i]),
                            "finish_reason": group.finish_reasons[i],
                        }
                    )
                    + "\n"
                )

    # ------------------------------------------------------------------ evaluation
    def evaluate(self, step: int) -> dict[str, float]:
        ec = self.cfg.eval
        rows = self.eval_rows[: ec.num_problems] if ec.num_problems else self.eval_rows
        prompts = self.eval_prompt_ids[: len(rows)]
        settings = EvalSettings(
            samples_per_problem=ec.samples_per_problem,
            temperature=ec.temperature,
            top_p=ec.top_p,
            top_k=ec.top_k,
            max_new_tokens=ec.max_new_tokens,
            seed=ec.seed,
            require_think_close=self.cfg.reward.require_think_close,
            grader_timeout_s=self.cfg.reward.grader_timeout_s,
        )
        self.model.eval()
        metrics = evaluate(
            self.engine, self.tokenizer, rows, prompts, settings, self.eos_ids,
            out_path=self.run_dir / "evals" / f"step_{step:06d}.jsonl" if self.is_main else None,
        )
        self.eval_history[step] = metrics
        return metrics

    # ------------------------------------------------------------------ checkpoints
    def state_dict(self) -> dict[str, Any]:
        return {
            "global_step": self.global_step,
            "optimizer": self.strategy.optimizer_state(),  # None: sharded under deepspeed/
            "scheduler": self.scheduler.state_dict(),
            "sampler": self.sampler.state_dict(),
            "rng": rng_state(),
            "eval_history": self.eval_history,
            "checkpoint_tags": self.checkpoint_tags,
            "reward_state": copy.deepcopy(self.reward_state),
            "seed": self.tc.seed,
        }

    def load_state_dict(self, state: dict[str, Any], checkpoint: Path | None = None) -> None:
        self.global_step = int(state["global_step"])
        self.strategy.load_optimizer_state(state["optimizer"], checkpoint or Path("the checkpoint"))
        self.scheduler.load_state_dict(state["scheduler"])
        self.sampler.load_state_dict(state["sampler"])
        set_rng_state(state["rng"])
        self.eval_history = dict(state.get("eval_history", {}))
        self.checkpoint_tags = {k: list(v) for k, v in state.get("checkpoint_tags", {}).items()}
        self.reward_state.clear()  # in place: reward batches hold a reference
        self.reward_state.update(copy.deepcopy(state.get("reward_state", {})))

    def save(self, tag: str | None = None) -> Path:
        """Checkpoint the current step. A ``tag`` (e.g. SIRI's ``siri-low``) marks the checkpoint
        and protects it from rotation; tags are listed in ``checkpoints/tags.json``.

        With DeepSpeed every rank first writes its optimizer partition into a shared temporary
        directory, which the main rank moves into the checkpoint inside the same atomic write."""
        name = step_dir_name(self.global_step)
        if tag is not None and name not in self.checkpoint_tags.setdefault(tag, []):
            self.checkpoint_tags[tag].append(name)
        protected = tuple(n for names in self.checkpoint_tags.values() for n in names)
        extras = self._checkpoint_extras()
        if self.strategy.name == "deepspeed":
            sharded = checkpoint_root(self.run_dir) / f"{name}.tmp-deepspeed"
            if self.is_main:
                shutil.rmtree(sharded, ignore_errors=True)
                sharded.mkdir(parents=True)
            self.strategy.barrier()
            self.strategy.save_sharded(sharded)
            self.strategy.barrier()
            extras["deepspeed"] = lambda dst: os.replace(sharded, dst)
        path = checkpoint_root(self.run_dir) / name
        if self.is_main:
            path = self._save_main(name, extras, protected)
        self.strategy.barrier()
        return path

    def _save_main(self, name: str, extras: dict[str, Any], protected: tuple[str, ...]) -> Path:
        path = save_checkpoint(
            self.run_dir,
            self.global_step,
            self.model,
            self.tokenizer,
            self.state_dict(),
            meta={"run_name": self.cfg.run_name, "tags": sorted(t for t, ns in self.checkpoint_tags.items() if name in ns)},
            keep=self.tc.save_total_limit,
            protected=protected,
            extras=extras,
        )
        if self.checkpoint_tags:
            (path.parent / "tags.json").write_text(json.dumps(self.checkpoint_tags, indent=2))
        return path

    def _checkpoint_extras(self) -> dict[str, Any]:
        """The engine's EAGLE drafter (rollout.speculative) is saved with the policy: it is trained
        online, so it is part of the run's state and of the exported model."""
        drafter = getattr(self.engine, "drafter", None)
        if drafter is None:
            return {}

        def write(path: Path) -> None:
            with drafter.lock:
                drafter.save(path)

        extras = {"drafter": write}
        if self.spot is not None:  # its optimizer, step count, RNG and (when small) its buffer

            def write_spot(path: Path) -> None:
                path.mkdir()
                torch.save(self.spot.state_dict(), path / "state.pt")

            extras["spot_trainer"] = write_spot
        return extras

    def _phase_tag(self, step: int) -> str | None:
        """SIRI: ``siri-low`` / ``siri-high`` at the end of a compression / expansion phase."""
        sched = self.cfg.rollout.length_schedule
        if sched.name and sched.name.startswith("siri"):
            return siri_phase_ends(step, int(sched.kwargs["period"]))
        return None

    def maybe_resume(self) -> Path | None:
        """Apply ``trainer.resume``: ``auto`` (latest complete checkpoint if any), ``disable``, or a path."""
        resume = self.tc.resume
        if resume == "disable":
            return None
        path = find_latest_checkpoint(self.run_dir) if resume == "auto" else Path(resume)
        if path is None:
            return None
        state = load_trainer_state(path)
        if state.get("seed") != self.tc.seed:
            raise RLSpecError(
                f"checkpoint {path} was trained with trainer.seed={state.get('seed')} but the config says "
                f"{self.tc.seed}; resume with the same seed or start a new run (run_name=...)"
            )
        from transformers import AutoModelForCausalLM

        saved = AutoModelForCausalLM.from_pretrained(path / "model", dtype=next(self.model.parameters()).dtype)
        self.model.load_state_dict(saved.state_dict())
        self.strategy.load_sharded(path)  # DeepSpeed: optimizer partitions (and ZeRO's master weights)
        drafter = getattr(self.engine, "drafter", None)
        if drafter is not None and (path / "drafter").is_dir():  # the online-trained drafter of that step
            from rlspec.rollout.drafter import EagleDrafter

            restored = EagleDrafter.load(path / "drafter", self.model)
            with drafter.lock:
                drafter.load_state_dict(restored.state_dict(), strict=False)
                drafter.version = restored.version
            if self.spot is not None:
                self.spot.trainer.sync_from_drafter()
                spot_state = path / "spot_trainer" / "state.pt"
                if spot_state.is_file():  # older checkpoints have none: the spot trainer starts afresh
                    self.spot.load_state_dict(torch.load(spot_state, map_location="cpu", weights_only=False))
        self.load_state_dict(state, path)
        if self.is_main:
            for log_file in ("metrics.jsonl", "completions.jsonl"):
                truncate_jsonl(self.run_dir / log_file, self.global_step)
        self.strategy.barrier()
        self.engine.update_weights()
        return path

    # ------------------------------------------------------------------ the loop
    def fit(self) -> dict[str, Any]:
        ec = self.cfg.eval
        log = self.logger
        if self.global_step == 0 and ec.at_start and 0 not in self.eval_history:
            metrics = self.evaluate(0)
            if log:
                log.log(metrics, step=0)
                log.print(f"eval at step 0: accuracy={metrics['eval/accuracy']:.3f} mean_tokens={metrics['eval/mean_tokens']:.1f}")
        while self.global_step < self.tc.steps:
            metrics = self.train_step()
            step = self.global_step
            if ec.every and step % ec.every == 0 and step != self.tc.steps:
                metrics.update(self.evaluate(step))
            if log:
                log.log(metrics, step=step)
            tag = self._phase_tag(step)
            if tag or (self.tc.save_every and step % self.tc.save_every == 0) or step == self.tc.steps:
                self.save(tag)
        if ec.at_end and self.tc.steps not in self.eval_history:
            metrics = self.evaluate(self.tc.steps)
            if log:
                log.log(metrics, step=self.tc.steps)
            self.save()  # the final checkpoint also records the final eval
        summary = self.summary()
        if not self.is_main:
            return summary
        (self.run_dir / "summary.json").write_text(json.dumps(summary, indent=2))
        if self.cfg.logger.plot:
            plot_training_curves(self.run_dir / "metrics.jsonl", self.run_dir / "training_curves.png", self.cfg.run_name)
        return summary

    def summary(self) -> dict[str, Any]:
        start = self.eval_history.get(0)
        end = self.eval_history.get(self.tc.steps)
        out: dict[str, Any] = {"run_name": self.cfg.run_name, "steps": self.global_step, "start": start, "end": end,
                               "model_path": self.start_model_path}
        if start and end:
            out["accuracy_change_points"] = 100 * (end["eval/accuracy"] - start["eval/accuracy"])
            out["token_change_percent"] = 100 * (end["eval/mean_tokens"] / start["eval/mean_tokens"] - 1)
        return out
