"""EAGLE-style adaptive drafter for speculative rollouts (TLT, arXiv 2511.16665; EAGLE, arXiv 2401.15077).

The drafter of TLT's adaptive rollout engine is an EAGLE-1/2 feature-level drafter (TLT sec. "Adaptive
Drafter"; EAGLE sec. 3.1)::

    x_t   = fc(concat(embed(x_{t+1}), h_t))        fc: Linear(2H, H, bias=False)
    ĥ_t+1 = DecoderLayer(x_t)                      ONE layer of the target's own HF class, its
                                                   input_layernorm replaced by Identity, no final norm
    p     = softmax(lm_head(ĥ_t+1))                 predicts x_{t+2}

``embed_tokens`` and ``lm_head`` are the target's very modules (shared, never copied); only ``fc`` and
the layer are trained.

**EAGLE index convention** (training *and* drafting): drafter index ``t`` takes the pair
(token ``x_{t+1}``, target hidden state ``h_t``), where ``h_t`` is the target's last-layer
*post-final-norm* hidden state at position ``t`` -- the state ``lm_head`` turned into the
distribution that produced ``x_{t+1}`` (what ``NativeEngine.generate(..., return_hidden_states=True)``
returns). The output at ``t`` is the predicted feature ``ĥ_{t+1}`` and logits predicting ``x_{t+2}``.
Training regresses ``ĥ_{t+1}`` onto the target's ``h_{t+1}``: :func:`eagle_training_pairs` pairs
``ids[1:]`` with ``hidden[:-1]`` and regresses ``hidden[1:]``. (TLT's online trainer pairs token ``t``
with ``h_t``, an off-by-one against SGLang's draft-extend, EAGLE and TLT's own offline trainer; we use
the EAGLE convention everywhere.) The RoPE position of drafter index ``t`` is ``t`` (the position of
``h_t``); only relative positions matter.

Pieces:

* :class:`EagleDrafter` -- the module: a causal training :meth:`~EagleDrafter.forward` through the HF
  layer, and a cached inference path (:meth:`~EagleDrafter.begin` / :meth:`~EagleDrafter.step` /
  :meth:`~EagleDrafter.remove`) mirroring :class:`rlspec.rollout.native.LlamaFastBackend` (preallocated
  per-slot K/V cache of the one layer, parameters read in place, arbitrary bool masks and cache columns
  so a caller can draft a tree); :meth:`~EagleDrafter.save` / :meth:`~EagleDrafter.load`.
* :func:`drafter_loss` -- TLT's loss:
  ``1.0 * SmoothL1(ĥ, h) + 0.1 * CE(softmax(lm_head(h)), log_softmax(lm_head(ĥ)))``.
* :class:`DrafterBuffer` -- rollouts' ids + hidden states tagged by RL step (last 2 steps), sampled
  as short windows mixing the current step's finished responses with previous steps' long ones.
* :class:`DrafterTrainer` -- preemptible AdamW "spot trainer" on a private copy, publishing whole
  weight sets under the drafter's lock (a ``version`` counter tells readers when weights changed).
* :func:`warmup_drafter` and ``python -m rlspec.rollout.drafter`` -- offline warm-up on the model's own
  generations (TLT warms the drafter up offline before RL).
"""

from __future__ import annotations

import copy
import json
import math
import os
import shutil
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from rlspec.errors import ConfigError, DataError, ModelLoadError
from rlspec.rollout.native import FAST_ARCHITECTURES, linear

DRAFTER_CONFIG_NAME = "drafter_config.json"
DRAFTER_WEIGHTS_NAME = "model.safetensors"
DRAFTER_FORMAT = "rlspec-eagle-drafter"
DRAFTER_FORMAT_VERSION = 1
EAGLE_CONVENTION = (
    "drafter index t takes (token x_{t+1}, target hidden h_t) where h_t is the target's last-layer "
    "post-final-norm hidden state at position t (the state that predicted x_{t+1}); it outputs the "
    "predicted feature h_{t+1} and logits lm_head(h_{t+1}) predicting x_{t+2}; RoPE position of index t is t"
)


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


# ------------------------------------------------------------------------------------ drafter


def _check_target(target_model) -> None:
    arch = type(target_model).__name__
    if arch not in FAST_ARCHITECTURES:
        raise ConfigError(
            f"EagleDrafter supports targets of architecture {', '.join(FAST_ARCHITECTURES)}; got {arch}. "
            "Use one of those models (or disable the drafter)"
        )
    inner = getattr(target_model, "model", None)
    missing = [
        name
        for name, ok in (
            ("model.embed_tokens", inner is not None and hasattr(inner, "embed_tokens")),
            ("model.layers", inner is not None and hasattr(inner, "layers") and len(inner.layers) > 0),
            ("model.rotary_emb", inner is not None and hasattr(inner, "rotary_emb")),
            ("lm_head", hasattr(target_model, "lm_head")),
        )
        if not ok
    ]
    if missing:
        raise ConfigError(f"EagleDrafter: the {arch} target has no {', '.join(missing)}; pass an HF causal LM")


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


@dataclass(frozen=True)
class _TargetParts:
    """The target's modules the drafter uses (held outside ``nn.Module`` registration: never copied,
    never in the drafter's ``parameters()`` / ``state_dict()`` / ``.to()``)."""

    embed: nn.Module
    lm_head: nn.Module
    rotary: nn.Module
    architecture: str


