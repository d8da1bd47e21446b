"""Training the EAGLE drafter: the EAGLE shift, TLT's loss and the preemptible trainer.

* :func:`eagle_training_pairs` -- the EAGLE shift (arXiv 2401.15077 sec. 3.1): drafter index ``t``
  sees ``(x_{t+1}, h_t)`` and regresses ``h_{t+1}``;
* :func:`drafter_loss` -- TLT's loss:
  ``1.0 * SmoothL1(ĥ, h) + 0.1 * CE(softmax(lm_head(h)), log_softmax(lm_head(ĥ)))``;
* :class:`DrafterTrainer` -- preemptible AdamW "spot trainer" on a private copy, publishing whole
  weight sets under the drafter's lock (a ``version`` counter tells readers when weights changed).

The windows it trains on come from :class:`~rlspec.rollout.speculative.drafter_buffer.DrafterBuffer`.
"""

from __future__ import annotations

import copy
import math
import threading
import time
from typing import Any, Mapping

import torch
import torch.nn.functional as F

from rlspec.errors import ConfigError
from rlspec.rollout.speculative.drafter_buffer import DrafterBatch, DrafterBuffer
from rlspec.rollout.speculative.eagle import EagleDrafter

# ------------------------------------------------------------------------------ pure functions


def eagle_training_pairs(
    input_ids: torch.Tensor, hidden: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """EAGLE shift (arXiv 2401.15077 sec. 3.1): drafter inputs ``(x_{t+1}, h_t)`` and targets ``h_{t+1}``.

    Args:
        input_ids: ``[T]`` (or ``[B, T]``) token ids ``x_0 .. x_{T-1}``.
        hidden: ``[T, H]`` (or ``[B, T, H]``) target hidden states, ``hidden[t] = h_t`` (post-final-norm,
            the state whose logits produced ``x_{t+1}``).

    Returns:
        ``(drafter_ids [T-1], drafter_hidden [T-1, H], target_hidden [T-1, H])`` =
        ``(ids[1:], hidden[:-1], hidden[1:])``: drafter index ``t`` sees ``(x_{t+1}, h_t)`` and regresses
        ``h_{t+1}`` (whose ``lm_head`` logits predict ``x_{t+2}``).

    >>> ids = torch.tensor([10, 11, 12, 13])
    >>> hid = torch.arange(4.0).view(4, 1)  # h0..h3
    >>> d_ids, d_hid, tgt = eagle_training_pairs(ids, hid)
    >>> d_ids.tolist(), d_hid.flatten().tolist(), tgt.flatten().tolist()
    ([11, 12, 13], [0.0, 1.0, 2.0], [1.0, 2.0, 3.0])
    """
    if input_ids.dim() < 1 or hidden.dim() != input_ids.dim() + 1 or hidden.shape[:-1] != input_ids.shape:
        raise ValueError(
            f"eagle_training_pairs: hidden must be input_ids' shape plus a hidden axis, got ids "
            f"{tuple(input_ids.shape)} and hidden {tuple(hidden.shape)}"
        )
    return input_ids[..., 1:], hidden[..., :-1, :], hidden[..., 1:, :]


def drafter_loss(
    pred_hidden: torch.Tensor,
    target_hidden: torch.Tensor,
    pred_logits: torch.Tensor,
    target_logits: torch.Tensor,
    mask: torch.Tensor,
    value_weight: float = 1.0,
    prob_weight: float = 0.1,
) -> tuple[torch.Tensor, dict[str, float]]:
    """EAGLE/TLT drafter loss (arXiv 2401.15077 sec. 3.2; TLT code: vloss 1.0, ploss 0.1).

    ``loss = value_weight * L_reg + prob_weight * L_cls`` with, over the valid tokens ``i``
    (``mask[i]`` True, ``N`` of them),

    * ``L_reg = 1/N sum_i mean_d SmoothL1_beta=1(ĥ_{i,d}, h_{i,d})`` (feature regression),
    * ``L_cls = -1/N sum_i sum_v softmax(target_logits_i)_v * log_softmax(pred_logits_i)_v``
      (soft cross-entropy against the target's next-token distribution).

    Metrics (floats): ``loss``, ``vloss``, ``ploss``, ``top1`` (fraction of valid tokens where
    ``argmax pred_logits == argmax target_logits``) and ``tokens`` (``N``). With no valid token every
    term is 0.

    Args:
        pred_hidden / target_hidden: ``[..., H]``.
        pred_logits / target_logits: ``[..., V]`` (``target_logits`` is treated as a constant).
        mask: ``[...]`` bool (True = counted).

    >>> z = torch.zeros(1, 2, 1)
    >>> loss, m = drafter_loss(z, z + 2.0, torch.zeros(1, 2, 2), torch.zeros(1, 2, 2), torch.tensor([[True, False]]))
    >>> round(m["vloss"], 4), round(m["ploss"], 4), round(loss.item(), 4)  # 2-0.5, ln 2, 1.5+0.1 ln 2
    (1.5, 0.6931, 1.5693)
    """
    if pred_hidden.shape != target_hidden.shape:
        raise ValueError(
            f"drafter_loss: hidden shapes differ {tuple(pred_hidden.shape)} vs {tuple(target_hidden.shape)}"
        )
    if pred_logits.shape != target_logits.shape:
        raise ValueError(
            f"drafter_loss: logits shapes differ {tuple(pred_logits.shape)} vs {tuple(target_logits.shape)}"
        )
    if mask.shape != pred_hidden.shape[:-1] or mask.shape != pred_logits.shape[:-1]:
        raise ValueError(
            f"drafter_loss: mask {tuple(mask.shape)} must be the hidden/logits shape without the last axis"
        )
    m = mask.to(torch.float32)
    count = m.sum()
    denom = count.clamp_min(1.0)
    vl = F.smooth_l1_loss(pred_hidden.float(), target_hidden.float(), reduction="none").mean(-1)  # [...]
    vloss = (vl * m).sum() / denom
    target_p = torch.softmax(target_logits.detach().float(), dim=-1)
    logp = torch.log_softmax(pred_logits.float(), dim=-1)
    pl = -(target_p * logp).sum(-1)  # [...]
    ploss = (pl * m).sum() / denom
    loss = value_weight * vloss + prob_weight * ploss
    with torch.no_grad():
        agree = (pred_logits.argmax(-1) == target_logits.argmax(-1)).to(torch.float32)
        top1 = (agree * m).sum() / denom
        host = torch.stack([loss.detach(), vloss.detach(), ploss.detach(), top1, count]).tolist()
    metrics = {"loss": host[0], "vloss": host[1], "ploss": host[2], "top1": host[3], "tokens": host[4]}
    return loss, metrics


# ------------------------------------------------------------------------------------ trainer


def batch_loss(
    drafter: EagleDrafter, batch: DrafterBatch, value_weight: float = 1.0, prob_weight: float = 0.1
) -> tuple[torch.Tensor, dict[str, float]]:
    """Drafter loss on a :class:`DrafterBatch`: EAGLE shift, drafter forward, targets from the buffer.

    Target logits are ``lm_head(h_{t+1})`` from the shared LM head (no target forward); the loss
    counts drafter index ``t`` when its input token ``x_{t+1}`` is a response token.
    """
    batch = batch.to(drafter.fc.weight.device)
    d_ids, d_hid, tgt = eagle_training_pairs(batch.input_ids, batch.hidden)
    attn = batch.attention_mask[:, 1:]
    mask = batch.loss_mask[:, 1:] & attn
    pred, logits = drafter(d_ids, d_hid, attn, batch.position_ids[:, :-1])
    with torch.no_grad():
        tgt_logits = drafter.logits(tgt)
    return drafter_loss(pred, tgt, logits, tgt_logits, mask, value_weight, prob_weight)


class DrafterTrainer:
    """Preemptible spot trainer for an :class:`EagleDrafter` (TLT "Spot Trainer"; loss = :func:`drafter_loss`).

    AdamW (betas 0.9/0.95, weight decay 0.01), grad-norm clip 1.0, optional linear lr warm-up --
    TLT's online-trainer settings (TLT's code uses lr 1e-6 online with 1000 warm-up steps and 5e-5
    offline; the default here is 5e-5).

    Thread safety: the optimizer trains a **private copy** (``self.shadow``, float32 master weights by
    default); the engine-facing ``self.drafter`` is only written by :meth:`publish`, which copies the
    whole weight set while holding ``drafter.lock`` and then increments ``drafter.version``. So
    :meth:`train` may run in a background thread while the main thread drafts with ``self.drafter``:
    a reader holding ``drafter.lock`` (e.g. around each draft round) sees either the old or the new
    weights, never a mix. During training, publishing is attempted without blocking after every
    ``publish_every`` steps (skipped while a reader holds the lock) and done blocking at the end of
    :meth:`train` (unless ``publish_at_end=False``: the caller publishes). The shared target embedding / LM head are read without a lock: do not update the
    target while the trainer runs (TLT trains only during the rollout's long tail).
    Weights loaded into ``self.drafter`` from outside must be followed by :meth:`sync_from_drafter`.
    """

    def __init__(
        self,
        drafter: EagleDrafter,
        *,
        lr: float = 5e-5,
        betas: tuple[float, float] = (0.9, 0.95),
        weight_decay: float = 0.01,
        grad_clip: float = 1.0,
        warmup_steps: int = 0,
        batch_size: int = 4,
        window: int = 512,
        value_weight: float = 1.0,
        prob_weight: float = 0.1,
        publish_every: int = 1,
        train_dtype: torch.dtype | None = torch.float32,
        seed: int = 0,
    ) -> None:
        if lr <= 0:
            raise ConfigError(f"drafter lr must be > 0, got {lr}")
        if grad_clip <= 0:
            raise ConfigError(f"drafter grad_clip must be > 0, got {grad_clip}")
        if warmup_steps < 0 or publish_every < 0:
            raise ConfigError("drafter warmup_steps and publish_every must be >= 0")
        if batch_size < 1 or window < 2:
            raise ConfigError(f"drafter batch_size must be >= 1 and window >= 2, got {batch_size}, {window}")
        self.drafter = drafter
        self.shadow = drafter.clone(dtype=train_dtype)
        self.shadow.train()
        self.lr, self.warmup_steps = lr, warmup_steps
        self.optimizer = torch.optim.AdamW(self.shadow.parameters(), lr=lr, betas=betas, weight_decay=weight_decay)
        self.grad_clip = grad_clip
        self.batch_size, self.window = batch_size, window
        self.value_weight, self.prob_weight = value_weight, prob_weight
        self.publish_every = publish_every
        self.generator = torch.Generator().manual_seed(seed)
        self.total_steps = 0
        self._dirty = False
        self._train_lock = threading.Lock()

    @property
    def unpublished(self) -> bool:
        """Whether the private copy has trained since the last :meth:`publish`."""
        return self._dirty

    @property
    def version(self) -> int:
        """Version of the published drafter (incremented by every :meth:`publish`)."""
        return self.drafter.version

    def state_dict(self) -> dict[str, Any]:
        """Optimizer moments, step count (LR warm-up) and sampling RNG, for a checkpoint; the
        weights are the published drafter's (saved with it)."""
        with self._train_lock:
            return {"optimizer": copy.deepcopy(self.optimizer.state_dict()), "total_steps": self.total_steps,
                    "generator": self.generator.get_state()}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore a :meth:`state_dict` (call :meth:`sync_from_drafter` first when the drafter's
        weights were restored too)."""
        with self._train_lock:
            self.optimizer.load_state_dict(state["optimizer"])
            self.total_steps = int(state["total_steps"])
            self.generator.set_state(state["generator"])

    def sync_from_drafter(self) -> None:
        """Copy the published drafter's weights into the private copy (after loading new weights)."""
        with self._train_lock, self.drafter.lock, torch.no_grad():
            own = dict(self.shadow.named_parameters())
            for name, p in self.drafter.named_parameters():
                own[name].copy_(p)

    def publish(self, blocking: bool = True) -> bool:
        """Copy the private weights into ``self.drafter`` under its lock and bump ``version``.

        Returns False (nothing written) when ``blocking=False`` and a reader holds the lock.
        """
        if not self.drafter.lock.acquire(blocking=blocking):
            return False
        try:
            with torch.no_grad():
                src = dict(self.shadow.named_parameters())
                for name, p in self.drafter.named_parameters():
                    p.copy_(src[name])
            self.drafter.version += 1
            self._dirty = False
        finally:
            self.drafter.lock.release()
        return True

    def _lr_at(self, step: int) -> float:
        if self.warmup_steps and step < self.warmup_steps:
            return self.lr * (step + 1) / self.warmup_steps
        return self.lr

    def train_step(self, batch: DrafterBatch) -> dict[str, float]:
        """One optimizer step on ``batch`` (private copy only); a non-finite loss skips the update."""
        for group in self.optimizer.param_groups:
            group["lr"] = self._lr_at(self.total_steps)
        self.optimizer.zero_grad(set_to_none=True)
        loss, metrics = batch_loss(self.shadow, batch, self.value_weight, self.prob_weight)
        if not math.isfinite(metrics["loss"]):
            metrics["skipped"] = 1.0
            return metrics
        loss.backward()
        metrics["grad_norm"] = float(torch.nn.utils.clip_grad_norm_(self.shadow.parameters(), self.grad_clip))
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.total_steps += 1
        self._dirty = True
        return metrics

    def train(
        self,
        buffer: DrafterBuffer,
        max_steps: int,
        stop_event: threading.Event | None = None,
        deadline: float | None = None,
        publish_at_end: bool = True,
    ) -> dict[str, float | str]:
        """Train up to ``max_steps`` steps; preemptible between steps.

        Stops early when ``stop_event`` is set, when ``time.monotonic() >= deadline``, when the buffer
        is empty (never raises for that: 0 steps) or on a non-finite loss. The last weights are
        published before returning unless ``publish_at_end=False`` (the spot trainer publishes at the
        rollout's end, not when training stops: :attr:`unpublished` then tells whether there is
        anything to publish). Returns ``steps``, ``loss`` / ``vloss`` / ``ploss`` / ``top1`` (token-
        weighted means over the steps run; NaN with 0 steps), ``tokens``, ``seconds``, ``version``,
        ``total_steps`` and ``stopped`` (``max_steps`` / ``stop_event`` / ``deadline`` / ``empty`` /
        ``nonfinite``).
        """
        start = time.monotonic()
        steps, tokens = 0, 0.0
        sums = {"loss": 0.0, "vloss": 0.0, "ploss": 0.0, "top1": 0.0}
        stopped = "max_steps"
        with self._train_lock:
            self.shadow.train()
            while steps < max_steps:
                if stop_event is not None and stop_event.is_set():
                    stopped = "stop_event"
                    break
                if deadline is not None and time.monotonic() >= deadline:
                    stopped = "deadline"
                    break
                batch = buffer.sample_windows(self.batch_size, self.window, self.generator)
                if batch is None:
                    stopped = "empty"
                    break
                metrics = self.train_step(batch)
                if metrics.get("skipped"):
                    stopped = "nonfinite"
                    break
                steps += 1
                tokens += metrics["tokens"]
                for key in sums:
                    sums[key] += metrics[key] * metrics["tokens"]
                if self.publish_every and self.total_steps % self.publish_every == 0:
                    self.publish(blocking=False)
            if publish_at_end and self._dirty:
                self.publish(blocking=True)
        out: dict[str, float | str] = {key: (value / tokens if tokens else float("nan")) for key, value in sums.items()}
        out.update(
            steps=float(steps),
            tokens=tokens,
            seconds=time.monotonic() - start,
            version=float(self.version),
            total_steps=float(self.total_steps),
            stopped=stopped,
        )
        return out

    @torch.no_grad()
    def evaluate(self, batch: DrafterBatch) -> dict[str, float]:
        """Loss metrics of the published drafter on ``batch`` (no update)."""
        with self.drafter.lock:
            was = self.drafter.training
            self.drafter.eval()
            try:
                return batch_loss(self.drafter, batch, self.value_weight, self.prob_weight)[1]
            finally:
                self.drafter.train(was)
