"""The policy update: PPO epochs x mini-batches (one optimizer step each) x micro-batches (accumulated).

All maths is in :mod:`rlspec.trainers.losses` (PPO-clip with clip-higher and dual-clip, loss
aggregation, KL estimators, token log-probs); this module feeds it micro-batches
(:mod:`rlspec.trainers.batch`) and sums what it logs. The strategy
(:mod:`rlspec.trainers.strategy`) owns the optimizer and the module the forwards run through.
"""

from __future__ import annotations

from typing import Any

import torch

from rlspec.config import RLSpecConfig
from rlspec.data import derive_seed
from rlspec.errors import TrainingError
from rlspec.trainers.batch import TrainBatch, micro_batches, micro_tensors, mini_batch_members
from rlspec.trainers.losses import LossNormalizer, aggregate_loss, kl_penalty, ppo_clip_policy_loss, token_logprobs_and_entropy


class Actor:
    """Updates the policy on a :class:`~rlspec.trainers.batch.TrainBatch` (``ref_model`` for the KL term)."""

    def __init__(self, cfg: RLSpecConfig, strategy: Any, ref_model: torch.nn.Module | None, pad_id: int) -> None:
        self.tc, self.strategy, self.ref_model, self.pad_id = cfg.trainer, strategy, ref_model, pad_id
        self.temperature = cfg.rollout.temperature
        self.max_response_length = cfg.rollout.max_response_length

    def _micro_batches(self, batch: TrainBatch, members: list[int]) -> list[list[int]]:
        return micro_batches(batch, members, self.tc.micro_batch_size, self.tc.micro_batch_tokens)

    def tensors(self, batch: TrainBatch, idx: list[int]) -> dict[str, torch.Tensor]:
        """The padded tensors of the responses ``idx``, on the policy's device."""
        return micro_tensors(batch, idx, self.pad_id, next(self.strategy.policy.parameters()).device)

    def response_logprobs(self, model: torch.nn.Module, t: dict[str, torch.Tensor],
                          with_entropy: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
        """``[b, R]`` log-probs (and entropies) of the response tokens under ``model``."""
        r_len = int(t["r_len"])
        out = model(input_ids=t["input_ids"], attention_mask=t["attention_mask"], position_ids=t["position_ids"],
                    logits_to_keep=r_len + 1, use_cache=False)
        logits = out.logits[:, :-1]  # [b, R, V]: position P-1+j predicts response token j
        return token_logprobs_and_entropy(logits, t["response"], self.temperature, with_entropy)

    def recompute_old_logprobs(self, batch: TrainBatch) -> None:
        """``trainer.old_logprobs=recompute``: the policy's own log-probs instead of the engine's."""
        with torch.no_grad():
            for micro in self._micro_batches(batch, list(range(batch.size))):
                t = self.tensors(batch, micro)
                logprobs, _ = self.response_logprobs(self.strategy.policy, t, with_entropy=False)
                for row, i in enumerate(micro):
                    batch.old_logprobs[i] = logprobs[row, : len(batch.response_ids[i])].detach().cpu()

    def kl_to_reference(self, batch: TrainBatch) -> list[torch.Tensor]:
        """``[L_i]`` per response: the per-token KL estimate (``trainer.kl_estimator``) between the
        policy that sampled it (its old log-probs) and the reference, for ``trainer.kl_in_reward``."""
        if self.ref_model is None:
            raise TrainingError("trainer.kl_in_reward needs the reference model (the trainer builds one)")
        out: list[torch.Tensor] = [torch.zeros(0)] * batch.size
        with torch.no_grad():
            for micro in self._micro_batches(batch, list(range(batch.size))):
                t = self.tensors(batch, micro)
                ref_logprobs, _ = self.response_logprobs(self.ref_model, t, with_entropy=False)
                kl = kl_penalty(t["old_logprobs"], ref_logprobs, self.tc.kl_estimator).cpu()  # [b, R]
                for row, i in enumerate(micro):
                    out[i] = kl[row, : len(batch.response_ids[i])].clone()
        return out

    def update(self, batch: TrainBatch, step: int, lr: float) -> dict[str, float]:
        """PPO epochs x mini-batches (one optimizer step each) x micro-batches (accumulated)."""
        tc = self.tc
        mini_groups = tc.mini_batch_size or tc.prompts_per_step
        sums: dict[str, float] = {}
        token_total = 0.0
        ratio_max, ratio_min = 0.0, float("inf")
        grad_norms: list[float] = []
        shuffle = torch.Generator().manual_seed(derive_seed(tc.seed, step, 99))
        strategy = self.strategy
        train_module = strategy.train_module
        train_module.train()
        for members in mini_batch_members(batch, mini_groups, tc.ppo_epochs, shuffle):
            lengths = [len(batch.response_ids[i]) if batch.loss_masks is None else float(batch.loss_masks[i].sum())
                       for i in members]
            normalizer = LossNormalizer(
                num_tokens=float(max(sum(lengths), 1)),
                num_seqs=float(len(members)),
                max_response_length=float(self.max_response_length),
            )
            strategy.zero_grad()
            # this rank's micro-batches (all of them in one process); `counted=False` pads a
            # rank that is short of one so every rank runs the same forwards/backwards
            mine = strategy.deal(self._micro_batches(batch, members))
            for k, (micro, counted) in enumerate(mine):
                t = self.tensors(batch, micro)
                logprobs, entropy = self.response_logprobs(train_module, t, with_entropy=True)
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
                        ref_logprobs, _ = self.response_logprobs(self.ref_model, t, with_entropy=False)
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
                ratio_min = min(ratio_min, float(pg.ratio.masked_fill(mask == 0, float("inf")).min()))
                token_total += tok
            grad_norms.append(strategy.step(tc.grad_clip, step))
        train_module.eval()
        sums["_tokens"] = token_total
        sums = strategy.all_reduce_sum(sums)  # data parallel: every rank saw a share of the micro-batches
        token_total = sums.pop("_tokens")
        extremes = strategy.all_reduce_max({"max": ratio_max, "neg_min": -ratio_min})
        metrics = {k: v / max(token_total, 1.0) for k, v in sums.items()}
        metrics["actor/ratio_max"], metrics["actor/ratio_min"] = extremes["max"], -extremes["neg_min"]
        metrics["actor/pg_loss"] = sums.get("actor/pg_loss", 0.0) / max(token_total, 1.0)
        metrics["actor/pg_clipfrac"] = metrics.get("actor/pg_clipfrac_high", 0.0) + metrics.get("actor/pg_clipfrac_low", 0.0)
        metrics["actor/clipfrac_high"] = metrics.get("actor/pg_clipfrac_high", 0.0)  # the issue's / verl's names
        metrics["actor/clipfrac_low"] = metrics.get("actor/pg_clipfrac_low", 0.0)
        metrics["actor/grad_norm"] = sum(grad_norms) / len(grad_norms) if grad_norms else float("nan")
        metrics["actor/lr"] = lr
        metrics["actor/num_updates"] = float(len(grad_norms))
        return metrics
