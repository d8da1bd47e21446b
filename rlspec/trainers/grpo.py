"""The GRPO trainer loop (DeepSeekMath GRPO, with the DAPO/DLER knobs).

One step reads top to bottom, like nanochat's ``chat_rl.py``:

    generate (n responses per prompt, dynamic sampling refills filtered groups)
    -> score (math-verify correctness + length terms)
    -> advantage (group or batch normalisation)
    -> loss (PPO-clip with clip-higher, token-level aggregation, optional KL)
    -> optimizer step -> push weights to the rollout engine
    -> log (and checkpoint / evaluate on schedule)

All maths lives in :mod:`rlspec.trainers.advantages`, :mod:`rlspec.trainers.losses` and
:mod:`rlspec.rewards`; method-specific rollout behaviour (budget prefills, truncation, summaries)
in the rollout hooks of :mod:`rlspec.trainers.hooks`; the policy update in
:mod:`rlspec.trainers.actor`; checkpoints in :mod:`rlspec.checkpoint`. This module moves data
between them.
"""

from __future__ import annotations

import copy
import json
import time
import warnings
from pathlib import Path
from typing import Any, Mapping, Sequence

import torch

from rlspec.checkpoint import Checkpointer, CheckpointPart, rng_state, set_rng_state
from rlspec.config import RLSpecConfig
from rlspec.data import PromptSampler, derive_seed
from rlspec.errors import ConfigError, TrainingError
from rlspec.evals.heldout import evaluate
from rlspec.models import decode_responses
from rlspec.rewards.terms import RewardBatch, compute_rewards
from rlspec.rollout.base import RolloutEngine, RolloutResult, SamplingParams, merge_stats
from rlspec.tracking import MetricsLogger, plot_training_curves, truncate_jsonl
from rlspec.trainers.actor import Actor
from rlspec.trainers.advantages import compute_advantages
from rlspec.trainers.batch import Group, TrainBatch, flatten_groups, packed_batch
from rlspec.trainers.guards import DivergenceGuard, NoLearningGuard, check_finite_state
from rlspec.trainers.hooks import HookContext, RolloutChunk, build_hooks
from rlspec.trainers.metrics import rollout_metrics, write_completions
from rlspec.trainers.schedules import checkpoint_tag, length_at, lr_factor
from rlspec.trainers.strategy import LocalStrategy
from rlspec.trainers.think_tags import ThinkTags


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
        strategy: Any = None,
        online_drafting: Any = None,
        checkpoint_parts: Sequence[CheckpointPart] = (),
        critic: Any = None,
    ) -> None:
        self.cfg, self.tc = cfg, cfg.trainer
        self.start_model_path = start_model_path  # recorded in summary.json (export's merge.base=start)
        # the policy the engine samples from and checkpoints save (full weights); the strategy
        # owns the optimizer and the module training forwards run through (DeepSpeed: its engine)
        self.strategy = strategy if strategy is not None else LocalStrategy(model, cfg.trainer)
        self.model, self.is_main = self.strategy.policy, self.strategy.is_main
        self.tokenizer, self.engine, self.eos_ids = tokenizer, engine, list(eos_ids)
        # TLT's spot trainer (rollout.speculative.online): trains the engine's drafter during training rollouts
        self.online_drafting = online_drafting
        self.train_rows, self.eval_rows = list(train_rows), list(eval_rows)
        self.train_prompt_ids = [list(p) for p in train_prompt_ids]
        self.eval_prompt_ids = [list(p) for p in eval_prompt_ids]
        self.run_dir = Path(run_dir)
        self.logger = logger
        self.reward_terms = {name: dict(term) for name, term in reward_terms.items()}
        self.global_step = 0
        # set by the run wiring on SIGTERM/SIGINT (rlspec.stopping): checkpoint after this step and stop
        self.stop_requested: str | None = None
        pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else self.eos_ids[0]
        self.sampler = PromptSampler(len(self.train_rows), seed=self.tc.seed, shuffle=cfg.data.shuffle)
        needs_ref = self.tc.kl_coef > 0 or self.tc.kl_in_reward
        ref_model = copy.deepcopy(self.model).eval().requires_grad_(False) if needs_ref else None
        self.actor = Actor(cfg, self.strategy, ref_model, pad_id)
        # PPO with a critic (trainer.adv_estimator=gae): rlspec.trainers.critic.Critic, built by the run wiring
        self.critic = critic
        if (critic is None) == (self.tc.adv_estimator == "gae"):
            raise ConfigError("trainer.adv_estimator=gae and a critic go together (the run wiring builds the critic "
                              "from critic.*); use +recipe=ppo")
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(  # acts on the strategy optimizer's param groups
            self.strategy.optimizer, lambda s: lr_factor(s, self.tc.warmup_steps, self.tc.lr_schedule, self.tc.steps))
        self.checkpointer = Checkpointer(self.run_dir, self.model, tokenizer, self.strategy, keep=self.tc.save_total_limit,
                                         run_name=cfg.run_name, parts=checkpoint_parts)
        self.eval_history: dict[int, dict[str, float]] = {}
        self._engine_stats: dict[str, float] = {}  # this step's spec/ ray/ drafter/ counters
        self._spec_calls: list[dict[str, float]] = []  # this step's rollout calls' spec/ stats
        self.reward_state: dict[str, Any] = {}  # stateful reward terms (HAPO history), checkpointed
        self.max_length_at(0)  # a bad length schedule fails at start, not at step N
        self.divergence, self.no_learning = DivergenceGuard(self.tc), NoLearningGuard(cfg)  # trainers/guards.py
        self.hooks = build_hooks(HookContext(cfg, tokenizer, self.eos_ids, self.train_rows, self.train_prompt_ids,
                                             self.max_length_at))
        for hook in self.hooks:  # bad hook settings fail at start, naming their key
            try:
                hook.check()
            except (ValueError, TypeError) as err:
                raise ConfigError(f"{hook.config_key}: {err}") from None
        first_prompt = tokenizer.decode(self.train_prompt_ids[0]) if self.train_prompt_ids else None
        self.think_tags = ThinkTags(cfg, tokenizer, first_prompt, [hook.name for hook in self.hooks])
        self.think_tags.check_start()  # reward.think_tags: HBPO / AnytimeReasoner need a model that thinks in tags

    def max_length_at(self, step: int) -> int:
        """The rollout cap of 0-based ``step``: ``rollout.length_schedule`` if set (SIRI,
        ThinkPrune), else ``rollout.max_response_length``."""
        sched = self.cfg.rollout.length_schedule
        if sched.name is None:
            return self.cfg.rollout.max_response_length
        return length_at(sched.name, step, sched.kwargs)

    # ------------------------------------------------------------------ the loop
    def fit(self) -> dict[str, Any]:
        ec, log = self.cfg.eval, self.logger
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
            sched = self.cfg.rollout.length_schedule
            tag = checkpoint_tag(sched.name, step, sched.kwargs)  # SIRI: siri-low / siri-high
            stop = self.stop_agreed() and step < self.tc.steps
            if stop or tag or (self.tc.save_every and step % self.tc.save_every == 0) or step == self.tc.steps:
                self.save(tag)
            if stop:  # no final eval and no summary.json: the run wiring says how to resume
                return self.summary()
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

    def stop_agreed(self) -> bool:
        """Whether a stop was requested on any rank (then every rank stops after the same step)."""
        if self.strategy.world_size > 1:
            asked = self.strategy.all_reduce_max({"stop": float(self.stop_requested is not None)})["stop"] > 0
            self.stop_requested = self.stop_requested or ("a signal on another rank" if asked else None)
        return self.stop_requested is not None

    def train_step(self) -> dict[str, float]:
        step = self.global_step + 1
        timing = {"rollout": 0.0, "reward": 0.0, "generated_tokens": 0.0}
        t_step = time.perf_counter()
        self._engine_stats = {}
        self._spec_calls = []
        kept, generated, chunks = self.collect_rollouts(step, timing)  # 1-2. generate + score
        metrics = rollout_metrics(generated, kept, chunks)
        for hook in self.hooks:
            metrics.update(hook.metrics(generated))
        metrics["rollout/max_length"] = float(self.max_length_at(step - 1))
        metrics.update(self._engine_stats)  # the Ray pool, the online drafter
        metrics.update(self._spec_metrics())  # speculative decoding, over the step's rollout calls
        t_train = time.perf_counter()
        batch = None
        if kept:
            batch = self.build_batch(kept, metrics)  # 3. advantage (a critic's values: GAE)
            if self.tc.old_logprobs == "recompute":
                self.actor.recompute_old_logprobs(batch)
            if self.critic is not None:  # 4'. the critic's own update on the returns
                metrics.update(self.critic.update(batch, step))
            metrics["adv/mean"] = float(batch.advantages.mean())
            metrics["adv/abs_mean"] = float(batch.advantages.abs().mean())
            if self.critic is not None and step <= self.critic.warmup_steps:  # critic warm-up: the policy waits
                metrics["actor/num_updates"] = 0.0
            else:
                informative = not self.no_learning.advantages_zero(batch)
                with self.divergence.watch(self.model, metrics, step, informative):  # a diverged update stops here
                    metrics.update(self.update_policy(batch, step))  # 4-5. loss + optimizer step
                    self.strategy.sync_policy()  # ZeRO-3: gather the new weights into the policy copy
                self.engine.update_weights()
        else:
            metrics["actor/num_updates"] = 0.0
        self.no_learning.observe(step, generated, kept, batch, metrics)  # train/skipped_updates
        with warnings.catch_warnings():  # the schedule follows RL steps, also those without a policy update
            warnings.filterwarnings("ignore", message=r"Detected call of `lr_scheduler.step\(\)` before")
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
            write_completions(self.run_dir / "completions.jsonl", step, generated, self.train_rows)
        return metrics

    # ------------------------------------------------------------------ 1. generate + 2. score
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
            groups = self.generate_groups(self.sampler.take(size), derive_seed(self.tc.seed, step, chunks), timing)
            chunks += 1
            generated.extend(groups)
            kept.extend(g for g in groups if (self._informative(g) or not fg.enable))
        self._engine_stats["train/groups_short"] = float(max(target - len(kept), 0))
        if len(kept) < target:
            self._short_batch(len(kept), chunks)
        return kept[:target], generated, chunks

    def _short_batch(self, kept: int, chunks: int) -> None:
        """Dynamic sampling ran out of chunks: stop (``on_short=error``, verl) or warn once and train."""
        fg, target = self.tc.filter_groups, self.tc.prompts_per_step
        msg = (f"dynamic sampling kept {kept} of {target} groups after {chunks} generation chunks "
               f"(trainer.filter_groups.max_num_gen_batches={fg.max_num_gen_batches}); raise it or "
               f"trainer.gen_batch_size (now {self.tc.gen_batch_size or target} prompts per chunk)")
        if fg.on_short == "error":
            raise TrainingError(f"{msg}, or set trainer.filter_groups.on_short=train to train on the groups kept")
        if not getattr(self, "_warned_short", False):
            self._warned_short = True
            warnings.warn(f"{msg}; training on the groups kept (said once: train/groups_short logs each step's)",
                          stacklevel=3)

    def _informative(self, group: Group) -> bool:
        """DAPO dynamic sampling keeps groups whose metric is not all-equal (0 < #correct < n)."""
        values = [float(c) for c in group.correct] if self.tc.filter_groups.metric == "acc" else group.rewards
        return max(values) != min(values)

    def generate_groups(self, row_indices: list[int], seed: int, timing: dict[str, float]) -> list[Group]:
        """Sample ``n`` responses for each row and score them (rollout hooks act in between)."""
        n, rc = self.cfg.rollout.n, self.cfg.rollout
        cap = self.max_length_at(self.global_step)
        chunk = RolloutChunk(
            step=self.global_step, seed=seed, max_length=cap, engine=self.engine, row_indices=row_indices,
            rows=[self.train_rows[i] for i in row_indices for _ in range(n)],
            prompt_ids=[self.train_prompt_ids[i] for i in row_indices for _ in range(n)],
            params=SamplingParams(max_new_tokens=cap, temperature=rc.temperature, top_p=rc.top_p, top_k=rc.top_k,
                                  stop_strings=tuple(rc.stop_strings), seed=seed),
            timing=timing,
        )
        for hook in self.hooks:
            hook.before_rollout(chunk)  # budget prefills / targets
        t0 = time.perf_counter()
        chunk.result = self._rollout(chunk.prompt_ids, chunk.params)
        self._record_engine_stats(chunk.result.stats)
        timing["generated_tokens"] += sum(len(r) for r in chunk.result.response_ids)  # before any truncation
        for hook in self.hooks:
            hook.after_rollout(chunk)  # more sampling (summaries)
        timing["rollout"] += time.perf_counter() - t0
        t0 = time.perf_counter()
        chunk.texts = decode_responses(self.tokenizer, chunk.result.response_ids, self.eos_ids)
        self.think_tags.require_close(chunk.texts, f"step {self.global_step + 1}",  # no </think>: stop / switch
                                      chunk.result.finish_reasons)
        columns = {key: [row.get(key) for row in chunk.rows] for key in chunk.rows[0] if key not in ("question", "answer")}
        chunk.batch = RewardBatch(
            prompts=[row["question"] for row in chunk.rows], completions=chunk.texts,
            completion_ids=chunk.result.response_ids, finish_reasons=chunk.result.finish_reasons,
            answers=[row["answer"] for row in chunk.rows], correct=[],
            group_ids=[g for g in range(len(row_indices)) for _ in range(n)], step=self.global_step,
            columns={**columns, **chunk.columns}, state=self.reward_state,
        )
        for hook in self.hooks:
            hook.before_scoring(chunk)  # truncation; or a hook's own scores
        if chunk.rewards is None:
            chunk.batch.correct = []  # graded here: the completions may have been clipped
            chunk.rewards, chunk.per_term, chunk.correct = compute_rewards(
                chunk.batch, self.reward_terms, require_think_close=self.cfg.reward.require_think_close,
                timeout_s=self.cfg.reward.grader_timeout_s, last_number_fallback=self.cfg.reward.last_number_fallback)
        for hook in self.hooks:
            hook.after_scoring(chunk)
        timing["reward"] += time.perf_counter() - t0
        return [self._group(chunk, g, row_index) for g, row_index in enumerate(row_indices)]

    def _rollout(self, prompt_ids: list[list[int]], params: SamplingParams) -> RolloutResult:
        if self.online_drafting is not None:  # trains the drafter during the long tail
            return self.online_drafting.generate(prompt_ids, params, self.global_step + 1)
        return self.engine.generate(prompt_ids, params)

    def _group(self, chunk: RolloutChunk, g: int, row_index: int) -> Group:
        n, res = self.cfg.rollout.n, chunk.result
        sl = slice(g * n, (g + 1) * n)
        return Group(
            row_index=row_index, prompt_ids=self.train_prompt_ids[row_index], response_ids=res.response_ids[sl],
            old_logprobs=res.response_logprobs[sl], finish_reasons=res.finish_reasons[sl], texts=chunk.texts[sl],
            rewards=chunk.rewards[sl], correct=chunk.correct[sl], per_term={k: v[sl] for k, v in chunk.per_term.items()},
            response_prompt_ids=chunk.prompt_ids[sl] if chunk.budgets is not None else None,
            budgets=chunk.budgets[sl] if chunk.budgets is not None else None,
            packed=chunk.packed[sl] if chunk.packed is not None else None,
            extras={k: v[sl] for k, v in chunk.extras.items()},
        )

    def _record_engine_stats(self, stats: Mapping[str, float]) -> None:
        """Keep a rollout call's speculative-decoding counters (``spec/*``, merged per step by
        :meth:`_spec_metrics`) and the latest Ray pool (``ray/*``) and online drafter
        (``drafter/*``) counters."""
        self._spec_calls.append({k: float(v) for k, v in stats.items()
                                 if k.startswith("spec/") or k in ("tokens", "prompt_tokens", "decode_steps")})
        for key, value in stats.items():
            if key.startswith(("ray/", "drafter/")):
                self._engine_stats[key] = float(value)

    def _spec_metrics(self) -> dict[str, float]:
        """This step's ``spec/*`` metrics over its rollout calls (counts summed, rates weighted by
        speculative steps); the history's size is the latest call's, not a sum."""
        calls = self._spec_calls
        if not any("spec/sd_steps" in c or "spec/history_bytes" in c for c in calls):
            return {}
        out = {k: v for k, v in merge_stats(calls).items() if k.startswith("spec/")}
        last = next((c for c in reversed(calls) if "spec/history_bytes" in c), None)
        if last is not None:
            out["spec/history_bytes"] = last["spec/history_bytes"]
            out["spec/history_prompts"] = last.get("spec/history_prompts", 0.0)
        return out

    # ------------------------------------------------------------------ 3. advantage
    def build_batch(self, groups: list[Group], metrics: dict[str, float] | None = None) -> TrainBatch:
        n = self.cfg.rollout.n
        if groups and groups[0].packed is not None:
            return packed_batch(groups, n)  # per-token advantages from the rollout hook (BRPO)
        batch = flatten_groups(groups, n)
        metrics = metrics if metrics is not None else {}
        kl = self.actor.kl_to_reference(batch) if self.tc.kl_in_reward else None  # verl use_kl_in_reward
        if kl is not None:
            metrics["reward/kl_penalty"] = self.tc.kl_reward_coef * float(torch.cat(kl).mean())
        if self.critic is not None:  # PPO: per-token GAE advantages from the critic's values
            metrics.update(self.critic.score(batch, kl))
            return batch
        if kl is not None:  # outcome estimators see the reward less the response's summed KL penalty
            batch.rewards = batch.rewards - self.tc.kl_reward_coef * torch.stack([k.sum() for k in kl])
        extra: dict[str, Any] = {"budgets": batch.budgets} if batch.budgets is not None else {}
        for hook in self.hooks:
            extra.update(hook.advantage_inputs(batch.budgets))  # HBPO's budget baseline f2(b), Eq. 4
        lengths = torch.tensor([len(r) for r in batch.response_ids], dtype=torch.float32)  # [B]
        batch.advantages = compute_advantages(
            self.tc.adv_estimator, batch.rewards, batch.group_index, norm_by_std=self.tc.norm_adv_by_std,
            response_lengths=lengths if self.tc.adv_token_weighted else None, extra=extra,
        )
        return batch

    # ------------------------------------------------------------------ 4-5. loss + optimizer step
    def update_policy(self, batch: TrainBatch, step: int) -> dict[str, float]:
        """PPO epochs x mini-batches x micro-batches at the current learning rate."""
        return self.actor.update(batch, step, self.scheduler.get_last_lr()[0])

    # ------------------------------------------------------------------ evaluation
    def evaluate(self, step: int) -> dict[str, float]:
        ec = self.cfg.eval
        rows = self.eval_rows[: ec.num_problems] if ec.num_problems else self.eval_rows
        self.model.eval()
        metrics = evaluate(
            self.engine, self.tokenizer, rows, self.eval_prompt_ids[: len(rows)], ec, self.eos_ids,
            require_think_close=self.cfg.reward.require_think_close, grader_timeout_s=self.cfg.reward.grader_timeout_s,
            last_number_fallback=self.cfg.reward.last_number_fallback,
            out_path=self.run_dir / "evals" / f"step_{step:06d}.jsonl" if self.is_main else None,
            decide_think_close=lambda texts, reasons: self.think_tags.require_close(texts, f"the eval at step {step}", reasons),
        )
        self.eval_history[step] = metrics
        return metrics

    def summary(self) -> dict[str, Any]:
        start = self.eval_history.get(0)
        end = self.eval_history.get(self.tc.steps)
        out: dict[str, Any] = {"run_name": self.cfg.run_name, "steps": self.global_step, "start": start, "end": end,
                               "model_path": self.start_model_path}
        if start and end:
            out["accuracy_change_points"] = 100 * (end["eval/accuracy"] - start["eval/accuracy"])
            out["token_change_percent"] = 100 * (end["eval/mean_tokens"] / start["eval/mean_tokens"] - 1)
        return out

    # ------------------------------------------------------------------ checkpoints
    def state_dict(self) -> dict[str, Any]:
        return {
            "global_step": self.global_step,
            "optimizer": self.strategy.optimizer_state(),  # None: sharded under deepspeed/
            "scheduler": self.scheduler.state_dict(),
            "sampler": self.sampler.state_dict(),
            "rng": rng_state(),
            "eval_history": self.eval_history,
            "checkpoint_tags": self.checkpointer.tags,
            "reward_state": copy.deepcopy(self.reward_state),
            "hooks": {hook.name: copy.deepcopy(hook.state_dict()) for hook in self.hooks},
            "seed": self.tc.seed,
            "think_tags": self.think_tags.state_dict(),  # reward.think_tags=auto may have switched
        }

    def load_state_dict(self, state: dict[str, Any], checkpoint: Path | None = None) -> None:
        self.global_step = int(state["global_step"])
        self.strategy.load_optimizer_state(state["optimizer"], checkpoint or Path("the checkpoint"))
        self.scheduler.load_state_dict(state["scheduler"])
        self.sampler.load_state_dict(state["sampler"])
        set_rng_state(state["rng"])
        self.eval_history = dict(state.get("eval_history", {}))
        self.checkpointer.tags = {k: list(v) for k, v in state.get("checkpoint_tags", {}).items()}
        reward_state = copy.deepcopy(state.get("reward_state", {}))
        hook_states = dict(state.get("hooks", {}))
        if "palu" in reward_state:  # checkpoints of rlspec before the rollout hooks kept PALU's budgets here
            hook_states.setdefault("palu", {"records": reward_state.pop("palu")})
        self.reward_state.clear()  # in place: reward batches hold a reference
        self.reward_state.update(reward_state)
        for hook in self.hooks:
            hook.load_state_dict(hook_states.get(hook.name, {}))
        self.think_tags.load_state_dict(state.get("think_tags", {}))

    def save(self, tag: str | None = None) -> Path:
        """Checkpoint the current step (a ``tag`` such as SIRI's ``siri-low`` protects it from rotation)."""
        parts = [("policy", self.model, self.strategy.optimizer_state())]
        if self.critic is not None:
            parts.append(("critic", self.critic.value_model, self.critic.strategy.optimizer_state()))
        check_finite_state(self.global_step, self.tc, parts)  # a non-finite checkpoint is refused
        return self.checkpointer.save(self.global_step, self.state_dict, tag)

    def maybe_resume(self) -> Path | None:
        """Apply ``trainer.resume``: ``auto`` (latest complete checkpoint if any), ``disable``, or a path."""
        found = self.checkpointer.resume(self.tc.resume, self.tc.seed)
        if found is None:
            if self.tc.resume == "auto" and self.is_main:  # a crash before the first checkpoint: the
                for log_file in ("metrics.jsonl", "completions.jsonl"):  # run restarts at step 0 and
                    truncate_jsonl(self.run_dir / log_file, -1)  # re-logs every row it left
            return None
        path, state = found
        self.load_state_dict(state, path)
        if self.is_main:
            for log_file in ("metrics.jsonl", "completions.jsonl"):
                truncate_jsonl(self.run_dir / log_file, self.global_step)
        self.strategy.barrier()
        self.engine.update_weights()
        return path
