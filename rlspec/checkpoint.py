"""Atomic checkpoints and resume.

Layout::

    run_dir/checkpoints/step_000010/
        model/                 HF save_pretrained dir: weights, config, generation_config, tokenizer
        trainer_state.pt       optimizer, scheduler, RNG states, data cursor, step
        meta.json              step, time, metrics of that step
    run_dir/checkpoints/latest  text file with the newest complete checkpoint's name

A checkpoint is written to ``step_N.tmp-<pid>`` and renamed into place (``os.replace``), and
``latest`` is updated last, so a crash at any moment leaves the previous checkpoint intact and
never a half-written one under a real name. :class:`Checkpointer` writes and restores a run's
checkpoints: the policy, the trainer's state, DeepSpeed's shards and the checkpoint *parts* that
other pieces own (the speculative drafter: ``drafter/``, ``spot_trainer/``).
"""

from __future__ import annotations

import json
import os
import random
import shutil
import time
from pathlib import Path
from typing import Any, Callable, Protocol, Sequence

import numpy as np
import torch

from rlspec.errors import RLSpecError

LATEST = "latest"


def checkpoint_root(run_dir: str | Path) -> Path:
    return Path(run_dir) / "checkpoints"


def step_dir_name(step: int) -> str:
    return f"step_{step:06d}"


def _write_text_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def save_checkpoint(
    run_dir: str | Path,
    step: int,
    model: torch.nn.Module,
    tokenizer: Any,
    trainer_state: dict[str, Any],
    meta: dict[str, Any] | None = None,
    keep: int = 2,
    protected: tuple[str, ...] = (),
    writers: Sequence[Callable[[Path], None]] = (),
) -> Path:
    """Write checkpoint ``step`` atomically, point ``latest`` at it, rotate older ones.

    ``keep`` newest step checkpoints are kept; names in ``protected`` are never rotated away.
    ``writers`` write more into the (temporary) checkpoint directory, inside the same atomic
    write as the model, e.g. the rollout engine's drafter.
    """
    root = checkpoint_root(run_dir)
    root.mkdir(parents=True, exist_ok=True)
    final = root / step_dir_name(step)
    tmp = root / f"{final.name}.tmp-{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    model.save_pretrained(tmp / "model", safe_serialization=True)
    if tokenizer is not None:
        tokenizer.save_pretrained(tmp / "model")
    torch.save(trainer_state, tmp / "trainer_state.pt")
    for write in writers:  # e.g. the online-trained EAGLE drafter
        write(tmp)
    (tmp / "meta.json").write_text(json.dumps({"step": step, "time": time.time(), **(meta or {})}, indent=2))
    if final.exists():  # re-saving the same step (e.g. after a resume): replace it
        shutil.rmtree(final)
    os.replace(tmp, final)
    _write_text_atomic(root / LATEST, final.name)
    _rotate(root, keep, protected + (final.name,))
    return final


def _rotate(root: Path, keep: int, protected: tuple[str, ...]) -> None:
    steps = sorted(p for p in root.glob("step_*") if p.is_dir() and ".tmp-" not in p.name)
    for old in steps[:-keep] if keep > 0 else []:
        if old.name not in protected:
            shutil.rmtree(old, ignore_errors=True)


def is_complete(path: Path) -> bool:
    return (path / "trainer_state.pt").is_file() and (path / "model" / "config.json").is_file()


def find_latest_checkpoint(run_dir: str | Path) -> Path | None:
    """The newest complete checkpoint of a run, or None. Leftover ``*.tmp-*`` dirs are removed."""
    root = checkpoint_root(run_dir)
    if not root.is_dir():
        return None
    for leftover in root.glob("*.tmp-*"):
        shutil.rmtree(leftover, ignore_errors=True) if leftover.is_dir() else leftover.unlink(missing_ok=True)
    latest_file = root / LATEST
    if latest_file.is_file():
        candidate = root / latest_file.read_text().strip()
        if is_complete(candidate):
            return candidate
    complete = sorted(p for p in root.glob("step_*") if p.is_dir() and is_complete(p))
    return complete[-1] if complete else None


def load_trainer_state(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    if not is_complete(path):
        raise RLSpecError(
            f"{path} is not a complete rlspec checkpoint (needs model/config.json and trainer_state.pt); "
            f"point trainer.resume at a checkpoints/step_N directory"
        )
    return torch.load(path / "trainer_state.pt", map_location="cpu", weights_only=False)


def rng_state() -> dict[str, Any]:
    return {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}


def set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])


