"""Loading the policy (and reference) model and tokenizer from a local directory or a hub id.

(``model.path=null``, the embedded default, is resolved by :func:`rlspec.embedded.resolve_model_path`.)
"""

from __future__ import annotations

import logging
import os
import torch

from rlspec.errors import ModelLoadError

log = logging.getLogger(__name__)

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def check_model_path(path: str) -> str:
    """A local ``save_pretrained`` directory (``~`` expanded) or a hub id; a path that cannot be
    either raises ModelLoadError naming the fix."""
    expanded = os.path.expanduser(path)
    if os.path.isdir(expanded):
        if not os.path.isfile(os.path.join(expanded, "config.json")):
            raise ModelLoadError(
                f"model.path={path!r} is a directory without config.json; point it at a "
                f"save_pretrained directory (config.json + weights + tokenizer)"
            )
        return expanded
    if os.path.exists(expanded) or path.startswith((".", "/", "~")) or path.count("/") > 1:
        raise ModelLoadError(
            f"model.path={path!r} does not exist; point it at a save_pretrained directory, a hub id, "
            f"or drop model.path to use the embedded default"
        )
    return path  # a hub id such as "Qwen/Qwen2.5-0.5B-Instruct"


def load_tokenizer(path: str, trust_remote_code: bool = False):
    from transformers import AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)
    except Exception as err:  # noqa: BLE001
        raise ModelLoadError(f"cannot load a tokenizer from {path!r} ({_first_line(err)})") from None
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    if getattr(tokenizer, "chat_template", None) is None:
        raise ModelLoadError(
            f"the tokenizer at {path!r} has no chat_template; use an instruct/reasoning model or add a "
            f"chat template to its tokenizer_config.json"
        )
    return tokenizer


def load_causal_lm(path: str, dtype: str = "float32", trust_remote_code: bool = False) -> torch.nn.Module:
    from transformers import AutoModelForCausalLM

    try:
        model = AutoModelForCausalLM.from_pretrained(path, dtype=DTYPES[dtype], trust_remote_code=trust_remote_code)
    except OSError as err:
        raise ModelLoadError(
            f"cannot load model {path!r}: {_first_line(err)} -- no such local directory, and the hub "
            f"is unreachable or has no such model; use a local save_pretrained directory"
        ) from None
    except Exception as err:  # noqa: BLE001
        raise ModelLoadError(f"cannot load model {path!r} as a causal LM ({_first_line(err)})") from None
    return model


def eos_token_ids(model: torch.nn.Module, tokenizer) -> list[int]:
    """All ids that end a response: the tokenizer's EOS plus the generation config's."""
    ids: set[int] = set()
    if getattr(tokenizer, "eos_token_id", None) is not None:  # tokenizer may be None (the model's config only)
        ids.add(int(tokenizer.eos_token_id))
    gen_cfg = getattr(model, "generation_config", None)
    gen_eos = getattr(gen_cfg, "eos_token_id", None)
    if isinstance(gen_eos, int):
        ids.add(gen_eos)
    elif isinstance(gen_eos, (list, tuple)):
        ids.update(int(i) for i in gen_eos)
    if not ids:
        raise ModelLoadError("the model has no EOS token id (tokenizer and generation_config); set one")
    return sorted(ids)


def _first_line(err: BaseException) -> str:
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__


def decode_responses(tokenizer, response_ids: list[list[int]], eos_ids: list[int]) -> list[str]:
    """Decode responses keeping special tokens such as ``</think>`` (graders need them), minus
    the final EOS / padding."""
    drop = set(eos_ids) | ({tokenizer.pad_token_id} if tokenizer.pad_token_id is not None else set())
    trimmed = []
    for ids in response_ids:
        end = len(ids)
        while end > 0 and ids[end - 1] in drop:
            end -= 1
        trimmed.append(list(ids[:end]))
    return tokenizer.batch_decode(trimmed, skip_special_tokens=False)