class EagleDrafter(nn.Module):
    """EAGLE-1/2 drafter: ``fc(concat(embed(x_{t+1}), h_t))`` -> one target-class decoder layer -> ``lm_head``.

    TLT (arXiv 2511.16665) "Adaptive Drafter": reuses the target's embedding and LM head, frozen, and
    trains a single decoder layer (first layer's input norm removed, no final norm); see the module
    docstring for the EAGLE index convention.

    Build with :meth:`from_target` (fresh weights) or :meth:`load` (a saved directory). Trainable
    parameters are exactly ``fc`` and ``layer`` (``self.parameters()``); ``embed_tokens``, ``lm_head``
    and the rotary embedding are the target's own modules, used with ``detach()`` so the drafter never
    produces gradients for them. By default the target's ``requires_grad`` flags are left alone (the
    target may be trained by RL in the same process, with the same Parameter objects the rollout engine
    reads); ``freeze_shared=True`` also sets them to ``False`` (TLT code behaviour, where the drafter
    holds its own copy of the target -- do not use it on an RL-trained target).

    Thread safety: ``lock`` (an ``RLock``) guards the weights. :class:`DrafterTrainer` writes a new
    weight set only while holding it and then bumps ``version``; a reader that holds ``lock`` around
    a draft round never sees a half-updated drafter. ``version`` changes tell a reader the weights
    were republished (its K/V cache was computed with older weights: re-prefill or accept the drift --
    drafts are verified losslessly either way).
    """

    def __init__(
        self, layer_config: Any, target_model: nn.Module, *, dtype: torch.dtype | None = None, seed: int | None = 0
    ):
        super().__init__()
        _check_target(target_model)
        inner = target_model.model
        hidden_size = int(layer_config.hidden_size)
        if hidden_size != int(target_model.config.hidden_size):
            raise ConfigError(
                f"EagleDrafter: layer hidden_size {hidden_size} != target hidden_size {target_model.config.hidden_size}"
            )
        self._parts = _TargetParts(
            embed=inner.embed_tokens,
            lm_head=target_model.lm_head,
            rotary=inner.rotary_emb,
            architecture=type(target_model).__name__,
        )
        self.config = layer_config
        self.layer_class = type(inner.layers[0])
        self.fc = nn.Linear(2 * hidden_size, hidden_size, bias=False)
        self.layer = self.layer_class(layer_config, layer_idx=0)
        self.layer.input_layernorm = nn.Identity()  # TLT/EAGLE: the fc output enters the layer un-normalised
        self._init_weights(seed)
        weight = inner.embed_tokens.weight
        self.to(device=weight.device, dtype=dtype or weight.dtype)
        self.version = 0
        self.lock = threading.RLock()
        self._kv: tuple[torch.Tensor, torch.Tensor] | None = None
        self._hw = torch.zeros(0, dtype=torch.long)
        self.n = 0

    # -- construction -----------------------------------------------------------------------

    @classmethod
    def from_target(
        cls,
        target_model: nn.Module,
        *,
        dtype: torch.dtype | None = None,
        attn_implementation: str = "sdpa",
        freeze_shared: bool = False,
        seed: int | None = 0,
    ) -> "EagleDrafter":
        """A freshly initialised drafter for ``target_model`` (Qwen2 / Llama / Qwen3 / Mistral).

        The layer config is a copy of the target config with ``num_hidden_layers=1``, full attention
        (no sliding window) and untied embeddings; ``attn_implementation`` (``"sdpa"`` or ``"eager"``)
        is used by the training :meth:`forward` only (the cached :meth:`step` has its own exact
        float32 attention). ``dtype`` defaults to the target's; ``seed`` makes the init reproducible.
        """
        _check_target(target_model)
        if attn_implementation not in ("sdpa", "eager"):
            raise ConfigError(f"attn_implementation must be 'sdpa' or 'eager', got {attn_implementation!r}")
        cfg = copy.deepcopy(target_model.config)
        cfg.num_hidden_layers = 1
        if getattr(cfg, "layer_types", None) is not None:
            cfg.layer_types = ["full_attention"]
        if hasattr(cfg, "use_sliding_window"):
            cfg.use_sliding_window = False
        if hasattr(cfg, "sliding_window"):
            cfg.sliding_window = None
        cfg.tie_word_embeddings = False
        cfg.use_cache = False
        cfg._attn_implementation = attn_implementation
        drafter = cls(cfg, target_model, dtype=dtype, seed=seed)
        if freeze_shared:
            drafter.freeze_shared()
        return drafter

    def _init_weights(self, seed: int | None) -> None:
        std = float(getattr(self.config, "initializer_range", 0.02))
        gen = torch.Generator().manual_seed(seed) if seed is not None else None
        with torch.no_grad():
            for module in self.modules():
                if isinstance(module, nn.Linear):
                    module.weight.copy_(torch.randn(module.weight.shape, generator=gen) * std)
                    if module.bias is not None:
                        module.bias.zero_()

    def freeze_shared(self) -> None:
        """Set ``requires_grad=False`` on the shared target embedding / LM head (TLT code behaviour)."""
        for p in list(self.embed_tokens.parameters()) + list(self.lm_head.parameters()):
            p.requires_grad_(False)

    def clone(self, dtype: torch.dtype | None = None) -> "EagleDrafter":
        """A new drafter with a copy of this one's trainable weights, sharing the same target modules."""
        with self.lock:
            other = EagleDrafter.__new__(EagleDrafter)
            nn.Module.__init__(other)
            other._parts = self._parts
            other.config = copy.deepcopy(self.config)
            other.layer_class = self.layer_class
            other.fc = copy.deepcopy(self.fc)
            other.layer = copy.deepcopy(self.layer)
            other.version = self.version
            other.lock = threading.RLock()
            other._kv, other._hw, other.n = None, torch.zeros(0, dtype=torch.long), 0
            if dtype is not None:
                other.to(dtype=dtype)
            other.train(self.training)
        return other

    def __deepcopy__(self, memo: dict) -> "EagleDrafter":
        return self.clone()

    # -- shared target parts ----------------------------------------------------------------

    @property
    def embed_tokens(self) -> nn.Module:
        """The target's input embedding module (shared, not a submodule of the drafter)."""
        return self._parts.embed

    @property
    def lm_head(self) -> nn.Module:
        """The target's LM head module (shared, not a submodule of the drafter)."""
        return self._parts.lm_head

    @property
    def rotary_emb(self) -> nn.Module:
        """The target's rotary embedding module (gives ``(cos, sin)`` for positions)."""
        return self._parts.rotary

    @property
    def target_architecture(self) -> str:
        return self._parts.architecture

    @property
    def hidden_size(self) -> int:
        return int(self.config.hidden_size)

    @property
    def vocab_size(self) -> int:
        return int(self.embed_tokens.weight.shape[0])

    def trainable_parameters(self) -> list[nn.Parameter]:
        """``fc`` + the decoder layer (everything registered on the drafter)."""
        return list(self.parameters())

    # -- training forward -------------------------------------------------------------------

    def _input(self, input_ids: torch.Tensor, hidden: torch.Tensor) -> torch.Tensor:
        w = self.fc.weight
        emb = F.embedding(input_ids, self.embed_tokens.weight.detach())  # frozen: no grad into the target
        return self.fc(torch.cat([emb.to(w.dtype), hidden.to(device=w.device, dtype=w.dtype)], dim=-1))

    def logits(self, pred_hidden: torch.Tensor) -> torch.Tensor:
        """``lm_head(pred_hidden)`` with the target's (frozen, shared) LM head: ``[..., H] -> [..., V]``."""
        w = self.lm_head.weight.detach()
        b = getattr(self.lm_head, "bias", None)
        return F.linear(pred_hidden.to(w.dtype), w, None if b is None else b.detach())

    def forward(
        self,
        input_ids: torch.Tensor,
        hidden: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Causal training forward through the HF layer.

        Args:
            input_ids: ``[B, T]`` drafter tokens (index ``t`` holds ``x_{t+1}``).
            hidden: ``[B, T, H]`` target hidden states (index ``t`` holds ``h_t``).
            attention_mask: ``[B, T]`` (1/True = real token) for right-padded batches, or ``None``.
            position_ids: ``[B, T]`` RoPE positions (default ``arange(T)``).

        Returns:
            ``(pred_hidden [B, T, H], logits [B, T, V])``; ``pred_hidden[:, t]`` predicts ``h_{t+1}``.
        """
        bsz, t_len = input_ids.shape
        x = self._input(input_ids, hidden)  # [B, T, H]
        if position_ids is None:
            position_ids = torch.arange(t_len, device=x.device).expand(bsz, t_len)
        cos, sin = self.rotary_emb(x, position_ids)  # [B, T, D] each
        allowed = torch.ones(t_len, t_len, dtype=torch.bool, device=x.device).tril()[None]  # [1, T, T]
        if attention_mask is not None:
            allowed = allowed & attention_mask.to(device=x.device, dtype=torch.bool)[:, None, :]
        bias = torch.zeros(allowed.shape, dtype=x.dtype, device=x.device)
        bias.masked_fill_(~allowed, torch.finfo(x.dtype).min)  # [B, T, T] additive mask
        out = self.layer(
            x, attention_mask=bias.unsqueeze(1), position_ids=position_ids, position_embeddings=(cos, sin)
        )
        if isinstance(out, tuple):
            out = out[0]
        return out, self.logits(out)

    # -- cached inference path --------------------------------------------------------------

    def _geometry(self) -> tuple[int, int, int]:
        at = self.layer.self_attn
        hq = int(self.config.num_attention_heads)
        hkv = int(getattr(self.config, "num_key_value_heads", None) or hq)
        d = int(getattr(at, "head_dim", None) or self.hidden_size // hq)
        return hq, hkv, d

    def begin(self, num_slots: int, max_len: int) -> None:
        """Start drafting for at most ``num_slots`` rows of at most ``max_len`` cache columns.

        The K/V cache of the one layer (two zero-initialised ``[num_slots, n_kv_heads, max_len, head_dim]``
        tensors in the drafter's dtype) is kept between calls and reallocated only when a call needs more.
        """
        if num_slots < 1 or max_len < 1:
            raise ConfigError(f"drafter begin: num_slots and max_len must be >= 1, got {num_slots}, {max_len}")
        _, hkv, d = self._geometry()
        w = self.fc.weight
        have = self._kv[0] if self._kv is not None else None
        if (
            have is None
            or have.shape[0] < num_slots
            or have.shape[2] < max_len
            or have.dtype != w.dtype
            or have.device != w.device
        ):
            self._kv = None  # free before allocating
            shape = (num_slots, hkv, max_len, d)
            zeros = dict(dtype=w.dtype, device=w.device)  # zeros: stale NaNs would leak via 0*NaN
            self._kv = (torch.zeros(shape, **zeros), torch.zeros(shape, **zeros))
        self._hw = torch.zeros(self._kv[0].shape[0], dtype=torch.long, device=w.device)  # columns used per row
        self.n = 0

    @torch.no_grad()
    def step(
        self,
        input_ids: torch.Tensor,
        hidden: torch.Tensor,
        positions: torch.Tensor | None,
        attn_mask: torch.Tensor | None,
        kv_len: int,
        cache_cols: torch.Tensor | None = None,
        rows: slice | None = None,
    ) -> torch.Tensor:
        """Run the drafter on ``Q`` new (token, hidden) pairs for each of ``n`` cache rows.

        Same contract as :meth:`rlspec.rollout.native.LlamaFastBackend.forward` (one layer, no final
        norm). The layer's parameters are read in place through its HF submodules, so weight updates
        to the module are seen without any refresh.

        Args:
            input_ids: ``[n, Q]`` tokens ``x_{t+1}``.
            hidden: ``[n, Q, H]`` target hidden states ``h_t`` (or, for deeper draft steps, the
                drafter's own predicted features).
            positions: ``[n, Q]`` RoPE positions; also the cache columns the new keys go to unless
                ``cache_cols`` is given. Ignored when ``attn_mask`` is ``None``.
            attn_mask: ``None`` = causal self-attention among the new tokens only, written at columns
                ``0 .. Q-1`` with positions ``arange(Q)`` (prefill of empty rows). Otherwise a bool
                ``[n, 1, Q, kv_len]`` mask over cache columns ``0 .. kv_len-1`` (True = attend) that
                includes the new tokens' own columns.
            kv_len: number of cache columns attended to when ``attn_mask`` is given.
            cache_cols: optional ``[n, Q]`` cache columns when they differ from ``positions`` (a draft
                tree: siblings share a position, not a column).
            rows: the contiguous cache rows of the ``n`` sequences (default ``slice(0, n)``).

        Returns:
            predicted features ``[n, Q, H]`` (``logits(...)`` gives the next-token logits).
        """
        if self._kv is None:
            raise RuntimeError("EagleDrafter.step: call begin(num_slots, max_len) first")
        n, q_len = input_ids.shape
        rows = slice(0, n) if rows is None else rows
        if rows.stop - rows.start != n or rows.stop > self._kv[0].shape[0]:
            raise ValueError(f"EagleDrafter.step: rows {rows} do not match {n} sequences / the cache's slots")
        layer, at = self.layer, self.layer.self_attn
        hq, hkv, d = self._geometry()
        fc = self.fc
        emb = F.embedding(input_ids, self.embed_tokens.weight.detach()).to(fc.weight.dtype)
        x = linear(torch.cat([emb, hidden.to(device=emb.device, dtype=emb.dtype)], dim=-1), fc.weight, fc.bias)  # [n, Q, H]
        device = x.device
        if attn_mask is None:
            positions = torch.arange(q_len, device=device).expand(n, q_len)
            cols = positions
        else:
            cols = positions if cache_cols is None else cache_cols
        h = layer.input_layernorm(x)
        cos, sin = self.rotary_emb(h, positions)  # [n, Q, D]
        cos, sin = cos.unsqueeze(2), sin.unsqueeze(2)  # [n, Q, 1, D]
        q = linear(h, at.q_proj.weight, at.q_proj.bias).view(n, q_len, hq, d)
        k = linear(h, at.k_proj.weight, at.k_proj.bias).view(n, q_len, hkv, d)
        v = linear(h, at.v_proj.weight, at.v_proj.bias).view(n, q_len, hkv, d)
        if getattr(at, "q_norm", None) is not None:  # Qwen3: per-head RMSNorm before RoPE
            q = at.q_norm(q)
            k = at.k_norm(k)
        q = q * cos + _rotate_half(q) * sin
        k = k * cos + _rotate_half(k) * sin
        k_cache, v_cache = self._kv
        row_index = torch.arange(rows.start, rows.stop, device=device)[:, None]
        k_cache[row_index, :, cols] = k.to(k_cache.dtype)  # [n, Q, Hkv, D] at (row, column)
        v_cache[row_index, :, cols] = v.to(v_cache.dtype)
        if attn_mask is None:
            keys, values = k.transpose(1, 2), v.transpose(1, 2)  # [n, Hkv, Q, D]
            mask = torch.ones(q_len, q_len, dtype=torch.bool, device=device).tril().expand(n, 1, q_len, q_len)
        else:
            keys, values = k_cache[rows, :, :kv_len], v_cache[rows, :, :kv_len]
            mask = attn_mask
        o = _exact_attention(q.transpose(1, 2), keys, values, mask, float(at.scaling))  # [n, Q, Hq*D] fp32
        x = x + linear(o.to(x.dtype), at.o_proj.weight, at.o_proj.bias)
        mlp = layer.mlp  # the Llama-family gated MLP: down(act(gate(h)) * up(h))
        h = layer.post_attention_layernorm(x)
        x = x + linear(mlp.act_fn(linear(h, mlp.gate_proj.weight, mlp.gate_proj.bias))
                       * linear(h, mlp.up_proj.weight, mlp.up_proj.bias), mlp.down_proj.weight, mlp.down_proj.bias)
        used = cols.amax(dim=1) + 1
        self._hw[rows] = torch.maximum(self._hw[rows], used)
        self.n = max(self.n, rows.stop)
        return x

    def remove(self, rows: list[int]) -> list[int]:
        """Drop cache rows (swap-remove, as :meth:`LlamaFastBackend.remove`).

        The last surviving rows move into the holes. Returns ``order``: new row ``i`` is old row
        ``order[i]``.
        """
        n = self.n
        gone = set(int(r) for r in rows)
        bad = [r for r in gone if not 0 <= r < n]
        if bad:
            raise ValueError(f"EagleDrafter.remove: rows {sorted(bad)} are not active (0 .. {n - 1})")
        m = n - len(gone)
        holes = [r for r in sorted(gone) if r < m]
        movers = [r for r in range(m, n) if r not in gone]
        order = list(range(m))
        if holes:
            assert self._kv is not None
            src = torch.tensor(movers, device=self._hw.device)
            dst = torch.tensor(holes, device=self._hw.device)
            kv_len = int(self._hw[src].max())
            if kv_len > 0:
                for cache in self._kv:
                    cache[dst, :, :kv_len] = cache[src, :, :kv_len]
            for hole, mover in zip(holes, movers):
                order[hole] = mover
        if n:
            keep = self._hw[torch.tensor(order, dtype=torch.long, device=self._hw.device)]
            self._hw[:n] = 0
            self._hw[:m] = keep
        self.n = m
        return order

    def end(self) -> None:
        """Finish a drafting call (the cache memory is kept for the next :meth:`begin`)."""
        self.n = 0

    def free_cache(self) -> None:
        """Release the preallocated K/V cache."""
        self._kv = None

    # -- save / load ------------------------------------------------------------------------

    def save(self, directory: str | os.PathLike) -> Path:
        """Write ``drafter_config.json`` + ``model.safetensors`` (``fc`` and ``layer`` only) atomically.

        The files are written to a temporary sibling directory that then replaces ``directory``
        (``os.replace``); an existing ``directory`` is swapped out and removed afterwards.
        """
        from safetensors.torch import save_file

        target = Path(directory)
        target.parent.mkdir(parents=True, exist_ok=True)
        with self.lock:
            state = {k: v.detach().to("cpu").contiguous().clone() for k, v in self.state_dict().items()}
            version = self.version
            dtype = str(self.fc.weight.dtype).replace("torch.", "")
        meta = {
            "format": DRAFTER_FORMAT,
            "format_version": DRAFTER_FORMAT_VERSION,
            "kind": "eagle",
            "target_architecture": self.target_architecture,
            "model_type": getattr(self.config, "model_type", None),
            "hidden_size": self.hidden_size,
            "vocab_size": self.vocab_size,
            "dtype": dtype,
            "version": version,
            "eagle_convention": EAGLE_CONVENTION,
            "trainable": ["fc", "layer"],
            "shared_with_target": ["model.embed_tokens", "lm_head"],
            "layer_input_layernorm": "identity",
            "final_norm": None,
            "layer_config": json.loads(self.config.to_json_string(use_diff=False)),
            "attn_implementation": getattr(self.config, "_attn_implementation", None) or "sdpa",
        }
        tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
        try:
            save_file(state, str(tmp / DRAFTER_WEIGHTS_NAME), metadata={"format": "pt"})
            (tmp / DRAFTER_CONFIG_NAME).write_text(json.dumps(meta, indent=2, sort_keys=True) + "\n")
            old = None
            if target.exists():
                old = Path(tempfile.mkdtemp(prefix=f".{target.name}.old-", dir=target.parent))
                os.replace(target, old / "d")
            os.replace(tmp, target)
            if old is not None:
                shutil.rmtree(old, ignore_errors=True)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        return target

    @classmethod
    def load(
        cls, directory: str | os.PathLike, target_model: nn.Module, *, dtype: torch.dtype | None = None
    ) -> "EagleDrafter":
        """Load a drafter saved by :meth:`save` and re-attach ``target_model``'s embedding / LM head.

        Raises ModelLoadError when the directory is not a drafter or was trained for another target
        (architecture, hidden size or vocabulary size differ). ``dtype`` defaults to the target's.
        """
        from safetensors.torch import load_file

        path = Path(directory)
        cfg_path = path / DRAFTER_CONFIG_NAME
        if not cfg_path.is_file() or not (path / DRAFTER_WEIGHTS_NAME).is_file():
            raise ModelLoadError(
                f"{path} is not a drafter directory (needs {DRAFTER_CONFIG_NAME} and {DRAFTER_WEIGHTS_NAME}); "
                "write one with EagleDrafter.save or `python -m rlspec.rollout.drafter`"
            )
        meta = json.loads(cfg_path.read_text())
        if meta.get("format") != DRAFTER_FORMAT:
            raise ModelLoadError(f"{cfg_path}: format {meta.get('format')!r} is not {DRAFTER_FORMAT!r}")
        _check_target(target_model)
        arch = type(target_model).__name__
        problems = []
        if meta.get("target_architecture") != arch:
            problems.append(f"architecture {meta.get('target_architecture')} (target: {arch})")
        if int(meta.get("hidden_size", -1)) != int(target_model.config.hidden_size):
            problems.append(f"hidden size {meta.get('hidden_size')} (target: {target_model.config.hidden_size})")
        vocab = int(target_model.model.embed_tokens.weight.shape[0])
        if int(meta.get("vocab_size", -1)) != vocab:
            problems.append(f"vocabulary size {meta.get('vocab_size')} (target: {vocab})")
        if problems:
            raise ModelLoadError(
                f"the drafter in {path} was trained for another target: {'; '.join(problems)}. "
                "Use a drafter saved for this model, or warm up a new one (python -m rlspec.rollout.drafter)"
            )
        layer_config = type(target_model.config).from_dict(meta["layer_config"])
        layer_config._attn_implementation = meta.get("attn_implementation") or "sdpa"
        drafter = cls(layer_config, target_model, dtype=dtype, seed=None)
        state = load_file(str(path / DRAFTER_WEIGHTS_NAME))
        own = drafter.state_dict()
        missing = sorted(set(own) - set(state))
        extra = sorted(set(state) - set(own))
        wrong = sorted(k for k in set(own) & set(state) if own[k].shape != state[k].shape)
        if missing or extra or wrong:
            raise ModelLoadError(
                f"{path / DRAFTER_WEIGHTS_NAME} does not match the drafter layout (missing {missing[:3]}, "
                f"unexpected {extra[:3]}, wrong shape {wrong[:3]}); re-save it with this version of rlspec"
            )
        drafter.load_state_dict(state)
        drafter.version = int(meta.get("version", 0))
        return drafter


def _exact_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor, scale: float
) -> torch.Tensor:
    """softmax(q k^T * scale, masked) v in float32 with GQA (query head ``j*G+g`` uses KV head ``j``).

    q ``[n, Hq, Q, D]``, k/v ``[n, Hkv, K, D]``, mask bool ``[n, 1, Q, K]`` -> ``[n, Q, Hq*D]`` float32.
    """
    n, hq, q_len, d = q.shape
    hkv, kv = k.shape[1], k.shape[2]
    group = hq // hkv
    qf = q.float().reshape(n, hkv, group, q_len, d)
    kf = k.float().unsqueeze(2)  # [n, Hkv, 1, K, D]
    scores = torch.matmul(qf, kf.transpose(-1, -2)) * scale  # [n, Hkv, G, Q, K]
    scores = scores.masked_fill(~mask.view(n, 1, 1, q_len, kv), torch.finfo(torch.float32).min)
    probs = torch.softmax(scores, dim=-1)
    o = torch.matmul(probs, v.float().unsqueeze(2))  # [n, Hkv, G, Q, D]
    return o.reshape(n, hq, q_len, d).transpose(1, 2).reshape(n, q_len, hq * d)


# ------------------------------------------------------------------------------------- buffer


@dataclass
class DrafterSample:
    """One stored sequence. ``hidden[t]`` is ``h`` at absolute position ``start_pos + t``."""

    step: int
    input_ids: torch.Tensor  # [T] long
    hidden: torch.Tensor  # [T, H]
    loss_mask: torch.Tensor  # [T] bool: True where input_ids[t] is a response token
    start_pos: int
    first: int  # index of the first response token
    num_pairs: int  # trainable EAGLE pairs: loss_mask[1:].sum()


@dataclass
class DrafterBatch:
    """Right-padded windows ``[B, W]`` (before the EAGLE shift; see :func:`eagle_training_pairs`)."""

    input_ids: torch.Tensor  # [B, W] long (pad 0)
    hidden: torch.Tensor  # [B, W, H] (pad 0)
    loss_mask: torch.Tensor  # [B, W] bool: response tokens
    attention_mask: torch.Tensor  # [B, W] bool: real tokens
    position_ids: torch.Tensor  # [B, W] long: absolute positions
    steps: list[int]  # RL step of each window's sample
    num_current: int  # windows drawn from the newest step

    def to(self, device: torch.device | str) -> "DrafterBatch":
        return DrafterBatch(
            self.input_ids.to(device),
            self.hidden.to(device),
            self.loss_mask.to(device),
            self.attention_mask.to(device),
            self.position_ids.to(device),
            self.steps,
            self.num_current,
        )


class DrafterBuffer:
    """Rollouts' token ids + target hidden states, tagged by RL step (TLT DataBuffer).

    Keeps the samples of the newest ``keep_steps`` RL steps (TLT: the last 2) and at most
    ``max_samples`` (oldest dropped first; TLT: 10 000). :meth:`sample_windows` mixes the newest
    step's samples -- during rollout these are the already finished, shorter responses -- with the
    previous steps' samples, which include the long tail (TLT: "mixes partial responses of the current
    step with long sequences from the previous step to fix the long-tail data skew"): each window comes
    from the newest step with probability ``current_fraction`` when both pools are non-empty, and
    within a pool a sample is drawn with probability proportional to its number of trainable tokens.

    Thread-safe: ``add*`` and :meth:`sample_windows` may run in different threads.
    """

    def __init__(
        self,
        keep_steps: int = 2,
        max_samples: int = 10_000,
        current_fraction: float = 0.5,
        device: str | torch.device | None = None,
    ):
        if keep_steps < 1:
            raise ConfigError(f"drafter buffer keep_steps must be >= 1, got {keep_steps}")
        if max_samples < 1:
            raise ConfigError(f"drafter buffer max_samples must be >= 1, got {max_samples}")
        if not 0.0 <= current_fraction <= 1.0:
            raise ConfigError(f"drafter buffer current_fraction must be in [0, 1], got {current_fraction}")
        self.keep_steps = keep_steps
        self.max_samples = max_samples
        self.current_fraction = current_fraction
        self.device = device
        self._samples: list[DrafterSample] = []
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return len(self._samples)

    @property
    def steps(self) -> list[int]:
        """The RL steps present, ascending."""
        with self._lock:
            return sorted({s.step for s in self._samples})

    @property
    def num_pairs(self) -> int:
        """Trainable (response) drafter tokens stored."""
        with self._lock:
            return sum(s.num_pairs for s in self._samples)

    def add(
        self,
        step: int,
        input_ids: Sequence[int] | torch.Tensor,
        hidden: torch.Tensor,
        loss_mask: Sequence[bool] | torch.Tensor,
        start_pos: int = 0,
    ) -> bool:
        """Store one sequence: ``input_ids [T]``, ``hidden [T, H]`` (``hidden[t] = h`` at the position of
        ``input_ids[t]``), ``loss_mask [T]`` (True = response token). Returns False when the sample was
        not kept (no trainable pair, or older than the kept steps)."""
        ids = torch.as_tensor(input_ids, dtype=torch.long).detach().flatten()
        mask = torch.as_tensor(loss_mask, dtype=torch.bool).detach().flatten()
        if hidden.dim() != 2 or hidden.shape[0] != ids.shape[0] or mask.shape[0] != ids.shape[0]:
            raise DataError(
                f"drafter buffer: input_ids [T], hidden [T, H] and loss_mask [T] must agree, got "
                f"{tuple(ids.shape)}, {tuple(hidden.shape)}, {tuple(mask.shape)}"
            )
        hid = hidden.detach()
        if hid.is_inference():
            hid = hid.clone()
        if self.device is not None:
            hid = hid.to(self.device)
        ids, mask = ids.to(hid.device), mask.to(hid.device)
        num_pairs = int(mask[1:].sum()) if ids.shape[0] >= 2 else 0
        if num_pairs == 0:
            return False
        first = int(mask.nonzero()[0])
        sample = DrafterSample(int(step), ids, hid, mask, int(start_pos), first, num_pairs)
        with self._lock:
            oldest_kept = self._oldest_kept(sample.step)
            if sample.step < oldest_kept:
                return False
            self._samples = [s for s in self._samples if s.step >= oldest_kept]
            self._samples.append(sample)
            if len(self._samples) > self.max_samples:
                del self._samples[: len(self._samples) - self.max_samples]
        return True

    @property
    def nbytes(self) -> int:
        """Memory held by the stored samples (hidden states dominate)."""
        with self._lock:
            return sum(t.numel() * t.element_size() for s in self._samples
                       for t in (s.input_ids, s.hidden, s.loss_mask))

    def state_dict(self) -> dict[str, Any]:
        """The stored samples (CPU tensors), for a checkpoint: a resumed run trains the drafter on
        the same recent steps as the interrupted one would have."""
        with self._lock:
            samples = [{"step": s.step, "input_ids": s.input_ids.cpu(), "hidden": s.hidden.cpu(),
                        "loss_mask": s.loss_mask.cpu(), "start_pos": s.start_pos} for s in self._samples]
        return {"samples": samples}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Replace the contents with a :meth:`state_dict` (kept-steps and size limits apply)."""
        with self._lock:
            self._samples = []
        for s in state["samples"]:
            self.add(s["step"], s["input_ids"], s["hidden"], s["loss_mask"], s["start_pos"])

    def _oldest_kept(self, incoming: int) -> int:
        distinct = sorted({s.step for s in self._samples} | {incoming}, reverse=True)
        return distinct[min(self.keep_steps, len(distinct)) - 1]

    def add_response(
        self, step: int, prompt_ids: Sequence[int], response_ids: Sequence[int], response_hidden: torch.Tensor
    ) -> bool:
        """Store one rollout as returned by ``NativeEngine.generate(..., return_hidden_states=True)``.

        ``response_hidden[t]`` is the hidden state at the position before response token ``t``
        (``RolloutResultWithHidden``). The stored sequence is ``[prompt[-1]] + response[:-1]`` with those
        states (positions ``P-1 .. P+R-2``): the prompt's other hidden states are not returned by the
        engine, and the last response token has no following state to regress.
        """
        r = len(response_ids)
        if response_hidden.dim() != 2 or response_hidden.shape[0] != r:
            raise DataError(
                f"drafter buffer: response_hidden must be [len(response_ids)={r}, H], "
                f"got {tuple(response_hidden.shape)}"
            )
        if r < 2 or not prompt_ids:
            return False
        ids = [int(prompt_ids[-1])] + [int(t) for t in response_ids[:-1]]
        mask = [False] + [True] * (r - 1)
        return self.add(step, ids, response_hidden, mask, start_pos=len(prompt_ids) - 1)

    def add_rollout(self, step: int, result: Any) -> int:
        """Store every response of a ``RolloutResultWithHidden``; returns how many were kept."""
        hidden = getattr(result, "response_hidden_states", None)
        if hidden is None:
            raise DataError(
                "drafter buffer: the rollout has no hidden states; call generate(..., return_hidden_states=True)"
            )
        kept = 0
        for prompt, resp, h in zip(result.prompt_ids, result.response_ids, hidden):
            kept += bool(self.add_response(step, prompt, resp, h))
        return kept

    def sample_windows(
        self, batch_size: int, window: int = 512, generator: torch.Generator | None = None
    ) -> DrafterBatch | None:
        """Draw ``batch_size`` windows of at most ``window`` tokens; ``None`` when the buffer is empty.

        A window is ``[s, min(T, s + window))`` with ``s`` uniform in ``[max(0, first - 1), max(lo, T - window)]``
        (``first`` = the first response token): it starts at most one token before the response (that
        token carries ``h`` for the first response pair) and always contains response tokens. Windows
        are returned right-padded in a ``[B, W]`` batch (padding over packing: the training forward then
        needs only a causal + key-padding mask, and fixed-size windows waste little).
        """
        if batch_size < 1:
            raise ConfigError(f"drafter batch_size must be >= 1, got {batch_size}")
        if window < 2:
            raise ConfigError(f"drafter window must be >= 2 tokens, got {window}")
        with self._lock:
            samples = list(self._samples)
        if not samples:
            return None
        newest = max(s.step for s in samples)
        current = [s for s in samples if s.step == newest]
        previous = [s for s in samples if s.step != newest]
        chosen: list[tuple[DrafterSample, int, int]] = []
        num_current = 0
        for _ in range(batch_size):
            if current and previous:
                use_current = bool(torch.rand((), generator=generator) < self.current_fraction)
            else:
                use_current = bool(current)
            pool = current if use_current else previous
            num_current += use_current
            weights = torch.tensor([float(s.num_pairs) for s in pool])
            sample = pool[int(torch.multinomial(weights, 1, generator=generator))]
            t_len = sample.input_ids.shape[0]
            lo = max(0, sample.first - 1)
            hi = max(lo, t_len - window)
            start = lo + int(torch.randint(hi - lo + 1, (), generator=generator))
            chosen.append((sample, start, min(t_len, start + window)))
        width = max(e - s for _, s, e in chosen)
        hid0 = chosen[0][0].hidden
        bsz = len(chosen)
        ids = torch.zeros(bsz, width, dtype=torch.long, device=hid0.device)
        hid = torch.zeros(bsz, width, hid0.shape[1], dtype=hid0.dtype, device=hid0.device)
        lmask = torch.zeros(bsz, width, dtype=torch.bool, device=hid0.device)
        amask = torch.zeros(bsz, width, dtype=torch.bool, device=hid0.device)
        pos = torch.zeros(bsz, width, dtype=torch.long, device=hid0.device)
        for i, (sample, s, e) in enumerate(chosen):
            w = e - s
            ids[i, :w] = sample.input_ids[s:e]
            hid[i, :w] = sample.hidden[s:e].to(hid.device, hid.dtype)
            lmask[i, :w] = sample.loss_mask[s:e]
            amask[i, :w] = True
            pos[i] = sample.start_pos + s + torch.arange(width, device=hid0.device)
        return DrafterBatch(ids, hid, lmask, amask, pos, [c[0].step for c in chosen], num_current)


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
    :meth:`train`. The shared target embedding / LM head are read without a lock: do not update the
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
    ) -> dict[str, float | str]:
        """Train up to ``max_steps`` steps; preemptible between steps.

        Stops early when ``stop_event`` is set, when ``time.monotonic() >= deadline``, when the buffer
        is empty (never raises for that: 0 steps) or on a non-finite loss. The last weights are
        published before returning. Returns ``steps``, ``loss`` / ``vloss`` / ``ploss`` / ``top1`` (token-
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
            if self._dirty:
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


# ---------------------------------------------------------------------------------- warm-up


def warmup_drafter(
    target_model: nn.Module,
    tokenizer: Any,
    prompts: list[list[int]],
    steps: int,
    *,
    drafter: EagleDrafter | None = None,
    max_new_tokens: int = 256,
    temperature: float = 1.0,
    top_p: float = 1.0,
    rollout_batch_size: int = 64,
    batch_size: int = 4,
    window: int = 512,
    lr: float = 5e-5,
    warmup_steps: int = 0,
    eval_windows: int = 16,
    seed: int = 0,
    eos_token_ids: Sequence[int] | None = None,
    log_every: int = 50,
    log: Callable[[str], None] | None = print,
) -> tuple[EagleDrafter, dict[str, Any]]:
    """Offline warm-up (TLT): train a drafter on the target's own generations.

    Samples one response per prompt with ``NativeEngine.generate(..., return_hidden_states=True)``,
    stores them in a :class:`DrafterBuffer` (step 0) and runs ``steps`` :class:`DrafterTrainer` steps.
    Returns the (published) drafter and metrics: ``rollout_tokens``, ``samples``, ``train`` (the
    :meth:`DrafterTrainer.train` result) and ``eval_before`` / ``eval_after`` (loss metrics on the same
    ``eval_windows`` windows, drawn from the buffer with a fixed seed before training).
    """
    from rlspec.rollout import default_eos_token_ids
    from rlspec.rollout.base import SamplingParams
    from rlspec.rollout.native import NativeEngine

    say = log or (lambda _msg: None)
    if not prompts:
        raise DataError("warmup_drafter: no prompts given")
    if steps < 0 or rollout_batch_size < 1 or log_every < 1:
        raise ConfigError("warmup_drafter: steps must be >= 0, rollout_batch_size and log_every >= 1")
    if drafter is None:
        drafter = EagleDrafter.from_target(target_model, seed=seed)
    eos = list(eos_token_ids) if eos_token_ids is not None else default_eos_token_ids(target_model, tokenizer)
    engine = NativeEngine(target_model, eos, tokenizer=tokenizer, max_batch_size=rollout_batch_size)
    buffer = DrafterBuffer(keep_steps=1, max_samples=max(len(prompts), 1))
    rollout_tokens = 0
    start = time.monotonic()
    was_training = target_model.training
    target_model.eval()
    try:
        for i in range(0, len(prompts), rollout_batch_size):
            chunk = prompts[i : i + rollout_batch_size]
            params = SamplingParams(max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p, seed=seed + i)
            result = engine.generate(chunk, params, return_hidden_states=True)
            buffer.add_rollout(0, result)
            rollout_tokens += sum(len(r) for r in result.response_ids)
            say(
                f"drafter warm-up: generated {min(i + rollout_batch_size, len(prompts))}/{len(prompts)} prompts, "
                f"{rollout_tokens} tokens ({rollout_tokens / max(time.monotonic() - start, 1e-9):.0f} tok/s)"
            )
    finally:
        target_model.train(was_training)
    trainer = DrafterTrainer(drafter, lr=lr, warmup_steps=warmup_steps, batch_size=batch_size, window=window, seed=seed)
    eval_batch = buffer.sample_windows(eval_windows, window, torch.Generator().manual_seed(seed + 1))
    before = trainer.evaluate(eval_batch) if eval_batch is not None else {}
    if before:
        say(f"drafter warm-up: before training loss {before['loss']:.4f} top1 {before['top1']:.3f}")
    done, sums, tokens = 0, {"loss": 0.0, "vloss": 0.0, "ploss": 0.0, "top1": 0.0}, 0.0
    last: dict[str, Any] = {"steps": 0.0, "stopped": "max_steps"}
    while done < steps:
        last = trainer.train(buffer, min(log_every, steps - done))
        if last["steps"] == 0:
            break
        done += int(last["steps"])
        tokens += float(last["tokens"])
        for key in sums:
            sums[key] += float(last[key]) * float(last["tokens"])
        say(f"drafter warm-up: step {done}/{steps} loss {last['loss']:.4f} top1 {last['top1']:.3f}")
        if last["stopped"] != "max_steps":
            break
    after = trainer.evaluate(eval_batch) if eval_batch is not None else {}
    if after:
        say(f"drafter warm-up: after training loss {after['loss']:.4f} top1 {after['top1']:.3f}")
    train_metrics = {key: (value / tokens if tokens else float("nan")) for key, value in sums.items()}
    train_metrics.update(steps=float(done), tokens=tokens, version=float(drafter.version), stopped=last["stopped"])
    metrics = {
        "rollout_tokens": rollout_tokens,
        "samples": len(buffer),
        "train": train_metrics,
        "eval_before": before,
        "eval_after": after,
    }
    return drafter, metrics


_CLI_USAGE = (
    "python -m rlspec.rollout.drafter model=DIR out=DIR [steps=200] [num_prompts=64] [max_new_tokens=256] "
    "[batch_size=4] [window=512] [lr=5e-5] [temperature=1.0] [rollout_batch_size=64] [seed=0] "
    "[dtype=float32] [device=cpu] [data=PATH] [split=train] [threads=0]"
)


def main(argv: list[str] | None = None) -> None:
    """``python -m rlspec.rollout.drafter model=DIR out=DIR [steps=...] [num_prompts=...] [max_new_tokens=...]``.

    Warms a drafter up on the model's own responses to prompts from ``data`` (default: the model
    directory's ``train.jsonl``, as the embedded default ships it), each formatted with the tokenizer's
    chat template and the standard instruction, and saves it to ``out``.
    """
    from rlspec.errors import RLSpecError

    defaults = dict(
        steps="200", num_prompts="64", max_new_tokens="256", batch_size="4", window="512", lr="5e-5",
        temperature="1.0", rollout_batch_size="64", seed="0", dtype="float32", device="cpu", split="train",
        threads="0",
    )
    args: dict[str, str] = dict(defaults)
    try:
        for arg in sys.argv[1:] if argv is None else argv:
            key, sep, value = arg.partition("=")
            if not sep or key not in set(defaults) | {"model", "out", "data"}:
                raise ConfigError(f"unknown argument {arg!r}; usage: {_CLI_USAGE}")
            args[key] = value
        missing = [k for k in ("model", "out") if k not in args]
        if missing:
            raise ConfigError(f"missing {', '.join(m + '=DIR' for m in missing)}; usage: {_CLI_USAGE}")
        ints, floats = {}, {}
        int_keys = ("steps", "num_prompts", "max_new_tokens", "batch_size", "window", "rollout_batch_size", "seed")
        for key in int_keys + ("threads",):
            try:
                ints[key] = int(args[key])
            except ValueError:
                raise ConfigError(f"{key} must be an integer, got {args[key]!r}") from None
        for key in ("lr", "temperature"):
            try:
                floats[key] = float(args[key])
            except ValueError:
                raise ConfigError(f"{key} must be a number, got {args[key]!r}") from None
        if ints["num_prompts"] < 1:
            raise ConfigError(f"num_prompts must be >= 1, got {ints['num_prompts']}")
        if ints["threads"]:
            torch.set_num_threads(ints["threads"])
        from rlspec.config import DataConfig
        from rlspec.data import load_split
        from rlspec.models import DTYPES, eos_token_ids, load_causal_lm, load_tokenizer, resolve_model_path
        from rlspec.train import build_prompt_ids

        if args["dtype"] not in DTYPES:
            raise ConfigError(f"dtype must be one of {', '.join(DTYPES)}, got {args['dtype']!r}")
        model_path = resolve_model_path(args["model"])
        rows = load_split(args.get("data", model_path), args["split"])
        gen = torch.Generator().manual_seed(ints["seed"])
        pick = torch.randperm(len(rows), generator=gen)[: ints["num_prompts"]].tolist()
        tokenizer = load_tokenizer(model_path)
        model = load_causal_lm(model_path, args["dtype"]).to(args["device"]).eval()
        prompts = build_prompt_ids(tokenizer, [rows[i] for i in pick], DataConfig().instruction)
        print(f"drafter warm-up: {len(prompts)} prompts from {args.get('data', model_path)} ({args['split']})")
        drafter, metrics = warmup_drafter(
            model,
            tokenizer,
            prompts,
            ints["steps"],
            max_new_tokens=ints["max_new_tokens"],
            temperature=floats["temperature"],
            rollout_batch_size=ints["rollout_batch_size"],
            batch_size=ints["batch_size"],
            window=ints["window"],
            lr=floats["lr"],
            seed=ints["seed"],
            eos_token_ids=eos_token_ids(model, tokenizer),
        )
        out = drafter.save(args["out"])
    except (RLSpecError, ValueError) as err:
        print(f"rlspec: error: {err}", file=sys.stderr)
        sys.exit(2)
    after = metrics.get("eval_after") or {}
    summary = f"loss {after['loss']:.4f} top1 {after['top1']:.3f}" if after else "no evaluation windows"
    print(f"drafter written to {out} (version {drafter.version}, {summary})")


if __name__ == "__main__":
    main()