class CheckpointPart(Protocol):
    """Something beyond the policy and the trainer state that a checkpoint keeps."""

    def save(self, checkpoint: Path) -> None:
        """Write into the (temporary) checkpoint directory."""

    def load(self, checkpoint: Path) -> None:
        """Restore from a complete checkpoint directory (after the policy weights)."""


class Checkpointer:
    """Writes and restores a run's checkpoints.

    ``strategy`` is the trainer's (:mod:`rlspec.trainers.strategy`): with DeepSpeed every rank first
    writes its optimizer partition into a shared temporary directory, which the main rank moves
    into the checkpoint inside the same atomic write. ``tags`` (e.g. SIRI's ``siri-low``) mark
    checkpoints and protect them from rotation; they are listed in ``checkpoints/tags.json``.
    """

    def __init__(self, run_dir: str | Path, model: torch.nn.Module, tokenizer: Any, strategy: Any, *, keep: int,
                 run_name: str, parts: Sequence[CheckpointPart] = ()) -> None:
        self.run_dir, self.model, self.tokenizer, self.strategy = Path(run_dir), model, tokenizer, strategy
        self.keep, self.run_name, self.parts = keep, run_name, list(parts)
        self.tags: dict[str, list[str]] = {}  # tag -> checkpoint dir names

    def save(self, step: int, trainer_state: Callable[[], dict[str, Any]], tag: str | None = None) -> Path:
        """Checkpoint ``step``; ``trainer_state()`` is taken once the tags include this one."""
        name = step_dir_name(step)
        if tag is not None and name not in self.tags.setdefault(tag, []):
            self.tags[tag].append(name)
        writers: list[Callable[[Path], None]] = [part.save for part in self.parts]
        # DeepSpeed: the policy's (and a part's own, e.g. the critic's) optimizer partitions
        sharded_owners = [("deepspeed", self.strategy)] + [
            (part.sharded_dir, part.strategy) for part in self.parts if getattr(part, "sharded_dir", None)]
        for subdir, owner in sharded_owners:
            if owner.name != "deepspeed":
                continue
            sharded = checkpoint_root(self.run_dir) / f"{name}.tmp-{subdir}"
            if self.strategy.is_main:
                shutil.rmtree(sharded, ignore_errors=True)
                sharded.mkdir(parents=True)
            self.strategy.barrier()
            owner.save_sharded(sharded)
            self.strategy.barrier()
            writers.append(lambda checkpoint, src=sharded, dst=subdir: os.replace(src, checkpoint / dst))
        path = checkpoint_root(self.run_dir) / name
        if self.strategy.is_main:
            path = save_checkpoint(
                self.run_dir, step, self.model, self.tokenizer, trainer_state(),
                meta={"run_name": self.run_name, "tags": sorted(t for t, ns in self.tags.items() if name in ns)},
                keep=self.keep, protected=tuple(n for names in self.tags.values() for n in names), writers=writers,
            )
            if self.tags:
                (path.parent / "tags.json").write_text(json.dumps(self.tags, indent=2))
        self.strategy.barrier()
        return path

    def resume(self, resume: str, seed: int) -> tuple[Path, dict[str, Any]] | None:
        """Apply ``trainer.resume`` (``auto``: the latest complete checkpoint, ``disable``, or a path):
        load the policy weights, DeepSpeed's shards and the parts; return ``(path, trainer state)``."""
        if resume == "disable":
            return None
        path = find_latest_checkpoint(self.run_dir) if resume == "auto" else Path(resume)
        if path is None:
            return None
        state = load_trainer_state(path)
        if state.get("seed") != seed:
            raise RLSpecError(
                f"checkpoint {path} was trained with trainer.seed={state.get('seed')} but the config says "
                f"{seed}; resume with the same seed or start a new run (run_name=...)"
            )
        from transformers import AutoModelForCausalLM

        saved = AutoModelForCausalLM.from_pretrained(path / "model", dtype=next(self.model.parameters()).dtype)
        self.model.load_state_dict(saved.state_dict())
        self.strategy.load_sharded(path)  # DeepSpeed: optimizer partitions (and ZeRO's master weights)
        for part in self.parts:
            part.load(path)
        return path, state
