"""Loading the policy (and reference) model and tokenizer: a local ``save_pretrained`` directory,
a hub id, or a GGUF file (``model.path=FILE.gguf``, or ``model.gguf_file=NAME`` inside ``model.path``).

A GGUF file is dequantized to ``model.dtype`` and its weights copied into a fresh model built from
its config: transformers refuses to ``save_pretrained`` a GGUF-loaded model. That model and the
file's tokenizer are saved once as a normal HF directory in the model cache
(:func:`gguf_model_dir`, ``$RLSPEC_HOME/models/gguf-...``), which the run then loads like any
other: checkpoints and ``rlspec.export`` always write a normal HF directory (config.json,
safetensors, tokenizer), and the second run skips the dequantization. Reading GGUF needs the ``gguf`` and ``accelerate`` packages (``pip install
'rlspec[gguf]'``). ``model.path=null``, the embedded default, is resolved by
:func:`rlspec.embedded.resolve_model_path`.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import logging
import os
import shutil
import tempfile
from pathlib import Path
from typing import Callable

import torch

from rlspec.errors import ModelLoadError

log = logging.getLogger(__name__)

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
GGUF_PACKAGES = ("gguf", "accelerate")  # transformers reads GGUF with gguf>=0.10 and needs accelerate to load it
GGUF_FIX = "pip install gguf accelerate (or pip install 'rlspec[gguf]')"


def is_gguf(path: str | os.PathLike) -> bool:
    """Whether ``path`` names a GGUF file (by its suffix; :func:`check_model_path` checks it exists)."""
    return str(path).lower().endswith(".gguf")


def gguf_source(path: str | None, gguf_file: str | None) -> str | None:
    """``model.path`` with ``model.gguf_file`` folded in: the path of the ``.gguf`` file (fetched
    from the hub when ``model.path`` is a hub id), or ``path`` itself without a ``gguf_file``."""
    if gguf_file is None:
        return path
    if path is None:
        raise ModelLoadError(f"model.gguf_file={gguf_file!r} needs model.path: the directory or hub id holding it "
                             f"(or give the file itself as model.path=/path/to/{gguf_file})")
    if not is_gguf(gguf_file):
        raise ModelLoadError(f"model.gguf_file={gguf_file!r} is not a .gguf file name")
    expanded = os.path.expanduser(path)
    if os.path.isdir(expanded):
        file = os.path.join(expanded, gguf_file)
        if not os.path.isfile(file):
            found = ", ".join(sorted(p.name for p in Path(expanded).glob("*.gguf"))) or "none"
            raise ModelLoadError(f"model.gguf_file={gguf_file!r}: no such file in {path} (GGUF files there: {found})")
        return file
    try:  # a hub id: fetch that one file
        from huggingface_hub import hf_hub_download

        return hf_hub_download(path, gguf_file)
    except Exception as err:  # noqa: BLE001
        raise ModelLoadError(f"cannot fetch {gguf_file!r} from the hub repo {path!r} ({_first_line(err)}); download "
                             f"it and set model.path=/path/to/{gguf_file}") from None


def check_model_path(path: str) -> str:
    """A local ``save_pretrained`` directory or ``.gguf`` file (``~`` expanded) or a hub id; a path
    that cannot be either raises ModelLoadError naming the fix."""
    expanded = os.path.expanduser(path)
    if is_gguf(expanded):
        if not os.path.isfile(expanded):
            raise ModelLoadError(f"model.path={path!r}: no such GGUF file; point it at an existing .gguf file, or "
                                 f"set model.path=DIR model.gguf_file=NAME.gguf")
        return expanded
    if os.path.isdir(expanded):
        if not os.path.isfile(os.path.join(expanded, "config.json")):
            ggufs = sorted(p.name for p in Path(expanded).glob("*.gguf"))
            hint = f"; for its GGUF file add model.gguf_file={ggufs[0]}" if ggufs else ""
            raise ModelLoadError(
                f"model.path={path!r} is a directory without config.json; point it at a "
                f"save_pretrained directory (config.json + weights + tokenizer){hint}"
            )
        return expanded
    if os.path.exists(expanded) or path.startswith((".", "/", "~")) or path.count("/") > 1:
        raise ModelLoadError(
            f"model.path={path!r} does not exist; point it at a save_pretrained directory, a .gguf file, a hub id, "
            f"or drop model.path to use the embedded default"
        )
    return path  # a hub id such as "Qwen/Qwen2.5-0.5B-Instruct"


def require_gguf_packages(path: str) -> None:
    """One error naming the install when transformers cannot read ``path`` (a GGUF file)."""
    missing = [name for name in GGUF_PACKAGES if importlib.util.find_spec(name) is None]
    if missing:
        raise ModelLoadError(f"{path} is a GGUF file, and reading it needs the {' and '.join(missing)} "
                             f"package{'s' if len(missing) > 1 else ''}: {GGUF_FIX}")


def _source_kwargs(path: str) -> tuple[str, dict[str, str]]:
    """``(from_pretrained path, extra kwargs)``: a GGUF file loads as its directory + ``gguf_file``."""
    if not is_gguf(path):
        return path, {}
    require_gguf_packages(path)
    directory, name = os.path.split(os.path.abspath(os.path.expanduser(path)))
    return directory, {"gguf_file": name}


def load_tokenizer(path: str, trust_remote_code: bool = False):
    """The tokenizer of ``path`` (a GGUF file's own), with a pad token. A tokenizer without a chat
    template loads: :func:`rlspec.data.build_prompt_texts` refuses it only for ``data.prompt_template=chat``."""
    from transformers import AutoTokenizer

    source, extra = _source_kwargs(path)
    try:
        tokenizer = AutoTokenizer.from_pretrained(source, trust_remote_code=trust_remote_code, **extra)
    except Exception as err:  # noqa: BLE001
        raise ModelLoadError(f"cannot load a tokenizer from {path!r} ({_first_line(err)})") from None
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def load_causal_lm(path: str, dtype: str = "float32", trust_remote_code: bool = False) -> torch.nn.Module:
    """The causal LM at ``path`` in ``dtype``; a GGUF file from its dequantized directory (:func:`gguf_model_dir`)."""
    from transformers import AutoModelForCausalLM

    if is_gguf(path):
        path = str(gguf_model_dir(path, dtype, trust_remote_code))
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


def load_gguf_model(path: str, dtype: str = "float32", trust_remote_code: bool = False) -> torch.nn.Module:
    """A GGUF file dequantized to ``dtype``, as a plain model that ``save_pretrained`` can write:
    its weights copied into ``AutoModelForCausalLM.from_config`` of its config (without the
    ``quantization_config`` that makes transformers refuse to save it)."""
    from transformers import AutoModelForCausalLM

    source, extra = _source_kwargs(path)
    try:
        loaded = AutoModelForCausalLM.from_pretrained(source, dtype=DTYPES[dtype], trust_remote_code=trust_remote_code,
                                                      **extra)
    except Exception as err:  # noqa: BLE001
        raise ModelLoadError(f"cannot load the GGUF file {path} as a causal LM ({_first_line(err)}); transformers "
                             f"reads GGUF files of the architectures it lists in GGUF_SUPPORTED_ARCHITECTURES") from None
    config = loaded.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    if not getattr(config, "architectures", None):
        config.architectures = [type(loaded).__name__]  # GGUF configs carry none; the engines read it
    plain = AutoModelForCausalLM.from_config(config, dtype=DTYPES[dtype], trust_remote_code=trust_remote_code)
    missing, unexpected = plain.load_state_dict(loaded.state_dict(), strict=False)
    tied = getattr(config, "tie_word_embeddings", False) or getattr(config.get_text_config(), "tie_word_embeddings", False)
    missing = [k for k in missing if not (tied and k == "lm_head.weight")]
    if missing or unexpected:
        raise ModelLoadError(f"the GGUF file {path} does not fill its model: missing {missing[:3]}, unexpected "
                             f"{unexpected[:3]}; convert it with transformers (from_pretrained + save_pretrained)")
    if tied:
        plain.tie_weights()
    plain.generation_config = loaded.generation_config
    del loaded
    return plain.eval()


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


_GGUF_MARKER = "gguf_source.json"  # written last: its presence means the directory is complete


def gguf_model_dir(path: str, dtype: str = "float32", trust_remote_code: bool = False,
                   cache_root: str | os.PathLike | None = None, progress: bool = True) -> Path:
    """The HF directory (model in ``dtype`` + tokenizer) of the GGUF file ``path``, converted on
    first use into ``<cache root>/models/gguf-<name>-<hash>`` (the cache root of the embedded
    models: ``$RLSPEC_HOME`` or ``~/.cache/rlspec``); keyed by the file's path, size and mtime and
    the dtype. Any other ``path`` is returned as it is. Built under a file lock in a temporary
    directory moved into place, so a reader never sees half of it."""
    if not is_gguf(path):
        return Path(path)
    file = Path(check_model_path(path)).resolve()
    stat = file.stat()
    key = hashlib.sha256(json.dumps([str(file), stat.st_size, stat.st_mtime_ns, dtype]).encode()).hexdigest()[:12]
    root = Path(cache_root).expanduser() if cache_root is not None else default_cache_dir()
    final = root / "models" / f"gguf-{file.stem.lower()}-{dtype}-{key}"

    def complete(directory: Path) -> bool:
        return (directory / _GGUF_MARKER).is_file()

    def convert(tmp: Path) -> None:
        if progress:
            print(f"dequantizing {file.name} to {dtype} into {final} (once)", flush=True)
        load_gguf_model(str(file), dtype, trust_remote_code).save_pretrained(tmp)
        load_tokenizer(str(file), trust_remote_code).save_pretrained(tmp)
        (tmp / _GGUF_MARKER).write_text(json.dumps({"gguf": str(file), "size": stat.st_size, "dtype": dtype}) + "\n")

    if complete(final):
        return final
    final.parent.mkdir(parents=True, exist_ok=True)
    return build_dir_once(final, convert, complete)


def default_cache_dir() -> Path:
    """``$RLSPEC_HOME`` if set, else ``~/.cache/rlspec`` (the embedded models and converted GGUF files)."""
    home = os.environ.get("RLSPEC_HOME")
    return Path(home).expanduser() if home else Path.home() / ".cache" / "rlspec"


def build_dir_once(final: Path, build: Callable[[Path], None], is_complete: Callable[[Path], bool]) -> Path:
    """``final``, made by ``build(tmp)`` unless ``is_complete(final)``: under a file lock, in a
    temporary sibling directory moved into place with ``os.replace``, so a reader never sees half
    of it and a crashed build's leftover is replaced."""
    from filelock import FileLock

    with FileLock(str(final) + ".lock"):
        if is_complete(final):  # another process built it while we waited
            return final
        tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}-", dir=final.parent))
        try:
            build(tmp)
            if final.exists():  # an incomplete leftover from a crashed build
                shutil.rmtree(final)
            os.replace(tmp, final)
        finally:
            if tmp.exists():
                shutil.rmtree(tmp, ignore_errors=True)
    return final
