"""Checkpoint manifests: what a checkpoint held when it was written, checked before it is used.

``manifest.json`` in a checkpoint lists every file (path relative to the checkpoint, size,
sha256); it is written after all files are fsynced and before the checkpoint's atomic rename, so
a checkpoint under a real name always has one. :func:`verify_checkpoint` finds a truncated,
deleted or changed file (and a missing tokenizer vocabulary) before anything is loaded, so resume
and export can fall back to an older checkpoint instead of crashing on it -- or training on a
tokenizer without a vocabulary.

Checkpoints written before manifests existed still load: their required files must be present,
their safetensors complete and their trainer state readable (said at debug level).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

log = logging.getLogger(__name__)

MANIFEST = "manifest.json"
VERSION = 1
# a tokenizer's vocabulary: without one it loads as a tokenizer of a few special tokens
TOKENIZER_VOCAB = ("tokenizer.json", "tokenizer.model", "vocab.json", "vocab.txt", "spiece.model", "*.tiktoken",
                   "tiktoken.model")  # one of them holds a saved tokenizer's vocabulary (checked without a manifest)


def sha256_file(path: Path, chunk: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def fsync_path(path: Path) -> None:
    """Flush a file's or a directory's data and metadata to the disk."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _files(directory: Path) -> list[Path]:
    return sorted(p for p in directory.rglob("*") if p.is_file() and p.name != MANIFEST)


def write_manifest(directory: Path) -> dict[str, Any]:
    """fsync every file under ``directory``, then write (and fsync) its manifest and the folders."""
    files = {}
    for path in _files(directory):
        fsync_path(path)
        files[path.relative_to(directory).as_posix()] = {"size": path.stat().st_size, "sha256": sha256_file(path)}
    manifest = {"version": VERSION, "files": files}
    with open(directory / MANIFEST, "w", encoding="utf-8") as f:
        json.dump(manifest, f, indent=1)
        f.flush()
        os.fsync(f.fileno())
    for folder in sorted((p for p in directory.rglob("*") if p.is_dir()), key=lambda p: -len(p.parts)):
        fsync_path(folder)
    fsync_path(directory)
    return manifest


@dataclass
class Verdict:
    """``ok``; else ``reason`` names the file and what is wrong with it. ``manifest``: checked
    against one (False: a checkpoint from before manifests, checked for completeness only)."""

    ok: bool
    reason: str = ""
    manifest: bool = True


def required_missing(checkpoint: Path, for_export: bool = False, vocab: bool = True) -> str | None:
    """The first file a checkpoint cannot do without that is missing, as a reason, or None.
    ``vocab``: also a tokenizer vocabulary file (checkpoints without a manifest; with one, a
    deleted tokenizer file is a listed file that is missing, whatever its name)."""
    model = checkpoint / "model"
    if not for_export and not (checkpoint / "trainer_state.pt").is_file():
        return "trainer_state.pt is missing"
    if not (model / "config.json").is_file():
        return "model/config.json is missing"
    if not any(model.glob("*.safetensors")) and not any(model.glob("*.bin")):
        return "model/model.safetensors is missing (no weights)"
    if vocab and not any(f.is_file() for name in TOKENIZER_VOCAB for f in model.glob(name)):
        return "model/tokenizer.json is missing (the tokenizer has no vocabulary)"
    return None


def _safetensors_complete(path: Path) -> str | None:
    """A safetensors file's size must be its header's 8 + header length + the end of its last tensor."""
    size = path.stat().st_size
    try:
        with open(path, "rb") as f:
            (length,) = struct.unpack("<Q", f.read(8))
            if length > size:
                raise ValueError
            header = json.loads(f.read(length))
        end = max((int(t["data_offsets"][1]) for k, t in header.items() if k != "__metadata__"), default=0)
    except (struct.error, ValueError, KeyError, TypeError, IndexError):
        return "has an unreadable header"
    if size != 8 + length + end:
        return f"has {size} bytes but its header needs {8 + length + end} (truncated)"
    return None


def _verify_legacy(checkpoint: Path, for_export: bool) -> Verdict:
    for path in sorted((checkpoint / "model").glob("*.safetensors")):
        problem = _safetensors_complete(path)
        if problem:
            return Verdict(False, f"{path.relative_to(checkpoint).as_posix()} {problem}", manifest=False)
    if not for_export:
        try:
            torch.load(checkpoint / "trainer_state.pt", map_location="cpu", weights_only=False)
        except Exception as err:  # noqa: BLE001 -- any failure to read it means it cannot be resumed
            return Verdict(False, f"trainer_state.pt cannot be read ({type(err).__name__})", manifest=False)
    log.debug("%s has no %s (written before rlspec verified checkpoints): its files are present and complete, "
              "their contents are not verified", checkpoint, MANIFEST)
    return Verdict(True, manifest=False)


def verify_checkpoint(checkpoint: Path, for_export: bool = False) -> Verdict:
    """Check a checkpoint against its manifest (``for_export``: only what an export reads,
    ``model/`` and ``drafter/``). The reason of a failure names the file, relative to the checkpoint."""
    checkpoint = Path(checkpoint)
    if not checkpoint.is_dir():
        return Verdict(False, "is not a directory")
    path = checkpoint / MANIFEST
    missing = required_missing(checkpoint, for_export, vocab=not path.is_file())
    if missing:
        return Verdict(False, missing)
    if not path.is_file():
        return _verify_legacy(checkpoint, for_export)
    try:
        files = dict(json.loads(path.read_text())["files"])
    except (OSError, ValueError, KeyError, TypeError):
        return Verdict(False, f"{MANIFEST} is unreadable")
    for rel, entry in files.items():
        if for_export and not rel.startswith(("model/", "drafter/")):
            continue
        file = checkpoint / rel
        if not file.is_file():
            return Verdict(False, f"{rel} is missing")
        size = file.stat().st_size
        if size != entry["size"]:
            return Verdict(False, f"{rel} has {size} bytes, the manifest {entry['size']}"
                                  f"{' (truncated)' if size < entry['size'] else ''}")
        if sha256_file(file) != entry["sha256"]:
            return Verdict(False, f"{rel} does not match its sha256 in the manifest (changed after it was written)")
    return Verdict(True)
