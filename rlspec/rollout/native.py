"""The native torch rollout engine: batched sampling with a KV cache and continuous batching.

:class:`NativeEngine` is split in two halves:

* the **scheduler** (:meth:`NativeEngine.generate`) keeps a queue of waiting prompts and a batch
  of active rows; it admits waiting prompts into free slots (continuous batching), samples one
  token per active row per decode step (:mod:`rlspec.rollout.sampling`), checks EOS / stop
  strings / ``max_new_tokens`` and removes finished rows, so compute shrinks as the batch drains;
* a **backend** owns the model forward and the KV cache of the active rows ``0 .. n-1``:

  - :class:`LlamaFastBackend` (Llama, Qwen2, Qwen3, Mistral): its own forward that reads the HF
    module's parameters in place, a preallocated per-slot KV cache (no per-step concatenation),
    RoPE from the config, GQA, attention with per-row lengths (SDPA for prefill; for decode a
    matmul-softmax-matmul on CPU, SDPA on GPU); finished rows are swap-removed (a small KV copy);
  - :class:`HFGenericBackend` (any other HF causal LM): HF forward with a ``DynamicCache``,
    left padding with ``attention_mask`` / ``position_ids``, ``batch_select_indices`` compaction.

A backend implements ``begin / can_admit / prefill / decode / remove``. Speculative decoding will
add a ``verify`` step (several draft tokens per row, tree attention mask) next to ``decode``:
:meth:`LlamaFastBackend.forward` already takes ``[n, Q]`` tokens with explicit positions and an
arbitrary boolean attention mask over the cache, and cache columns may differ from RoPE positions
(tree siblings). Rejected drafts need no cache cleanup -- a row's length decides what is attended
and later writes overwrite those columns (an accepted tree path that is not a prefix of the
written columns has to be gathered into place). ``generate(..., return_hidden_states=True)``
returns the last-layer (post-final-norm) hidden states that produced each generated token -- the
features an EAGLE-style drafter is trained on.
"""

from __future__ import annotations

import contextlib
import inspect
import os
import platform
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Iterator, Protocol, Sequence

import torch
import torch.nn.functional as F

from rlspec.errors import ConfigError
from rlspec.rollout.base import FINISH_LENGTH, FINISH_STOP, RolloutResult, SamplingParams, check_prompt_ids
from rlspec.rollout.sampling import sample_next_tokens

FAST_ARCHITECTURES = ("LlamaForCausalLM", "Qwen2ForCausalLM", "Qwen3ForCausalLM", "MistralForCausalLM")
# RoPE types whose inverse frequencies do not depend on the sequence length: the HF rotary module's
# ``inv_freq`` / ``attention_scaling`` are used as they are ("dynamic" and "longrope" change them
# with the length, so those models take the generic path).
FAST_ROPE_TYPES = ("default", "linear", "llama3", "yarn")


@dataclass
class RolloutResultWithHidden(RolloutResult):
    """A :class:`RolloutResult` plus the hidden states that produced each generated token.

    ``response_hidden_states[i][t]`` is the last-layer hidden state (after the final norm, i.e.
    what ``lm_head`` saw) at the position *before* response token ``t`` -- the state whose logits
    sampled that token. Shape ``[len(response_ids[i]), hidden_size]``, in the model's dtype.
    """

    response_hidden_states: list[torch.Tensor] = field(default_factory=list)


class UnsupportedModel(Exception):
    """The fast path cannot run this model (the message says why); the generic path is used."""


