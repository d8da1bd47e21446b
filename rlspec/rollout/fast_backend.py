"""The native engine's fast path: its own forward for Llama-family decoders (Llama, Qwen2, Qwen3, Mistral).

:class:`LlamaFastBackend` reads the HF module's parameters in place and keeps a preallocated
per-slot KV cache (no per-step concatenation); RoPE from the config, GQA, attention with per-row
lengths (SDPA for prefill; for decode a matmul-softmax-matmul on CPU, SDPA on GPU); finished rows
are swap-removed (a small KV copy). :meth:`LlamaFastBackend.forward` takes ``[n, Q]`` tokens with
explicit positions and an arbitrary boolean attention mask over the cache, and cache columns may
differ from RoPE positions (draft-tree siblings): speculative verification runs through it.
Rejected drafts need no cache cleanup -- a row's length decides what is attended and later writes
overwrite those columns.
"""

from __future__ import annotations

import os
import platform
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from rlspec.errors import ConfigError

FAST_ARCHITECTURES = ("LlamaForCausalLM", "Qwen2ForCausalLM", "Qwen3ForCausalLM", "MistralForCausalLM")
# RoPE types whose inverse frequencies do not depend on the sequence length: the HF rotary module's
# ``inv_freq`` / ``attention_scaling`` are used as they are ("dynamic" and "longrope" change them
# with the length, so those models take the generic path).
FAST_ROPE_TYPES = ("default", "linear", "llama3", "yarn")


class UnsupportedModel(Exception):
    """The fast path cannot run this model (the message says why); the generic path is used."""


# ``linear`` computes ``(W @ x^T)^T`` on CPU for few rows when the CPU is AMD's, where MKL's
# ``x @ W^T`` is slow for them; docs/decisions.md has the measurements. The choice is fixed per
# machine, not timed at run time, so a run stays deterministic for a seed and a thread count.
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
