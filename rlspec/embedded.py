"""The embedded default: a small reasoning model that over-thinks, built locally in minutes.

:func:`get_embedded_model_path` builds (once, then caches) the model of an
:class:`~rlspec.embedded_config.EmbeddedModelConfig` (:mod:`rlspec.embedded_build` says how): a
small ``Qwen2ForCausalLM`` that solves most procedural math problems but spends most of its tokens
re-checking -- the over-thinking that efficient-reasoning RL should remove while keeping accuracy.
No hub access is needed; the output directory loads with plain
``AutoModelForCausalLM.from_pretrained`` / ``AutoTokenizer.from_pretrained``.
:func:`get_embedded_drafter_path` warms up and caches its EAGLE drafter.

Cache layout (``$RLSPEC_HOME`` or ``~/.cache/rlspec``)::

    models/embedded-<hash>/   config.json, model.safetensors, generation_config.json,
                              tokenizer files, train.jsonl, test.jsonl, build_card.json
    models/embedded-<hash>.lock

``<hash>`` hashes the build config and the build version, so variants never collide.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Sequence

import torch

from rlspec.embedded_build import build_embedded_model, build_threads
from rlspec.embedded_config import BUILD_VERSION, EmbeddedModelConfig
from rlspec.errors import ModelLoadError
from rlspec.models import build_dir_once, check_model_path, default_cache_dir
from rlspec.rollout.speculative.warmup import warmup_drafter

__all__ = ["BUILD_VERSION", "EmbeddedModelConfig", "default_cache_dir", "get_embedded_drafter_path",
           "get_embedded_model_path", "resolve_model_path"]


def get_embedded_model_path(
    cfg: EmbeddedModelConfig | None = None, cache_dir: str | os.PathLike | None = None, progress: bool = True
) -> Path:
    """The directory of the embedded model for ``cfg``, building it on first use.

    Safe to call from several processes: the build holds a file lock, happens in a temporary
    directory and is moved into place with ``os.replace``, so a reader never sees half a model.
    """
    cfg = cfg or EmbeddedModelConfig()
    root = Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()
    models_dir = root / "models"
    final = models_dir / f"embedded-{cfg.cache_key()}"
    if _is_complete(final):
        return final
    try:
        models_dir.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise ModelLoadError(f"cannot create the model cache {models_dir}: {err}. "
                             f"Set RLSPEC_HOME to a writable directory.") from err
    return build_dir_once(final, lambda tmp: build_embedded_model(cfg, tmp, progress=progress), _is_complete)


def _is_complete(path: Path) -> bool:
    return (path / "build_card.json").is_file() and (path / "model.safetensors").is_file()


def resolve_model_path(path: str | None, embedded_preset: str = "default") -> str:
    """``model.path``: ``None`` -> the embedded default of ``embedded_preset`` (built and cached on
    first use); else a local directory or a hub id (:func:`rlspec.models.check_model_path`)."""
    if path is not None:
        return check_model_path(path)
    cfg = EmbeddedModelConfig.tiny() if embedded_preset == "tiny" else EmbeddedModelConfig()
    return str(get_embedded_model_path(cfg))


# ---------------------------------------------------------------------------------- drafter


DRAFTER_VERSION = "1"  # bump when the drafter warm-up recipe changes


def get_embedded_drafter_path(model_dir: Path, model, tokenizer, prompts: Sequence[Sequence[int]], steps: int,
                              num_prompts: int = 256, progress: bool = True) -> Path:
    """The EAGLE drafter of the embedded model in ``model_dir``, warmed up once on the model's own
    generations (TLT's offline warm-up, :func:`rlspec.rollout.speculative.warmup.warmup_drafter`) and cached
    beside it as ``<model_dir>-drafter-<steps>-v<DRAFTER_VERSION>/`` (built under a file lock in a
    temporary directory, moved into place atomically)."""
    final = model_dir.parent / f"{model_dir.name}-drafter-{steps}-v{DRAFTER_VERSION}"
    is_complete = lambda path: (path / "drafter_config.json").is_file()  # noqa: E731
    if is_complete(final):
        return final
    log = print if progress else (lambda *a, **k: None)

    def build(tmp: Path) -> None:
        log(f"warming up the embedded model's drafter ({steps} steps on its own generations) into {final}")
        prev = torch.get_num_threads()
        torch.set_num_threads(build_threads())
        try:
            drafter, metrics = warmup_drafter(model, tokenizer, [list(p) for p in prompts[:num_prompts]], steps,
                                              max_new_tokens=512, log=log)
        finally:
            torch.set_num_threads(prev)
        drafter.save(tmp)
        after = metrics.get("eval_after") or {}
        (tmp / "warmup.json").write_text(json.dumps(
            {"steps": steps, "eval_before": metrics.get("eval_before"), "eval_after": after}, indent=2, default=str))

    return build_dir_once(final, build, is_complete)
