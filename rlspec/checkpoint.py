"""Atomic checkpoints and resume.

Layout::

    run_dir/checkpoints/step_000010/
        model/                 HF save_pretrained dir: weights, config, generation_config, tokenizer
        trainer_state.pt       optimizer, scheduler, RNG states, data cursor, step
        meta.json              step, time, metrics of that step
    run_dir/checkpoints/latest  text file with the newest complete checkpoint's name

A checkpoint is written to ``step_N.tmp-<pid>`` and renamed into place (``os.replace``), and
``latest`` is updated last, so a crash at any moment leaves the previous checkpoint intact and
never a half-written one under a real name.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from pathlib import Path
from typing import Any

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
    extras: dict[str, Any] | None = None,
) -> Path:
    """Write checkpoint ``step`` atomically, point ``latest`` at it, rotate older ones.

    ``keep`` newest step checkpoints are kept; names in ``protected`` are never rotated away.
    ``extras`` maps a sub-directory name to a function that writes it (inside the same atomic
    write as the model), e.g. the rollout engine's drafter.
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
    for name, write in (extras or {}).items():  # e.g. "drafter": the online-trained EAGLE drafter
        write(tmp / name)
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
    import random

    import numpy as np

    return {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}


def set_rng_state(state: dict[str, Any]) -> None:
    import random

    import numpy as np

    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