class Backend(Protocol):
    """Model half of the engine. It holds the KV cache of the active rows ``0 .. n-1``."""

    name: str

    def begin(self, num_slots: int, max_len: int) -> None:
        """Start a generate call: at most ``num_slots`` rows of at most ``max_len`` tokens."""

    def can_admit(self, num_active: int) -> bool:
        """Whether new prompts can join a batch that has ``num_active`` rows now."""

    def prefill(self, prompts: list[list[int]], want_hidden: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Append the prompts as new rows; return their next-token logits ``[k, V]`` (and hidden)."""

    def decode(self, tokens: torch.Tensor, want_hidden: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Feed one token per active row (``[n]``); return next-token logits ``[n, V]``."""

    def remove(self, rows: list[int]) -> list[int]:
        """Drop the given rows. Returns ``order``: new row ``i`` is the old row ``order[i]``."""

    def end(self) -> None:
        """Finish the generate call (drop per-call state)."""


# ------------------------------------------------------------------------------------ fast path


# ``linear`` computes ``(W @ x^T)^T`` on CPU for inputs of at most this many rows and weights of at
# least this many elements (measured on 2 AMD EPYC cores (AVX2), fp32, a 40M model's 512x512 ..
# 4096x512 weights streamed from memory: 1.3-2x faster at 2-48 rows, equal near 64, slower past ~96;
# weights that stay in cache gain nothing). On 2 Intel Xeon cores (AVX-512) the same path is up to
# 1.8x *slower* at 2-8 rows and equal at 12-48 (plain decode of the 38M model: 19.5 vs 10.7 ms per
# step at 2 rows): it is MKL's x @ W^T on AMD that is slow. So the path is on where the CPU is
# AMD's, unless RLSPEC_SMALL_ROW_LINEAR=1/0 says otherwise. The choice is fixed per machine (not
# timed at run time), so a run stays deterministic for a seed and a thread count.
SMALL_LINEAR_ROWS = 48
SMALL_LINEAR_MIN_WEIGHT = 1 << 18


def small_row_linear_default(env: str | None = None, vendor: str | None = None) -> bool:
    """Whether :func:`linear` takes the ``(W @ x^T)^T`` path: ``RLSPEC_SMALL_ROW_LINEAR`` (``1`` / ``0``
    / ``auto``), where ``auto`` (the default) means "the CPU vendor is AMD"."""
    env = os.environ.get("RLSPEC_SMALL_ROW_LINEAR", "auto") if env is None else env
    value = env.strip().lower()
    if value in ("1", "true", "on"):
        return True
    if value in ("0", "false", "off"):
        return False
    if value != "auto":
        raise ConfigError(f"RLSPEC_SMALL_ROW_LINEAR={env!r} is not valid; use 1, 0 or auto")
    if vendor is None:
        try:
            with open("/proc/cpuinfo", encoding="utf-8") as f:
                vendor = next((line.split(":", 1)[1].strip() for line in f if line.startswith("vendor_id")), "")
        except OSError:
            vendor = platform.processor()
    return "AMD" in vendor.upper()


SMALL_ROW_LINEAR = small_row_linear_default()


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """``F.linear(x, weight, bias)``, computed as ``(weight @ x^T)^T`` on CPU for few rows when
    :data:`SMALL_ROW_LINEAR` is on.

    Decoding and speculative verification multiply a handful of rows (``n`` or ``n * (M+1)``) by
    every weight matrix. On AMD CPUs MKL's ``x @ W^T`` path is up to 2x slower there than the
    equivalent ``W @ x^T`` (same FLOPs, same result up to float summation order), which makes
    verifying ``M+1`` draft tokens cost more than it must. Larger inputs (prefill), other CPUs
    (see :data:`SMALL_LINEAR_ROWS`) and every non-CPU device take ``F.linear``.
    """
    rows = x.numel() // x.shape[-1] if x.shape[-1] else 0
    if (not SMALL_ROW_LINEAR or x.device.type != "cpu" or not 0 < rows <= SMALL_LINEAR_ROWS or x.dtype != weight.dtype
            or weight.numel() < SMALL_LINEAR_MIN_WEIGHT):
        return F.linear(x, weight, bias)
    x2 = x.reshape(rows, x.shape[-1])
    y = torch.mm(weight, x2.t()) if bias is None else torch.addmm(bias[:, None], weight, x2.t())
    return y.t().contiguous().view(*x.shape[:-1], weight.shape[0])


def _median(values: list[float]) -> float:
    ordered = sorted(values)
    return ordered[len(ordered) // 2]


def _rope_type(config) -> str:
    params = getattr(config, "rope_parameters", None) or {}
    if isinstance(params, dict) and "rope_type" in params:
        return str(params["rope_type"])
    scaling = getattr(config, "rope_scaling", None) or {}
    return str(scaling.get("rope_type", scaling.get("type", "default"))) if isinstance(scaling, dict) else "default"


def fast_path_unsupported_reason(model) -> str | None:
    """Why :class:`LlamaFastBackend` cannot run ``model`` (``None`` if it can)."""
    arch = type(model).__name__
    if arch not in FAST_ARCHITECTURES:
        return f"architecture {arch} is not one of {', '.join(FAST_ARCHITECTURES)}"
    config = model.config
    rope = _rope_type(config)
    if rope not in FAST_ROPE_TYPES:
        return f"rope type {rope!r} is not one of {', '.join(FAST_ROPE_TYPES)}"
    inner = getattr(model, "model", None)
    if inner is None or not hasattr(inner, "layers") or not hasattr(inner, "rotary_emb"):
        return "the model has no .model.layers / .model.rotary_emb"
    layer = inner.layers[0]
    attn, mlp = layer.self_attn, layer.mlp
    for name in ("q_proj", "k_proj", "v_proj", "o_proj"):
        if not isinstance(getattr(attn, name, None), torch.nn.Linear):
            return f"self_attn.{name} is not an nn.Linear"
    for name in ("gate_proj", "up_proj", "down_proj"):
        if not isinstance(getattr(mlp, name, None), torch.nn.Linear):
            return f"mlp.{name} is not an nn.Linear"
    if getattr(config, "num_hidden_layers", len(inner.layers)) != len(inner.layers):
        return "config.num_hidden_layers differs from the number of layers"
    return None


def _sliding_window(config) -> int | None:
    """The attention window if any layer uses one (``None``: all layers attend fully)."""
    window = getattr(config, "sliding_window", None)
    if window is None:
        return None
    layer_types = getattr(config, "layer_types", None)
    if layer_types is not None and "sliding_attention" not in layer_types:
        if type(config).__name__ != "MistralConfig":
            return None
    return int(window)


@dataclass
class _LayerWeights:
    ln1: torch.Tensor
    ln2: torch.Tensor
    wqkv: torch.Tensor | None  # fused [q; k; v] weight (derived; refreshed by update_weights)
    bqkv: torch.Tensor | None
    wq: torch.Tensor
    wk: torch.Tensor
    wv: torch.Tensor
    bq: torch.Tensor | None
    bk: torch.Tensor | None
    bv: torch.Tensor | None
    wo: torch.Tensor
    bo: torch.Tensor | None
    wgu: torch.Tensor | None  # fused [gate; up] weight (derived)
    bgu: torch.Tensor | None
    wg: torch.Tensor
    wu: torch.Tensor
    bg: torch.Tensor | None
    bu: torch.Tensor | None
    wd: torch.Tensor
    bd: torch.Tensor | None
    q_norm: torch.Tensor | None  # Qwen3 per-head RMSNorm weights
    k_norm: torch.Tensor | None
    act: object  # the MLP activation (callable)


class LlamaFastBackend:
    """Forward pass for Llama-family decoders that reads the HF parameters in place.

    The parameters are referenced, not copied, so in-place optimizer updates are seen at once.
    With ``fuse_weights=True`` the q/k/v and gate/up weights are additionally concatenated into
    fused copies (fewer, larger matmuls); :meth:`refresh` (called by
    :meth:`NativeEngine.update_weights`) rebuilds them and re-reads the parameter references.

    KV cache: per layer two zero-initialised tensors ``[num_slots, n_kv_heads, max_len, head_dim]``
    kept between calls (reallocated only when a call needs more). Row ``r`` holds its tokens at
    columns ``0 .. len_r - 1``; prompts are prefilled right-padded with a causal mask (padding can
    only influence padding) and decode writes each row's new key at its own column ``len_r``.
    """

    name = "fast"

    def __init__(
        self, model, pad_token_id: int = 0, fuse_weights: bool = True, cache_attention: str = "auto"
    ) -> None:
        reason = fast_path_unsupported_reason(model)
        if reason is not None:
            raise UnsupportedModel(reason)
        self.model = model
        self.pad_token_id = pad_token_id
        self.fuse_weights = fuse_weights
        cfg = model.config
        self.num_heads = cfg.num_attention_heads
        self.num_kv_heads = getattr(cfg, "num_key_value_heads", None) or self.num_heads
        self.head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // self.num_heads
        self.hidden_size = cfg.hidden_size
        self.sliding_window = _sliding_window(cfg)
        if cache_attention not in ("auto", "sdpa", "math"):
            raise ConfigError(f"cache_attention must be 'auto', 'sdpa' or 'math', got {cache_attention!r}")
        # Attention of new tokens over the cache. "math" (matmul-softmax-matmul with the query
        # heads of a KV group stacked) beats the SDPA CPU kernel for the few queries per row of
        # decoding; on GPU the SDPA kernels are the better choice.
        self.cache_attention = cache_attention
        self._kv: list[tuple[torch.Tensor, torch.Tensor]] = []
        self._rope_len = 0
        self.refresh()

    # -- weights ----------------------------------------------------------------------------

    def refresh(self) -> None:
        """Re-read parameter references and rebuild derived (fused) weights and RoPE tables."""
        inner = self.model.model
        layers = []
        with torch.no_grad():
            for layer in inner.layers:
                at, mlp = layer.self_attn, layer.mlp
                qn = getattr(at, "q_norm", None)
                kn = getattr(at, "k_norm", None)
                wqkv = bqkv = wgu = bgu = None
                if self.fuse_weights:
                    wqkv = torch.cat([at.q_proj.weight, at.k_proj.weight, at.v_proj.weight]).detach()
                    if at.q_proj.bias is not None:
                        bqkv = torch.cat([at.q_proj.bias, at.k_proj.bias, at.v_proj.bias]).detach()
                    wgu = torch.cat([mlp.gate_proj.weight, mlp.up_proj.weight]).detach()
                    if mlp.gate_proj.bias is not None:
                        bgu = torch.cat([mlp.gate_proj.bias, mlp.up_proj.bias]).detach()
                act_name = getattr(self.model.config, "hidden_act", None)
                layers.append(
                    _LayerWeights(
                        ln1=layer.input_layernorm.weight,
                        ln2=layer.post_attention_layernorm.weight,
                        wqkv=wqkv,
                        bqkv=bqkv,
                        wq=at.q_proj.weight,
                        wk=at.k_proj.weight,
                        wv=at.v_proj.weight,
                        bq=at.q_proj.bias,
                        bk=at.k_proj.bias,
                        bv=at.v_proj.bias,
                        wo=at.o_proj.weight,
                        bo=at.o_proj.bias,
                        wgu=wgu,
                        bgu=bgu,
                        wg=mlp.gate_proj.weight,
                        wu=mlp.up_proj.weight,
                        bg=mlp.gate_proj.bias,
                        bu=mlp.up_proj.bias,
                        wd=mlp.down_proj.weight,
                        bd=mlp.down_proj.bias,
                        q_norm=qn.weight if qn is not None else None,
                        k_norm=kn.weight if kn is not None else None,
                        act=F.silu if act_name in ("silu", "swish") else mlp.act_fn,
                    )
                )
        self.layers = layers
        self.eps = float(inner.layers[0].input_layernorm.variance_epsilon)
        self.final_norm = inner.norm.weight
        self.final_eps = float(inner.norm.variance_epsilon)
        self.qk_eps = (
            float(inner.layers[0].self_attn.q_norm.variance_epsilon)
            if getattr(inner.layers[0].self_attn, "q_norm", None) is not None
            else self.eps
        )
        self.embed = inner.embed_tokens.weight
        self.lm_head = self.model.lm_head.weight
        self.lm_bias = getattr(self.model.lm_head, "bias", None)
        rot = inner.rotary_emb
        self.inv_freq = rot.inv_freq.detach().float()
        self.attention_scaling = float(getattr(rot, "attention_scaling", 1.0))
        self.dtype = self.embed.dtype
        self.device = self.embed.device
        self._rope_len = 0  # rebuild the cos/sin tables lazily
        self._snapshot = [(p, p._version) for p in self.model.parameters()]

    def is_stale(self) -> bool:
        """Whether parameters changed since :meth:`refresh` in a way this backend would miss.

        Parameter objects that were replaced are always detected; in-place updates only matter
        with ``fuse_weights`` and are detected through the tensors' version counters (bumped by
        optimizer steps and ``copy_``, but not by writes through ``param.data``).
        """
        params = list(self.model.parameters())
        if len(params) != len(self._snapshot):
            return True
        for p, (q, version) in zip(params, self._snapshot):
            if p is not q or (self.fuse_weights and p._version != version):
                return True
        return False

    def supports_length(self, max_len: int) -> bool:
        """False when a sliding attention window would cut into a sequence of ``max_len`` tokens."""
        return self.sliding_window is None or max_len <= self.sliding_window

    def _rope_tables(self, length: int) -> None:
        if self._rope_len >= length:
            return
        length = max(length, 2 * self._rope_len, 256)
        pos = torch.arange(length, device=self.device, dtype=torch.float32)
        freqs = pos[:, None] * self.inv_freq.to(self.device)[None, :]  # [L, D/2], as HF computes it
        emb = torch.cat((freqs, freqs), dim=-1)
        half = self.head_dim // 2
        sign = torch.cat([-torch.ones(half, device=self.device), torch.ones(half, device=self.device)])
        self.cos = (emb.cos() * self.attention_scaling).to(self.dtype)  # [L, D]
        # rotate_half(x) * sin == roll(x, D/2) * (sign * sin): one roll instead of slice+neg+cat
        self.sin_signed = ((emb.sin() * self.attention_scaling).to(self.dtype) * sign.to(self.dtype))
        self._rope_len = length

    # -- forward ----------------------------------------------------------------------------

    def _norm(self, x: torch.Tensor, w: torch.Tensor, eps: float) -> torch.Tensor:
        if x.dtype == torch.float32:
            return F.rms_norm(x, (x.shape[-1],), w, eps)
        h = x.float()  # HF's formula for half precision: normalise in fp32, cast, then scale
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)
        return w * h.to(x.dtype)

    def forward(
        self,
        input_ids: torch.Tensor,
        positions: torch.Tensor,
        rows: slice,
        attn_mask: torch.Tensor | None,
        kv_len: int,
        select: torch.Tensor | None = None,
        cache_cols: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Run the decoder on ``Q`` new tokens for each of ``n`` cache rows; returns hidden states.

        Args:
            input_ids: ``[n, Q]`` token ids.
            positions: ``[n, Q]`` RoPE positions; also the cache columns the new keys go to
                unless ``cache_cols`` is given.
            rows: the contiguous cache rows ``start .. start+n-1`` of the ``n`` sequences.
            attn_mask: ``None`` = causal self-attention among the new tokens only (prefill of
                empty rows; ``positions`` is then ignored and taken as ``arange(Q)``). Otherwise
                a bool ``[n, 1, Q, kv_len]`` mask over cache columns ``0 .. kv_len-1``
                (True = attend) that includes the new tokens' own columns (decode:
                ``col <= pos``; speculative verification: prefix + the draft tree's mask).
            kv_len: number of cache columns attended to when ``attn_mask`` is given.
            select: optional ``[n]`` index into the ``Q`` axis: return only that token per row.
            cache_cols: optional ``[n, Q]`` cache columns for the new keys/values when they differ
                from ``positions`` (a draft tree: siblings share a position, not a column).

        Returns:
            post-final-norm hidden states ``[n, Q, H]`` (``[n, H]`` with ``select``).
        """
        n, q_len = input_ids.shape
        hq, hkv, d = self.num_heads, self.num_kv_heads, self.head_dim
        x = F.embedding(input_ids, self.embed)  # [n, Q, H]
        if attn_mask is None:
            cos = self.cos[:q_len].view(1, q_len, 1, d)
            sin = self.sin_signed[:q_len].view(1, q_len, 1, d)
        else:
            cos = self.cos[positions].unsqueeze(2)  # [n, Q, 1, D]
            sin = self.sin_signed[positions].unsqueeze(2)
            row_index = torch.arange(rows.start, rows.stop, device=x.device)[:, None]
            use_math = self.cache_attention == "math" or (self.cache_attention == "auto" and x.device.type == "cpu")
            if use_math:
                group = hq // hkv
                bias = torch.zeros(attn_mask.shape, dtype=torch.float32, device=x.device).masked_fill_(
                    ~attn_mask, float("-inf")
                )  # [n, 1, Q, kv]
                if q_len > 1 and group > 1:  # rows of a group are (head-in-group, query) pairs
                    bias = bias.unsqueeze(2).expand(n, 1, group, q_len, kv_len).reshape(n, 1, group * q_len, kv_len)
                scale = d**-0.5
        for li, w in enumerate(self.layers):
            k_cache, v_cache = self._kv[li]
            h = self._norm(x, w.ln1, self.eps)
            if w.wqkv is not None:
                qkv = linear(h, w.wqkv, w.bqkv).view(n, q_len, hq + 2 * hkv, d)
                qk, v = qkv[:, :, : hq + hkv], qkv[:, :, hq + hkv :]
                if w.q_norm is not None:
                    qh = self._norm(qk[:, :, :hq], w.q_norm, self.qk_eps)
                    qk = torch.cat([qh, self._norm(qk[:, :, hq:], w.k_norm, self.qk_eps)], dim=2)
            else:
                qh = linear(h, w.wq, w.bq).view(n, q_len, hq, d)
                kh = linear(h, w.wk, w.bk).view(n, q_len, hkv, d)
                v = linear(h, w.wv, w.bv).view(n, q_len, hkv, d)
                if w.q_norm is not None:
                    qh = self._norm(qh, w.q_norm, self.qk_eps)
                    kh = self._norm(kh, w.k_norm, self.qk_eps)
                qk = torch.cat([qh, kh], dim=2)
            qk = torch.addcmul(qk * cos, qk.roll(d // 2, dims=-1), sin)  # RoPE on q and k at once
            q = qk[:, :, :hq].transpose(1, 2)  # [n, Hq, Q, D]
            k = qk[:, :, hq:]  # [n, Q, Hkv, D]
            if attn_mask is None:
                k_t, v_t = k.transpose(1, 2), v.transpose(1, 2)  # [n, Hkv, Q, D]
                k_cache[rows, :, :q_len] = k_t
                v_cache[rows, :, :q_len] = v_t
                o = F.scaled_dot_product_attention(q, k_t, v_t, is_causal=True, enable_gqa=hq != hkv)
                o = o.transpose(1, 2).reshape(n, q_len, hq * d)
            else:
                cols = positions if cache_cols is None else cache_cols
                k_cache[row_index, :, cols] = k  # [n, Q, Hkv, D] at (row, column)
                v_cache[row_index, :, cols] = v
                k_all, v_all = k_cache[rows, :, :kv_len], v_cache[rows, :, :kv_len]
                if use_math:
                    o = self._math_attention(qk[:, :, :hq], k_all, v_all, bias, scale)  # [n, Q, Hq*D]
                else:
                    o = F.scaled_dot_product_attention(q, k_all, v_all, attn_mask=attn_mask, enable_gqa=hq != hkv)
                    o = o.transpose(1, 2).reshape(n, q_len, hq * d)
            x = x + linear(o, w.wo, w.bo)
            h = self._norm(x, w.ln2, self.eps)
            if w.wgu is not None:
                gu = linear(h, w.wgu, w.bgu)
                inter = gu.shape[-1] // 2
                h = w.act(gu[..., :inter]) * gu[..., inter:]
            else:
                h = w.act(linear(h, w.wg, w.bg)) * linear(h, w.wu, w.bu)
            x = x + linear(h, w.wd, w.bd)
        if select is not None:
            x = x[torch.arange(n, device=x.device), select]  # [n, H]
        return self._norm(x, self.final_norm, self.final_eps)

    def _math_attention(
        self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, bias: torch.Tensor, scale: float
    ) -> torch.Tensor:
        """softmax(q k^T * scale + bias) v with GQA by stacking each KV group's query heads.

        q ``[n, Q, Hq, D]``, k/v ``[n, Hkv, kv, D]``, bias ``[n, 1, G*Q or 1, kv]`` -> ``[n, Q, Hq*D]``.
        """
        n, q_len, hq, d = q.shape
        hkv = k.shape[1]
        group = hq // hkv
        qg = (q * scale).view(n, q_len, hkv, group, d).permute(0, 2, 3, 1, 4).reshape(n, hkv, group * q_len, d)
        scores = torch.matmul(qg, k.transpose(-1, -2)) + bias  # [n, Hkv, G*Q, kv]
        probs = scores.softmax(dim=-1, dtype=torch.float32).to(v.dtype)
        o = torch.matmul(probs, v)  # [n, Hkv, G*Q, D]
        return o.view(n, hkv, group, q_len, d).permute(0, 3, 1, 2, 4).reshape(n, q_len, hq * d)

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return linear(hidden, self.lm_head, self.lm_bias)

    # -- Backend protocol -------------------------------------------------------------------

    def begin(self, num_slots: int, max_len: int) -> None:
        self._rope_tables(max_len)
        have = self._kv[0][0].shape if self._kv else None
        if have is None or have[0] < num_slots or have[2] < max_len:
            self._kv = []  # free before allocating the new cache
            shape = (num_slots, self.num_kv_heads, max_len, self.head_dim)
            zeros = dict(dtype=self.dtype, device=self.device)  # zeros: stale NaNs would leak via 0*NaN
            self._kv = [(torch.zeros(shape, **zeros), torch.zeros(shape, **zeros)) for _ in self.layers]
        self.num_slots, self.max_len = num_slots, max_len
        self.n = 0
        self.lens: list[int] = []  # tokens in the cache per row (host copy)
        self.pos = torch.zeros(0, dtype=torch.long, device=self.device)  # same, on device
        self.col_ids = torch.arange(max_len, device=self.device)

    def can_admit(self, num_active: int) -> bool:
        return True

    def prefill(self, prompts: list[list[int]], want_hidden: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
        logits, hidden, _ = self.prefill_keeping_states(prompts, want_hidden, keep_states=False)
        return logits, hidden

    def prefill_keeping_states(
        self, prompts: list[list[int]], want_hidden: bool, keep_states: bool
    ) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
        """:meth:`prefill`, plus (``keep_states``) the hidden states of every prompt position
        ``[k, max_len, H]`` (right-padded), which the same forward computes anyway."""
        k = len(prompts)
        lens = [len(p) for p in prompts]
        q_len = max(lens)
        ids = torch.full((k, q_len), self.pad_token_id, dtype=torch.long)
        for i, p in enumerate(prompts):
            ids[i, : len(p)] = torch.tensor(p, dtype=torch.long)
        ids = ids.to(self.device)
        lens_t = torch.tensor(lens, dtype=torch.long, device=self.device)
        states = None
        if keep_states:
            states = self.forward(ids, None, slice(self.n, self.n + k), None, q_len)  # [k, Q, H]
            hidden = states[torch.arange(k, device=self.device), lens_t - 1]
        else:
            hidden = self.forward(ids, None, slice(self.n, self.n + k), None, q_len, select=lens_t - 1)
        self.n += k
        self.lens.extend(lens)
        self.pos = torch.cat([self.pos, lens_t])
        return self.logits(hidden), (hidden if want_hidden else None), states

    def decode(self, tokens: torch.Tensor, want_hidden: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
        n = self.n
        kv_len = max(self.lens) + 1
        pos = self.pos  # [n] column of the new token per row
        mask = (self.col_ids[:kv_len] <= pos[:, None]).view(n, 1, 1, kv_len)
        hidden = self.forward(tokens.view(n, 1), pos.view(n, 1), slice(0, n), mask, kv_len)
        hidden = hidden.view(n, -1)
        self.pos = pos + 1
        self.lens = [x + 1 for x in self.lens]
        return self.logits(hidden), (hidden if want_hidden else None)

    def move_cache_columns(self, rows: list[int], src: list[int], dst: list[int]) -> None:
        """Copy cache columns ``src`` to ``dst`` of rows ``rows`` (an accepted draft-tree path moved
        next to its root; all sources are read before any destination is written)."""
        r = torch.tensor(rows, dtype=torch.long, device=self.device)
        s_cols = torch.tensor(src, dtype=torch.long, device=self.device)
        d_cols = torch.tensor(dst, dtype=torch.long, device=self.device)
        for k_cache, v_cache in self._kv:
            k_cache[r, :, d_cols] = k_cache[r, :, s_cols].clone()
            v_cache[r, :, d_cols] = v_cache[r, :, s_cols].clone()

    def set_lengths(self, lens: list[int]) -> None:
        """Set the cached tokens per row (after a speculative step accepted a different number each)."""
        self.lens = [int(x) for x in lens]
        self.pos = torch.tensor(self.lens, dtype=torch.long, device=self.device)

    def remove(self, rows: list[int]) -> list[int]:
        n = self.n
        gone = set(rows)
        m = n - len(gone)
        holes = [r for r in sorted(gone) if r < m]
        movers = [r for r in range(m, n) if r not in gone]
        order = list(range(m))
        if holes:
            kv_len = max(self.lens[r] for r in movers)
            dst = torch.tensor(holes, device=self.device)
            src = torch.tensor(movers, device=self.device)
            for k_cache, v_cache in self._kv:
                k_cache[dst, :, :kv_len] = k_cache[src, :, :kv_len]
                v_cache[dst, :, :kv_len] = v_cache[src, :, :kv_len]
            for h, s in zip(holes, movers):
                order[h] = s
        self.pos = self.pos[torch.tensor(order, dtype=torch.long, device=self.device)]
        self.lens = [self.lens[i] for i in order]
        self.n = m
        return order

    def end(self) -> None:
        self.lens, self.n = [], 0

    def free_cache(self) -> None:
        self._kv = []


# --------------------------------------------------------------------------------- generic path


class HFGenericBackend:
    """Any HF causal LM: its own forward with a ``DynamicCache``, left padding, compaction.

    New prompts join a running batch by left-padding the shorter of the two caches and
    concatenating them (only for caches made of plain full-attention ``DynamicLayer``s; other
    cache kinds admit new prompts only when the batch is empty). Leading columns that no remaining
    row attends to are trimmed after rows are removed.
    """

    name = "generic"

    def __init__(self, model, pad_token_id: int = 0) -> None:
        self.model = model
        self.pad_token_id = pad_token_id
        params = inspect.signature(model.forward).parameters
        self._takes_positions = "position_ids" in params
        self._takes_keep = "logits_to_keep" in params
        self.device = next(model.parameters()).device

    def supports_length(self, max_len: int) -> bool:
        return True

    def begin(self, num_slots: int, max_len: int) -> None:
        self.cache = None
        self.mask: torch.Tensor | None = None  # [n, T] 1 = real token
        self.next_pos = torch.zeros(0, dtype=torch.long, device=self.device)
        self.n = 0
        self._mergeable = True

    def can_admit(self, num_active: int) -> bool:
        return num_active == 0 or self._mergeable

    def _call(self, ids, mask, positions, cache, want_hidden, keep_last):
        from transformers import DynamicCache

        if cache is None:
            cache = DynamicCache(config=self.model.config)
        kwargs = dict(input_ids=ids, attention_mask=mask, past_key_values=cache, use_cache=True)
        if self._takes_positions:
            kwargs["position_ids"] = positions
        if self._takes_keep and keep_last:
            kwargs["logits_to_keep"] = 1
        if want_hidden:
            kwargs["output_hidden_states"] = True
        out = self.model(**kwargs)
        hidden = out.hidden_states[-1][:, -1] if want_hidden else None
        return out.logits[:, -1], hidden, out.past_key_values

    def prefill(self, prompts: list[list[int]], want_hidden: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
        k = len(prompts)
        q_len = max(len(p) for p in prompts)
        ids = torch.full((k, q_len), self.pad_token_id, dtype=torch.long)
        mask = torch.zeros((k, q_len), dtype=torch.long)
        for i, p in enumerate(prompts):
            ids[i, q_len - len(p) :] = torch.tensor(p, dtype=torch.long)
            mask[i, q_len - len(p) :] = 1
        ids, mask = ids.to(self.device), mask.to(self.device)
        positions = (mask.cumsum(-1) - 1).clamp_min(0)
        logits, hidden, cache = self._call(ids, mask, positions, None, want_hidden, keep_last=True)
        lens = torch.tensor([len(p) for p in prompts], dtype=torch.long, device=self.device)
        if self.n == 0:
            self.cache, self.mask, self.next_pos = cache, mask, lens
            self._mergeable = self._plain_layers(cache)
        else:
            self._merge(cache, mask)
            self.next_pos = torch.cat([self.next_pos, lens])
        self.n += k
        return logits, hidden

    @staticmethod
    def _plain_layers(cache) -> bool:
        from transformers.cache_utils import DynamicLayer

        layers = getattr(cache, "layers", None)
        return bool(layers) and all(type(layer) is DynamicLayer for layer in layers)

    def _merge(self, cache, mask: torch.Tensor) -> None:
        old_t, new_t = self.mask.shape[1], mask.shape[1]
        width = max(old_t, new_t)

        def pad_left(x: torch.Tensor, t: int, dim: int) -> torch.Tensor:
            if t == width:
                return x
            shape = list(x.shape)
            shape[dim] = width - t
            return torch.cat([x.new_zeros(shape), x], dim=dim)

        for old, new in zip(self.cache.layers, cache.layers):
            old.keys = torch.cat([pad_left(old.keys, old_t, 2), pad_left(new.keys, new_t, 2)])
            old.values = torch.cat([pad_left(old.values, old_t, 2), pad_left(new.values, new_t, 2)])
        self.mask = torch.cat([pad_left(self.mask, old_t, 1), pad_left(mask, new_t, 1)])

    def decode(self, tokens: torch.Tensor, want_hidden: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
        mask = torch.cat([self.mask, self.mask.new_ones((self.n, 1))], dim=1)
        logits, hidden, self.cache = self._call(
            tokens.view(-1, 1), mask, self.next_pos.view(-1, 1), self.cache, want_hidden, keep_last=False
        )
        self.mask = mask
        self.next_pos = self.next_pos + 1
        return logits, hidden

    def remove(self, rows: list[int]) -> list[int]:
        gone = set(rows)
        order = [i for i in range(self.n) if i not in gone]
        self.n = len(order)
        if not order:
            self.cache, self.mask = None, None
            self.next_pos = self.next_pos[:0]
            return order
        keep = torch.tensor(order, dtype=torch.long, device=self.device)
        self.cache.batch_select_indices(keep)
        self.mask = self.mask[keep]
        self.next_pos = self.next_pos[keep]
        if self._mergeable:  # trim columns that no remaining row attends to
            first = int(self.mask.any(0).nonzero()[0])
            if first > 0:
                self.mask = self.mask[:, first:]
                for layer in self.cache.layers:
                    layer.keys = layer.keys[:, :, first:]
                    layer.values = layer.values[:, :, first:]
        return order

    def end(self) -> None:
        self.cache, self.mask, self.n = None, None, 0


# ------------------------------------------------------------------------------------- engine


@contextlib.contextmanager
def _eval_mode(model) -> Iterator[None]:
    was_training = model.training
    model.eval()
    try:
        yield
    finally:
        model.train(was_training)


class NativeEngine:
    """Batched KV-cache sampling in plain torch, with continuous batching.

    Args:
        model: an HF causal LM (``AutoModelForCausalLM``), on the device to generate on.
        eos_token_ids: ids that end a response (e.g. ``<|im_end|>``); the EOS token is kept in
            the response and gets a logprob.
        tokenizer: needed only for ``SamplingParams.stop_strings`` (its ``decode`` is used).
        max_batch_size: most sequences decoded at once; more prompts wait for free slots.
        pad_token_id: filler id for padded prompt positions (masked out; any valid id works).
            Default: the model config's pad id, else the first EOS id, else 0.
        fast_path: ``None`` picks the Llama-family fast path when the model supports it,
            ``True`` requires it (ConfigError otherwise), ``False`` always uses the HF forward.
        fuse_weights: fast path only: keep fused q/k/v and gate/up weight copies (fewer, larger
            matmuls: a few % faster on small models; extra memory of about the attention + MLP
            weights). They are rebuilt by :meth:`update_weights`, and by ``generate`` when it sees
            that parameters changed (version counters); ``False`` reads every weight in place.
        prefill_tokens: padded-token budget of one prefill forward (prompts are admitted in
            chunks of at most this many tokens; at least one prompt per chunk).
        speculative: optional :class:`~rlspec.rollout.spec_decode.SpeculativeSettings`; with a
            drafter (:meth:`set_drafter`) the fast path switches to lossless speculative decoding
            on the long tail (see :mod:`rlspec.rollout.spec_decode`). The output distribution,
            the returned log-probs and hidden states are the target's either way.

    Results do not depend on how ``max_batch_size`` splits the prompts beyond floating-point
    rounding; sampling is reproducible for a given ``SamplingParams.seed`` and inputs.
    """

    def __init__(
        self,
        model,
        eos_token_ids: Sequence[int],
        tokenizer=None,
        max_batch_size: int = 256,
        pad_token_id: int | None = None,
        *,
        fast_path: bool | None = None,
        fuse_weights: bool = True,
        prefill_tokens: int = 8192,
        speculative=None,
    ) -> None:
        if max_batch_size < 1:
            raise ConfigError(f"rollout max_batch_size must be >= 1, got {max_batch_size}")
        if prefill_tokens < 1:
            raise ConfigError(f"rollout prefill_tokens must be >= 1, got {prefill_tokens}")
        self.model = model
        self.eos_token_ids = [int(t) for t in eos_token_ids]
        self._eos = frozenset(self.eos_token_ids)
        self.tokenizer = tokenizer
        self.max_batch_size = max_batch_size
        self.prefill_tokens = prefill_tokens
        cfg_pad = getattr(model.config, "pad_token_id", None)
        if pad_token_id is None:
            pad_token_id = cfg_pad if cfg_pad is not None else (self.eos_token_ids[0] if self.eos_token_ids else 0)
        self.pad_token_id = int(pad_token_id)
        self.vocab_size = int(model.get_input_embeddings().weight.shape[0])
        if not 0 <= self.pad_token_id < self.vocab_size:
            raise ConfigError(
                f"rollout pad_token_id={self.pad_token_id} is outside the model's vocabulary "
                f"[0, {self.vocab_size}): pass pad_token_id= a valid id (e.g. the tokenizer's pad id)"
            )
        self.device = next(model.parameters()).device
        self.generic = HFGenericBackend(model, self.pad_token_id)
        self.fast: LlamaFastBackend | None = None
        self.fast_unsupported: str | None = None
        if fast_path is not False:
            try:
                self.fast = LlamaFastBackend(model, self.pad_token_id, fuse_weights=fuse_weights)
            except UnsupportedModel as err:
                self.fast_unsupported = str(err)
                if fast_path:
                    raise ConfigError(
                        f"rollout fast_path=True but the fast path cannot run this model: {err}. "
                        "Set fast_path to null/None (auto) or False."
                    ) from None
        self.last_backend: str | None = None  # "fast" or "generic": which path the last call used
        self._spec_stats = None
        self.speculative = speculative  # SpeculativeSettings or None
        self.drafter = None
        self.bandit = None
        # called once per generate() when the long tail starts (<= threshold rows for warmup_checks
        # decode steps, nothing waiting), with the finished requests' (prompt, response, hidden
        # states) when hidden states are collected: TLT's spot trainer starts there
        self.on_long_tail = None
        if speculative is not None:
            from rlspec.rollout.bandit import DraftShapeBandit, default_arms_for

            bandit_cfg = dict(speculative.bandit)
            if "arms" not in bandit_cfg and "buckets" not in bandit_cfg:  # chains on CPU, trees on GPU
                bandit_cfg["arms"] = [[str(a) for a in arms] for arms in default_arms_for(self.device.type)]
            self.bandit = DraftShapeBandit(bandit_cfg)  # kept across calls: it learns
        self._sd_backoff: dict[int, int] = {}  # batch-size bucket -> calls left before SD is tried again
        self._sd_penalty: dict[int, int] = {}  # bucket -> current backoff length (doubles on each loss)

    def set_drafter(self, drafter) -> None:
        """Use ``drafter`` (an :class:`~rlspec.rollout.drafter.EagleDrafter` of this model) for
        speculative decoding from the next ``generate`` call on (``None`` turns it off)."""
        self.drafter = drafter

    # -- RolloutEngine ----------------------------------------------------------------------

    def update_weights(self) -> None:
        """Refresh what the fast path derived from the parameters (fused weights, references)."""
        if self.fast is not None:
            self.fast.refresh()

    def free_cache(self) -> None:
        """Release the preallocated KV cache (it is kept between calls otherwise)."""
        if self.fast is not None:
            self.fast.free_cache()

    def generate(
        self, prompt_ids: Sequence[Sequence[int]], params: SamplingParams, *, return_hidden_states: bool = False
    ) -> RolloutResult:
        """Sample one response per prompt; see :class:`~rlspec.rollout.base.RolloutResult`.

        With ``return_hidden_states=True`` the result is a :class:`RolloutResultWithHidden`.
        """
        prompts = self._check_prompts(prompt_ids)
        if self.fast is not None and self.fast.is_stale():  # a safety net; update_weights is the contract
            self.fast.refresh()
        if params.stop_strings and self.tokenizer is None:
            raise ConfigError(
                "stop_strings need a tokenizer: pass tokenizer=... to NativeEngine (or drop stop_strings)"
            )
        n_req = len(prompts)
        max_len = (max(len(p) for p in prompts) if prompts else 0) + params.max_new_tokens
        backend: Backend = self.generic
        if self.fast is not None and self.fast.supports_length(max_len):
            backend = self.fast
        self.last_backend = backend.name
        generator = None
        if params.seed is not None:
            generator = torch.Generator(device=self.device)
            generator.manual_seed(params.seed)
        start = time.perf_counter()
        responses: list[list[int]] = [[] for _ in range(n_req)]
        logprobs: list[list[float]] = [[] for _ in range(n_req)]
        finish: list[str] = [FINISH_LENGTH] * n_req
        hidden_steps: list[tuple[torch.Tensor, list[int]]] = []
        steps = 0
        self._spec_stats = None
        self._tail_start: float | None = None
        self._tail_tokens_before = 0
        if n_req:
            mode = _eval_mode(self.model) if backend is self.generic else contextlib.nullcontext()
            with torch.inference_mode(), mode:
                steps = self._run(
                    backend, prompts, params, generator, responses, logprobs, finish, hidden_steps, return_hidden_states
                )
        seconds = time.perf_counter() - start
        tokens = sum(len(r) for r in responses)
        stats = {
            "tokens": float(tokens),
            "seconds": seconds,
            "tokens_per_s": tokens / seconds if seconds > 0 else 0.0,
            "prompt_tokens": float(sum(len(p) for p in prompts)),
            "decode_steps": float(steps),
        }
        if self._tail_start is not None:  # the long-tail phase (speculative settings only): from the switch point on
            stats["tail_seconds"] = start + seconds - self._tail_start
            stats["tail_tokens"] = float(tokens - self._tail_tokens_before)
        if self._spec_stats is not None:
            stats.update(self._spec_stats.as_stats())
        result_kw = dict(
            prompt_ids=prompts,
            response_ids=responses,
            response_logprobs=[torch.tensor(lp, dtype=torch.float32) for lp in logprobs],
            finish_reasons=finish,
            stats=stats,
        )
        if not return_hidden_states:
            return RolloutResult(**result_kw)
        hidden = self._collect_hidden(hidden_steps, responses)
        return RolloutResultWithHidden(**result_kw, response_hidden_states=hidden)

    # -- internals --------------------------------------------------------------------------

    def _check_prompts(self, prompt_ids: Sequence[Sequence[int]]) -> list[list[int]]:
        return check_prompt_ids(prompt_ids, self.vocab_size)

    def _next_chunk(self, waiting: deque, free: int, prompts: list[list[int]]) -> list[int]:
        chunk: list[int] = []
        longest = 0
        while waiting and len(chunk) < free:
            nxt = len(prompts[waiting[0]])
            if chunk and max(longest, nxt) * (len(chunk) + 1) > self.prefill_tokens:
                break
            longest = max(longest, nxt)
            chunk.append(waiting.popleft())
        return chunk

    def _stop_window(self, params: SamplingParams) -> int:
        # A stop string of b UTF-8 bytes completed by the newest token spans at most b tokens when
        # every token decodes to >= 1 byte; a few more absorb a multi-byte char cut at the start.
        return max(len(s.encode("utf-8")) for s in params.stop_strings) + 4

    def _run(
        self,
        backend: Backend,
        prompts: list[list[int]],
        params: SamplingParams,
        generator: torch.Generator | None,
        responses: list[list[int]],
        logprobs: list[list[float]],
        finish: list[str],
        hidden_steps: list[tuple[torch.Tensor, list[int]]],
        want_hidden: bool,
    ) -> int:
        num_slots = min(self.max_batch_size, len(prompts))
        keep_states, track_states = False, want_hidden
        prompt_states: dict[int, torch.Tensor] = {}  # request -> [P, H] (keep_states only)
        max_len = max(len(p) for p in prompts) + params.max_new_tokens
        spec = None
        self._spec_stats = None
        if self.speculative is not None and self.drafter is not None and backend is self.fast:
            from rlspec.rollout.spec_decode import SpecStats, SpeculativeDecoder

            spec = SpeculativeDecoder(backend, self.drafter, params, self.bandit, generator)
            self._spec_stats = SpecStats()
            # the drafter's state at the switch needs h_0 .. h_{L-1} of every tail row: keep what the
            # rollout computes anyway (prompt states from the prefill, one state per decode step) when
            # the states are collected for the caller, or on CPU, where re-running the tail rows'
            # prefixes (TLT's way) costs more than the tail saves; otherwise the switch re-runs them
            keep_states = want_hidden or self.device.type == "cpu"
            # after a revert the adaptive engine tries SD again once the batch has shrunk into a
            # smaller bucket; with kept states that needs every row's states for the whole call
            track_states = want_hidden or (keep_states and self.speculative.mode == "adaptive")
            max_len += spec.cache_slack(self.bandit)  # draft-tree columns past a row's length
        backend.begin(num_slots, max_len)
        waiting = deque(range(len(prompts)))
        rows: list[int] = []  # request index of each active row
        cur = torch.zeros(0, dtype=torch.long, device=self.device)  # last token of each row
        eos, max_new = self._eos, params.max_new_tokens
        stops = tuple(params.stop_strings)
        window = self._stop_window(params) if stops else 0
        decode_text = self.tokenizer.decode if stops else None
        steps = 0
        in_sd = False
        long_tail = False
        calm_steps = 0  # consecutive decode steps with <= threshold rows and nothing waiting
        # adaptive probe after the switch: SD and plain steps alternate until each has probe_steps
        # tokens/s samples, measured at the same (shrinking) batch size; slower SD reverts
        plain_rates: list[float] = []
        sd_rates: list[float] = []
        sd_bucket = None
        reverted_spec = None  # the decoder the adaptive probe turned off in this call (re-entry)

        def append(r: int, t: int, lp: float) -> bool:
            """Append token ``t`` to request ``r``; True when the request is finished."""
            resp = responses[r]
            resp.append(t)
            logprobs[r].append(lp)
            if t in eos or (stops and any(s in decode_text(resp[-window:], skip_special_tokens=False) for s in stops)):
                finish[r] = FINISH_STOP
                return True
            return len(resp) >= max_new  # FINISH_LENGTH (the default)

        def consume(logits: torch.Tensor, hidden: torch.Tensor | None, reqs: list[int]) -> tuple[torch.Tensor, list]:
            tokens, lps = sample_next_tokens(logits, params, generator)
            if hidden is not None:
                hidden_steps.append((hidden, list(reqs)))
            host = torch.stack((tokens.to(torch.float64), lps.to(torch.float64))).tolist()
            done = [i for i, (r, t, lp) in enumerate(zip(reqs, host[0], host[1])) if append(r, int(t), lp)]
            return tokens, done

        def speculative_step() -> tuple[torch.Tensor, list]:
            outs = spec.step(cur, self._spec_stats)
            done, kept, new_cur, kept_hidden, kept_reqs = [], [], [], [], []
            for i, (r, (emitted, lps, hid, _last)) in enumerate(zip(rows, outs)):
                lp_host = lps.tolist()
                k = 0
                finished = False
                for t, lp in zip(emitted, lp_host):
                    k += 1
                    if append(r, t, lp):
                        finished = True
                        break
                kept.append(k)
                new_cur.append(emitted[-1])
                if track_states:
                    kept_hidden.append(hid[:k])
                    kept_reqs += [r] * k
                if finished:
                    done.append(i)
            if track_states and kept_hidden:
                hidden_steps.append((torch.cat(kept_hidden), kept_reqs))
            spec.commit(kept)
            return torch.tensor(new_cur, dtype=torch.long, device=self.device), done

        def switch_on(decoder) -> None:
            """Build ``decoder``'s drafter state for the active rows (from the kept states, else
            the target re-runs their prefixes)."""
            t_switch = time.perf_counter()
            known = self._prefix_states(rows, prompt_states, hidden_steps) if keep_states else None
            decoder.start([prompts[r] + responses[r] for r in rows], cur, known)
            if not track_states:  # kept for the switch only
                hidden_steps.clear()
                prompt_states.clear()
            self._spec_stats.switch_seconds += time.perf_counter() - t_switch

        try:
            while True:
                while waiting and len(rows) < num_slots and backend.can_admit(len(rows)):
                    chunk = self._next_chunk(waiting, num_slots - len(rows), prompts)
                    if keep_states and not long_tail:
                        logits, hidden, states = backend.prefill_keeping_states(
                            [prompts[r] for r in chunk], True, keep_states=True)
                        for j, r in enumerate(chunk):
                            prompt_states[r] = states[j, : len(prompts[r])]
                    else:
                        logits, hidden = backend.prefill([prompts[r] for r in chunk], want_hidden)
                    tokens, done = consume(logits, hidden, chunk)
                    offset = len(rows)
                    rows.extend(chunk)
                    cur = torch.cat([cur, tokens])
                    if done:
                        rows, cur = self._drop(backend, rows, cur, [offset + i for i in done])
                if not rows:
                    if waiting:
                        continue
                    break
                if self.speculative is not None and not long_tail:  # TLT's long-tail switch, with hysteresis
                    calm = not waiting and (self.speculative.mode == "always" or len(rows) <= self.speculative.threshold)
                    calm_steps = calm_steps + 1 if calm else 0
                    if calm and (self.speculative.mode == "always" or calm_steps >= self.speculative.warmup_checks):
                        long_tail = True
                        self._tail_start = time.perf_counter()
                        self._tail_tokens_before = sum(len(r) for r in responses)
                        if self.on_long_tail is not None:
                            active = set(rows)
                            done_reqs = [r for r in range(len(prompts)) if responses[r] and r not in active
                                         and r not in waiting]
                            self.on_long_tail(self._finished_samples(prompts, responses, hidden_steps, done_reqs)
                                              if want_hidden else [])
                        sd_bucket = self.bandit.bucket_of(len(rows))
                        if spec is None:
                            pass  # no drafter for this call
                        elif self.speculative.mode == "adaptive" and self._backed_off(sd_bucket):
                            spec, reverted_spec = None, spec  # ... but a smaller bucket may still try it
                        else:
                            switch_on(spec)
                            in_sd = True
                elif reverted_spec is not None and self.bandit.bucket_of(len(rows)) != sd_bucket:
                    # SD lost in the previous bucket; the batch has shrunk into a smaller one, where a
                    # draft step costs less relative to a plain one: probe SD afresh there
                    sd_bucket = self.bandit.bucket_of(len(rows))
                    if not self._backed_off(sd_bucket):
                        spec, reverted_spec = reverted_spec, None
                        switch_on(spec)
                        plain_rates, sd_rates = [], []
                        self._spec_stats.reentered += 1
                        in_sd = True
                steps += 1
                probing = self.speculative is not None and self.speculative.mode == "adaptive" and (
                    len(sd_rates) < self.speculative.probe_steps or len(plain_rates) < self.speculative.probe_steps)
                if in_sd and probing and len(plain_rates) < len(sd_rates):  # the plain half of the probe
                    t_plain = time.perf_counter()
                    n_rows = len(rows)
                    logits, hidden = backend.decode(cur, True)
                    cur, done = consume(logits, hidden if track_states else None, rows)
                    spec.observe_plain_step(cur, hidden)
                    elapsed = time.perf_counter() - t_plain
                    self._spec_stats.plain_steps += 1
                    self._spec_stats.plain_tokens += n_rows
                    self._spec_stats.plain_seconds += elapsed
                    plain_rates.append(n_rows / max(elapsed, 1e-9))
                    if len(plain_rates) == self.speculative.probe_steps:
                        if _median(sd_rates) < _median(plain_rates):
                            # "never slower than plain": this batch-size bucket decodes faster without
                            # SD; back to plain for this call and skip SD there for 1, 2, 4, ... calls
                            penalty = min(2 * self._sd_penalty.get(sd_bucket, 0) or 1, 64)
                            self._sd_penalty[sd_bucket] = penalty
                            self._sd_backoff[sd_bucket] = penalty
                            self._spec_stats.reverted = 1
                            in_sd = False
                            spec.abandon()
                            spec, reverted_spec = None, spec
                        else:
                            self._sd_penalty[sd_bucket] = 0  # SD wins here: keep it
                            if track_states and not want_hidden:  # no revert, so no re-entry, from here
                                track_states = False
                                hidden_steps.clear()
                                prompt_states.clear()
                    if done:
                        order = backend.remove(done)
                        if spec is not None:
                            spec.remove(done, order)
                        rows = [rows[i] for i in order]
                        cur = cur[torch.tensor(order, dtype=torch.long, device=cur.device)]
                    continue
                if in_sd:
                    t_sd = time.perf_counter()
                    before = sum(len(responses[r]) for r in rows)
                    cur, done = speculative_step()
                    if probing:
                        sd_rates.append((sum(len(responses[r]) for r in rows) - before)
                                        / max(time.perf_counter() - t_sd, 1e-9))
                    if done:
                        order = backend.remove(done)
                        if spec is not None:
                            spec.remove(done, order)
                        rows = [rows[i] for i in order]
                        cur = cur[torch.tensor(order, dtype=torch.long, device=cur.device)]
                    continue
                t_plain = time.perf_counter()
                n_rows = len(rows)
                logits, hidden = backend.decode(cur, track_states or (keep_states and not long_tail))
                cur, done = consume(logits, hidden, rows)
                if self._spec_stats is not None:
                    elapsed = time.perf_counter() - t_plain
                    self._spec_stats.plain_steps += 1
                    self._spec_stats.plain_tokens += n_rows
                    self._spec_stats.plain_seconds += elapsed
                if done:
                    rows, cur = self._drop(backend, rows, cur, done)
        finally:
            backend.end()
        return steps

    def _backed_off(self, bucket: int) -> bool:
        """True when SD lost in this batch-size bucket recently: plain decoding there for this call,
        which uses up one call of the bucket's back-off."""
        skip = self._sd_backoff.get(bucket, 0)
        if skip:
            self._sd_backoff[bucket] = skip - 1
        return bool(skip)

    @staticmethod
    def _prefix_states(
        rows: list[int], prompt_states: dict[int, torch.Tensor], hidden_steps: list[tuple[torch.Tensor, list[int]]]
    ) -> list[torch.Tensor]:
        """Per active row, the target's hidden states ``h_0 .. h_{L-1}`` of the tokens in its cache,
        from the prefill's prompt states and the per-step states collected before the switch.

        ``hidden_steps`` holds, per prefill/decode call, ``(states [m, H], requests)``: a row's first
        entry is its prefill's ``h_{P-1}`` (already the last prompt state), then one ``h_j`` per
        decode step that fed ``x_j``, ``j = P .. L-1``.
        """
        active = set(rows)
        per_row: dict[int, list[torch.Tensor]] = {r: [] for r in rows}
        for states, reqs in hidden_steps:
            for i, r in enumerate(reqs):
                if r in active:
                    per_row[r].append(states[i])
        out = []
        for r in rows:
            decoded = per_row[r][1:]  # drop the prefill's h_{P-1}
            prompt = prompt_states[r]
            out.append(torch.cat([prompt, torch.stack(decoded)]) if decoded else prompt)
        return out

    def _drop(self, backend: Backend, rows: list[int], cur: torch.Tensor, done: list[int]):
        order = backend.remove(done)
        rows = [rows[i] for i in order]
        cur = cur[torch.tensor(order, dtype=torch.long, device=cur.device)]
        return rows, cur

    @staticmethod
    def _finished_samples(prompts, responses, hidden_steps, reqs: list[int]) -> list[tuple]:
        """``(prompt, response, hidden [len, H])`` of finished requests ``reqs`` mid-generation."""
        if not reqs or not hidden_steps:
            return []
        wanted = set(reqs)
        parts: dict[int, list[torch.Tensor]] = {r: [] for r in reqs}
        for h, owners in hidden_steps:
            idx = [i for i, r in enumerate(owners) if r in wanted]
            for i in idx:
                parts[owners[i]].append(h[i])
        return [(list(prompts[r]), list(responses[r]), torch.stack(parts[r]).clone()) for r in reqs
                if len(parts[r]) == len(responses[r])]

    @staticmethod
    def _collect_hidden(
        hidden_steps: list[tuple[torch.Tensor, list[int]]], responses: list[list[int]]
    ) -> list[torch.Tensor]:
        if not hidden_steps:
            return [torch.zeros(0) for _ in responses]
        states = torch.cat([h for h, _ in hidden_steps]).clone()  # clone: a normal (not inference) tensor
        owner = torch.tensor([r for _, reqs in hidden_steps for r in reqs], dtype=torch.long)
        order = torch.sort(owner, stable=True).indices  # chronological within each request
        states = states[order.to(states.device)]
        return list(torch.split(states, [len(r) for r in responses]))
