"""EAGLE-style drafter model for speculative rollouts (TLT, arXiv 2511.16665; EAGLE, arXiv 2401.15077).

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
Training regresses ``ĥ_{t+1}`` onto the target's ``h_{t+1}``
(:func:`rlspec.rollout.speculative.drafter_training.eagle_training_pairs`). (TLT's online trainer
pairs token ``t`` with ``h_t``, an off-by-one against SGLang's draft-extend, EAGLE and TLT's own
offline trainer; we use the EAGLE convention everywhere.) The RoPE position of drafter index ``t``
is ``t`` (the position of ``h_t``); only relative positions matter.

:class:`EagleDrafter` has a causal training :meth:`~EagleDrafter.forward` through the HF layer, and
a cached inference path (:meth:`~EagleDrafter.begin` / :meth:`~EagleDrafter.step` /
:meth:`~EagleDrafter.remove`) mirroring :class:`rlspec.rollout.fast_backend.LlamaFastBackend`
(preallocated per-slot K/V cache of the one layer, parameters read in place, arbitrary bool masks
and cache columns so a caller can draft a tree); :meth:`~EagleDrafter.save` /
:meth:`~EagleDrafter.load`. Its buffer and trainer are in
:mod:`rlspec.rollout.speculative.drafter_buffer` and :mod:`~rlspec.rollout.speculative.drafter_training`.
"""

from __future__ import annotations

import copy
import json
import os
import shutil
import tempfile
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F

from rlspec.errors import ConfigError, ModelLoadError
from rlspec.rollout.fast_backend import FAST_ARCHITECTURES, linear

DRAFTER_CONFIG_NAME = "drafter_config.json"
DRAFTER_WEIGHTS_NAME = "model.safetensors"
DRAFTER_FORMAT = "rlspec-eagle-drafter"
DRAFTER_FORMAT_VERSION = 1
EAGLE_CONVENTION = (
    "drafter index t takes (token x_{t+1}, target hidden h_t) where h_t is the target's last-layer "
    "post-final-norm hidden state at position t (the state that predicted x_{t+1}); it outputs the "
    "predicted feature h_{t+1} and logits lm_head(h_{t+1}) predicting x_{t+2}; RoPE position of index t is t"
)


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

        Same contract as :meth:`rlspec.rollout.fast_backend.LlamaFastBackend.forward` (one layer, no final
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
                "write one with EagleDrafter.save or `python -m rlspec.warmup_drafter`"
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
                "Use a drafter saved for this model, or warm up a new one (python -m rlspec.warmup_drafter)"
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
