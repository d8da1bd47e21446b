"""Atomic checkpoints and resume.

Layout::

    run_dir/checkpoints/step_000010/
        model/                 HF save_pretrained dir: weights, config, generation_config, tokenizer
        trainer_state.pt       optimizer, scheduler, RNG states, data cursor, step
        meta.json              step, time, metrics of that step
        manifest.json          every file's path, size and sha256 (:mod:`rlspec.manifest`)
    run_dir/checkpoints/latest  text file with the newest complete checkpoint's name

A checkpoint is written to ``step_N.tmp-<pid>``, its files fsynced and listed in its manifest,
then renamed into place (``os.replace``), and ``latest`` is updated last, so a crash at any moment
leaves the previous checkpoint intact and never a half-written one under a real name. Resume
verifies the manifest and falls back to the newest checkpoint that verifies (:func:`select_checkpoint`);
a full disk while saving is one line naming the run dir, with the temporary folder removed. :class:`Checkpointer` writes and restores a run's
checkpoints: the policy, the trainer's state, DeepSpeed's shards and the checkpoint *parts* that
other pieces own (the speculative drafter: ``drafter/``, ``spot_trainer/``).
"""

from __future__ import annotations

import errno
import json
import os
import random
import shutil
import sys
import time
from pathlib import Path
from typing import Any, Callable, Protocol, Sequence

import numpy as np
import torch

from rlspec.errors import CheckpointError, RLSpecError
from rlspec.manifest import fsync_path, verify_checkpoint, write_manifest

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
    try:
        if tmp.exists():
            shutil.rmtree(tmp)
        tmp.mkdir()
        model.save_pretrained(tmp / "model", safe_serialization=True)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp / "model")
        with open(tmp / "trainer_state.pt", "wb") as f:  # a file object: a full disk is an OSError, not
            torch.save(trainer_state, f)  # torch's "unexpected pos" / "iostream error"
        for write in writers:  # e.g. the online-trained EAGLE drafter
            write(tmp)
        (tmp / "meta.json").write_text(json.dumps({"step": step, "time": time.time(), **(meta or {})}, indent=2))
        write_manifest(tmp)  # fsyncs every file and folder first
        if final.exists():  # re-saving the same step (e.g. after a resume): replace it
            shutil.rmtree(final)
        os.replace(tmp, final)
        fsync_path(root)
        _write_text_atomic(root / LATEST, final.name)
        fsync_path(root)
    except Exception as err:
        free = _free_bytes(root)
        shutil.rmtree(tmp, ignore_errors=True)
        if _disk_full(err, free):
            previous = find_latest_checkpoint(run_dir)
            kept = f"the previous checkpoint {previous.name} is intact" if previous else "no earlier checkpoint exists"
            raise CheckpointError(
                f"no space left on the device of run_dir={Path(run_dir)} while saving {final.name} "
                f"({_human(free)} free; the partial checkpoint was removed, {kept}); free some space and "
                f"re-run the same command to resume") from None
        raise
    _rotate(root, keep, protected + (final.name,))
    return final


def _free_bytes(path: Path) -> int:
    try:
        return shutil.disk_usage(path).free
    except OSError:
        return -1


def _human(n: int) -> str:
    if n < 0:
        return "unknown space"
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TiB"


def _disk_full(err: BaseException, free: int) -> bool:
    """ENOSPC / EDQUOT anywhere in the error's chain, or its text (safetensors reports the OS
    error as text), or a write that failed with under 1 MiB left on the disk."""
    seen: BaseException | None = err
    while seen is not None:
        if isinstance(seen, OSError) and seen.errno in (errno.ENOSPC, errno.EDQUOT):
            return True
        if "No space left on device" in str(seen) or "os error 28" in str(seen):
            return True
        seen = seen.__cause__ or seen.__context__
    return 0 <= free < 2**20


def _rotate(root: Path, keep: int, protected: tuple[str, ...]) -> None:
    steps = _step_dirs(root)
    for old in steps[:-keep] if keep > 0 else []:
        if old.name not in protected:
            shutil.rmtree(old, ignore_errors=True)


def is_complete(path: Path) -> bool:
    return (path / "trainer_state.pt").is_file() and (path / "model" / "config.json").is_file()


def _step_dirs(root: Path) -> list[Path]:
    return sorted(p for p in root.glob("step_*") if p.is_dir() and ".tmp-" not in p.name)


def find_latest_checkpoint(run_dir: str | Path) -> Path | None:
    """The newest checkpoint that looks complete, or None (its files are not verified: see
    :func:`select_checkpoint`). Read-only: leftover ``*.tmp-*`` folders are removed under the
    run lock at start-up (:func:`rlspec.run_lock.remove_stale_temps`)."""
    root = checkpoint_root(run_dir)
    if not root.is_dir():
        return None
    latest_file = root / LATEST
    if latest_file.is_file():
        candidate = root / latest_file.read_text().strip()
        if is_complete(candidate):
            return candidate
    complete = [p for p in _step_dirs(root) if is_complete(p)]
    return complete[-1] if complete else None


