"""PPO's critic: a value model, the GAE advantages it gives the policy, and its own update.

``trainer.adv_estimator=gae`` (verl's ``gae``; VAPO's options in ``trainer.gae``). Per step:

    values  = V(prefix before each response token)          [one no-grad forward over the batch]
    rewards = outcome score on the last token (- KL per token with trainer.kl_in_reward)
    advantages, returns = GAE(rewards, values)             [rlspec.trainers.gae, pure functions]
    critic update: PPO epochs x mini-batches of the clipped value loss on the returns

The maths is in :mod:`rlspec.trainers.gae` and :func:`rlspec.trainers.losses.clipped_value_loss`;
this module runs the forwards and the optimizer. The value model is a scalar head on a copy of a
causal LM's transformer backbone (the policy's start weights by default, ``critic.path``
otherwise); a strategy (:mod:`rlspec.trainers.strategy`, local or DeepSpeed) owns its optimizer
like the policy's. :class:`CriticCheckpoint` keeps it in every checkpoint (``critic/``).
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import torch

from rlspec.config import RLSpecConfig
from rlspec.data import derive_seed
from rlspec.errors import ModelLoadError, TrainingError
from rlspec.models import load_causal_lm
from rlspec.trainers.batch import TrainBatch, micro_batches, micro_tensors, mini_batch_members
from rlspec.trainers.gae import decoupled_gae, explained_variance, length_adaptive_lambda, masked_whiten, token_level_rewards
from rlspec.trainers.losses import LossNormalizer, aggregate_loss, clipped_value_loss

WEIGHTS = "value_model.safetensors"


class ValueModel(torch.nn.Module):
    """A scalar head on a causal LM's backbone: ``[b, L]`` token ids -> ``[b, L]`` values, the value
    at position ``i`` being the expected return after reading tokens ``0..i``."""

    def __init__(self, backbone: torch.nn.Module, config: Any) -> None:
        super().__init__()
        self.backbone, self.config = backbone, config
        hidden = int(config.hidden_size)
        self.value_head = torch.nn.Linear(hidden, 1)
        torch.nn.init.normal_(self.value_head.weight, std=1.0 / (hidden + 1))  # OpenRLHF/TRL's value head init
        torch.nn.init.zeros_(self.value_head.bias)

    @classmethod
    def from_causal_lm(cls, lm: torch.nn.Module) -> "ValueModel":
        """The backbone of ``lm`` (its ``base_model_prefix`` module, e.g. ``model`` of Llama/Qwen2)
        and a fresh head; the LM head is dropped."""
        backbone = getattr(lm, lm.base_model_prefix, None)
        if backbone is None or not hasattr(lm.config, "hidden_size"):
            raise ModelLoadError(f"cannot build a critic from {type(lm).__name__}: no transformer backbone "
                                 f"({lm.base_model_prefix!r}) or no config.hidden_size; set critic.path to a "
                                 f"Llama/Qwen2-style causal LM")
        model = cls(backbone, lm.config)
        return model.to(next(backbone.parameters()).device)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, position_ids: torch.Tensor) -> torch.Tensor:
        out = self.backbone(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                            use_cache=False)
        hidden = out.last_hidden_state  # [b, L, H]
        return self.value_head(hidden.to(self.value_head.weight.dtype)).squeeze(-1).float()  # [b, L]

    def save(self, directory: Path) -> None:
        """``config.json`` (the backbone's model config) and the weights, as safetensors."""
        from safetensors.torch import save_file

        directory.mkdir(parents=True, exist_ok=True)
        self.config.save_pretrained(directory)
        save_file({k: v.detach().contiguous().cpu() for k, v in self.state_dict().items()}, str(directory / WEIGHTS))

    def load_weights(self, directory: Path) -> None:
        from safetensors.torch import load_file

        file = directory / WEIGHTS
        if not file.is_file():
            raise TrainingError(f"{directory} has no {WEIGHTS}: it is not a critic written by rlspec")
        state = load_file(str(file), device=str(next(self.parameters()).device))
        self.load_state_dict(state)


def build_value_model(path: str | None, policy_path: str, dtype: str, trust_remote_code: bool,
                      device: torch.device) -> ValueModel:
    """``critic.path``: null = the policy's start weights (a fresh head), an rlspec ``critic/``
    dir (backbone and head), or any HF causal-LM dir / hub id (its backbone, a fresh head)."""
    if path is not None and (Path(path) / WEIGHTS).is_file():
        from transformers import AutoConfig, AutoModelForCausalLM

        config = AutoConfig.from_pretrained(path, trust_remote_code=trust_remote_code)
        value_model = ValueModel.from_causal_lm(AutoModelForCausalLM.from_config(config))
        value_model.load_weights(Path(path))
    else:
        value_model = ValueModel.from_causal_lm(load_causal_lm(path or policy_path, dtype, trust_remote_code))
    return value_model.to(device).eval()


def critic_trainer_config(cfg: RLSpecConfig) -> Any:
    """``trainer.*`` with the critic's optimizer settings: what a strategy for the critic is built from."""
    cc = cfg.critic
    return dataclasses.replace(cfg.trainer, lr=cc.lr, weight_decay=cc.weight_decay, grad_clip=cc.grad_clip)


def _pad(rows: list[torch.Tensor], idx: list[int], width: int) -> torch.Tensor:
    out = torch.zeros(len(idx), width)  # [b, R]
    for row, i in enumerate(idx):
        out[row, : rows[i].numel()] = rows[i]
    return out


class Critic:
    """Scores a :class:`TrainBatch` with GAE and trains the value model on it. ``strategy`` owns
    the value model (``strategy.policy``) and its optimizer."""

    def __init__(self, cfg: RLSpecConfig, strategy: Any, pad_id: int) -> None:
        self.cfg, self.tc, self.cc, self.gc = cfg, cfg.trainer, cfg.critic, cfg.trainer.gae
        self.strategy, self.pad_id = strategy, pad_id
        self.warmup_steps = cfg.critic.warmup_steps

    @property
    def value_model(self) -> ValueModel:
        return self.strategy.policy

    def _micro_batches(self, batch: TrainBatch, members: list[int]) -> list[list[int]]:
        return micro_batches(batch, members, self.tc.micro_batch_size, self.tc.micro_batch_tokens)

    def _tensors(self, batch: TrainBatch, idx: list[int]) -> dict[str, torch.Tensor]:
        return micro_tensors(batch, idx, self.pad_id, next(self.value_model.parameters()).device)

    @staticmethod
    def _response_values(module: torch.nn.Module, t: dict[str, torch.Tensor]) -> torch.Tensor:
        """``[b, R]``: the value of the prefix before each response token (position ``P - 1 + j``)."""
        r_len = int(t["r_len"])
        values = module(t["input_ids"], t["attention_mask"], t["position_ids"])  # [b, P+R]
        return values[:, -r_len - 1 : -1]

    def values(self, batch: TrainBatch) -> list[torch.Tensor]:
        """The critic's values of every response token, ``[L_i]`` per response (no grad)."""
        out: list[torch.Tensor] = [torch.zeros(0)] * batch.size
        with torch.no_grad():
            for micro in self._micro_batches(batch, list(range(batch.size))):
                v = self._response_values(self.value_model, self._tensors(batch, micro)).cpu()
                for row, i in enumerate(micro):
                    out[i] = v[row, : len(batch.response_ids[i])].clone()
        return out

    # ------------------------------------------------------------------ advantages
    def score(self, batch: TrainBatch, kl: list[torch.Tensor] | None = None) -> dict[str, float]:
        """Set ``batch``'s per-token advantages, returns and values from GAE over the critic's
        values (``kl``: the per-token KL of trainer.kl_in_reward). Returns metrics."""
        width = max(len(r) for r in batch.response_ids)
        idx = list(range(batch.size))
        lengths = torch.tensor([len(r) for r in batch.response_ids])  # [B]
        mask = (torch.arange(width)[None, :] < lengths[:, None]).float()  # [B, T]
        values_rows = self.values(batch)
        values = _pad(values_rows, idx, width)  # [B, T]
        kl_t = _pad(kl, idx, width) if kl is not None else None
        rewards = token_level_rewards(batch.rewards, mask, kl_t, self.tc.kl_reward_coef)  # [B, T]
        gc = self.gc
        actor_lam = length_adaptive_lambda(lengths, gc.adaptive_alpha) if gc.adaptive_alpha else gc.lam
        critic_lam = gc.critic_lam if gc.critic_lam is not None else gc.lam
        advantages, returns = decoupled_gae(rewards, values, mask, gamma=gc.gamma, actor_lam=actor_lam,
                                            critic_lam=critic_lam)
        if gc.whiten:
            advantages = masked_whiten(advantages, mask)
        batch.token_advantages = [advantages[i, : lengths[i]].clone() for i in idx]
        batch.advantages = (advantages * mask).sum(-1) / lengths.clamp(min=1)  # [B] per-response mean (logs)
        batch.returns = [returns[i, : lengths[i]].clone() for i in idx]
        batch.values = values_rows
        n = mask.sum()
        metrics = {
            "critic/values_mean": float((values * mask).sum() / n),
            "critic/returns_mean": float((returns * mask).sum() / n),
            "critic/explained_var": explained_variance(values, returns, mask),
        }
        if gc.adaptive_alpha:
            metrics["critic/actor_lam_mean"] = float(torch.as_tensor(actor_lam).float().mean())
        return metrics

    # ------------------------------------------------------------------ the critic's update
    def update(self, batch: TrainBatch, step: int) -> dict[str, float]:
        """Critic epochs x mini-batches (the policy's mini-batch size) x micro-batches of the
        clipped value loss (token-mean) on ``batch.returns``."""
        if batch.returns is None or batch.values is None:
            raise TrainingError("Critic.update needs a batch scored by Critic.score (returns and values)")
        tc, strategy = self.tc, self.strategy
        mini_groups = tc.mini_batch_size or tc.prompts_per_step
        shuffle = torch.Generator().manual_seed(derive_seed(tc.seed, step, 98))
        module = strategy.train_module
        module.train()
        sums = {"loss": 0.0, "clipfrac": 0.0, "vpred": 0.0, "tokens": 0.0}
        grad_norms: list[float] = []
        for members in mini_batch_members(batch, mini_groups, self.cc.ppo_epochs or tc.ppo_epochs, shuffle):
            normalizer = LossNormalizer(num_tokens=float(max(sum(len(batch.response_ids[i]) for i in members), 1)),
                                        num_seqs=float(len(members)), max_response_length=1.0)
            strategy.zero_grad()
            mine = strategy.deal(self._micro_batches(batch, members))
            for k, (micro, counted) in enumerate(mine):
                t = self._tensors(batch, micro)
                vpred = self._response_values(module, t)  # [b, R]
                r_len, device = vpred.shape[1], vpred.device
                out = clipped_value_loss(vpred, _pad(batch.values, micro, r_len).to(device),
                                         _pad(batch.returns, micro, r_len).to(device), self.cc.cliprange_value)
                mask = t["mask"]
                loss = aggregate_loss(out.loss_mat, mask, "token-mean", normalizer)
                if not torch.isfinite(loss):
                    raise TrainingError(f"non-finite critic loss ({loss.item()}) at step {step}; lower critic.lr "
                                        f"or check the reward values")
                strategy.backward(loss * (strategy.loss_scale if counted else 0.0), last=k == len(mine) - 1)
                if counted:
                    sums["loss"] += float(loss.detach()) * normalizer.num_tokens
                    sums["clipfrac"] += float((out.clipped.float() * mask).sum())
                    sums["vpred"] += float((vpred.detach() * mask).sum())
                    sums["tokens"] += float(mask.sum())
            grad_norms.append(strategy.step(self.cc.grad_clip, step))
        module.eval()
        strategy.sync_policy()
        sums = strategy.all_reduce_sum(sums)
        tokens = max(sums.pop("tokens"), 1.0)
        return {
            "critic/vf_loss": sums["loss"] / tokens,
            "critic/vf_clipfrac": sums["clipfrac"] / tokens,
            "critic/vpred_mean": sums["vpred"] / tokens,
            "critic/grad_norm": sum(grad_norms) / max(len(grad_norms), 1),
            "critic/lr": self.cc.lr,
            "critic/num_updates": float(len(grad_norms)),
        }


class CriticCheckpoint:
    """Keeps the critic in every checkpoint: ``critic/`` (config, weights, optimizer state), or
    under DeepSpeed its sharded optimizer in ``critic_deepspeed/`` (written by every rank)."""

    sharded_dir = "critic_deepspeed"

    def __init__(self, critic: Critic) -> None:
        self.critic = critic

    @property
    def strategy(self) -> Any:
        return self.critic.strategy

    def save(self, checkpoint: Path) -> None:
        directory = checkpoint / "critic"
        self.critic.value_model.save(directory)
        state = self.strategy.optimizer_state()
        if state is not None:
            torch.save(state, directory / "optimizer.pt")

    def load(self, checkpoint: Path) -> None:
        directory = checkpoint / "critic"
        if not (directory / WEIGHTS).is_file():
            raise TrainingError(f"{checkpoint} has no critic/{WEIGHTS}: it was written by a run without "
                                f"trainer.adv_estimator=gae; resume it with that run's config, or start a new run")
        self.critic.value_model.load_weights(directory)
        if self.strategy.name == "deepspeed":
            self.strategy.load_sharded(checkpoint, self.sharded_dir)
            return
        optimizer = directory / "optimizer.pt"
        self.strategy.load_optimizer_state(torch.load(optimizer, map_location="cpu", weights_only=False)
                                           if optimizer.is_file() else None, checkpoint)