def newest_verified(candidates: Sequence[Path], for_export: bool = False) -> tuple[Path | None, list[str]]:
    """The first of ``candidates`` (newest first) that verifies, and ``"name (reason)"`` for each
    one skipped before it."""
    skipped = []
    for path in candidates:
        verdict = verify_checkpoint(path, for_export)
        if verdict.ok:
            return path, skipped
        skipped.append(f"{path.name} ({verdict.reason})")
    return None, skipped


def warn_line(message: str) -> None:
    """One warning line on stderr (``warnings.warn`` would add the source line)."""
    print(f"rlspec: warning: {message}", file=sys.stderr, flush=True)


def select_checkpoint(run_dir: str | Path, resume: str) -> tuple[Path | None, str]:
    """The checkpoint ``trainer.resume`` resumes from and a warning (empty if none).

    ``auto``: the newest checkpoint of the run that verifies (None if the run has none); a path:
    that checkpoint, or else the newest older one beside it that verifies. Checkpoints that fail
    verification are skipped and named in the warning; if none verifies, a :class:`CheckpointError`
    names each one's damaged file.
    """
    if resume == "auto":
        root = checkpoint_root(run_dir)
        candidates = _step_dirs(root)[::-1] if root.is_dir() else []
        if not candidates:
            return None, ""
    else:
        path = Path(resume).expanduser()
        if not path.is_dir():
            raise CheckpointError(f"trainer.resume={resume}: no such directory; point it at a "
                                  f"checkpoints/step_N directory or use trainer.resume=auto")
        older = [p for p in _step_dirs(path.parent)[::-1] if p.name < path.name] if path.name.startswith("step_") else []
        candidates, root = [path, *older], path.parent
    chosen, skipped = newest_verified(candidates)
    if chosen is None:
        raise CheckpointError(
            f"no checkpoint in {root} verifies: {'; '.join(skipped)}; restore the damaged file, point "
            f"trainer.resume=PATH at a checkpoint that verifies, or start over with a new run_name=...")
    warning = f"skipped damaged checkpoint {'; '.join(skipped)}; resuming from {chosen.name}" if skipped else ""
    return chosen, warning


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
        shards: list[Path] = []
        writer = None  # the main rank's pid names the shared temporary folders (a dead writer's are removed)
        for subdir, owner in sharded_owners:
            if owner.name != "deepspeed":
                continue
            writer = writer if writer is not None else self.strategy.broadcast_object(os.getpid())
            sharded = checkpoint_root(self.run_dir) / f"{name}.tmp-{writer}-{subdir}"
            if self.strategy.is_main:
                shutil.rmtree(sharded, ignore_errors=True)
                sharded.mkdir(parents=True)
            self.strategy.barrier()
            owner.save_sharded(sharded)
            self.strategy.barrier()
            writers.append(lambda checkpoint, src=sharded, dst=subdir: os.replace(src, checkpoint / dst))
            shards.append(sharded)
        path = checkpoint_root(self.run_dir) / name
        if self.strategy.is_main:
            try:
                path = save_checkpoint(
                    self.run_dir, step, self.model, self.tokenizer, trainer_state(),
                    meta={"run_name": self.run_name, "tags": sorted(t for t, ns in self.tags.items() if name in ns)},
                    keep=self.keep, protected=tuple(n for names in self.tags.values() for n in names), writers=writers,
                )
            finally:  # shards not moved into the checkpoint (a failed save) are not left behind
                for sharded in shards:
                    shutil.rmtree(sharded, ignore_errors=True)
            if self.tags:
                (path.parent / "tags.json").write_text(json.dumps(self.tags, indent=2))
        self.strategy.barrier()
        return path

    def resume(self, resume: str, seed: int) -> tuple[Path, dict[str, Any]] | None:
        """Apply ``trainer.resume`` (``auto``: the newest checkpoint that verifies, ``disable``, or a
        path, falling back to an older one that verifies): load the policy weights, DeepSpeed's
        shards and the parts; return ``(path, trainer state)``. The main rank verifies and chooses,
        every rank loads that checkpoint (so each rank's shards are checked by the manifest)."""
        if resume == "disable":
            return None
        choice: tuple[str | None, str] = (None, "")
        if self.strategy.is_main:
            try:
                path, warning = select_checkpoint(self.run_dir, resume)
                choice = (str(path) if path is not None else None, warning)
            except CheckpointError as err:
                choice = (None, f"error: {err}")
        found, message = self.strategy.broadcast_object(choice)
        if message.startswith("error: "):
            raise CheckpointError(message[len("error: "):])
        if message and self.strategy.is_main:
            warn_line(message)
        if found is None:
            return None
        path = Path(found)
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
