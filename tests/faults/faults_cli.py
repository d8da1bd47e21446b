"""Helpers of the fault suite: the real training CLI on the tiny preset, as a subprocess.

``PATCHED`` runs the CLI in a child whose ``rlspec.checkpoint`` hooks are replaced first (a slow
or failing checkpoint write), so a kill or a full disk lands inside a save deterministically.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable

from conftest import TINY_OVERRIDES

# no start/end evaluation: the faults are in training and checkpoints
FAST = [*TINY_OVERRIDES, "eval.at_start=false", "eval.at_end=false", "logger.plot=false",
        "trainer.save_total_limit=10"]
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}

# python -c PATCHED <hook> <marker> <cli args...>: hook "slow_manifest:N" sleeps in the manifest
# write of step N after touching <marker>; "enospc" makes every trainer_state.pt write fail with ENOSPC;
# "hold_step:N" holds the start of step N after touching <marker> until <marker>.go exists or a
# signal asked the run to stop (then step N runs); "hold_stop:N" holds it likewise, and once a signal
# asked to stop touches <marker>.stopping and sleeps inside step N (a second signal must end it)
PATCHED = r"""
import errno, sys, time
from pathlib import Path
import rlspec.checkpoint as ck
hook, marker, args = sys.argv[1], Path(sys.argv[2]), sys.argv[3:]
if hook.startswith(("hold_step:", "hold_stop:")):
    from rlspec.trainers.grpo import GRPOTrainer
    step, real_step = int(hook.split(":")[1]), GRPOTrainer.train_step
    def held(self):
        if self.global_step + 1 == step:
            marker.write_text("held")
            go, deadline = marker.with_name(marker.name + ".go"), time.monotonic() + 240
            while self.stop_requested is None and not go.exists() and time.monotonic() < deadline:
                time.sleep(0.02)
            if hook.startswith("hold_stop:") and self.stop_requested is not None:
                marker.with_name(marker.name + ".stopping").write_text(self.stop_requested)
                time.sleep(240)
        return real_step(self)
    GRPOTrainer.train_step = held
elif hook.startswith("slow_manifest:"):
    step, real = int(hook.split(":")[1]), ck.write_manifest
    def slow(directory):
        if directory.name.startswith(ck.step_dir_name(step) + ".tmp-"):
            marker.write_text(directory.name)
            time.sleep(120)
        return real(directory)
    ck.write_manifest = slow
elif hook == "enospc":
    def full(obj, f, *a, **k):
        raise OSError(errno.ENOSPC, "No space left on device")
    ck.torch.save = full
from rlspec.train import main
sys.argv = ["rlspec.train"]
main(args)
"""


def cli(run_dir: Path, *overrides: str, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "rlspec.train", *FAST, f"run_dir={run_dir}", *overrides],
                          capture_output=True, text=True, timeout=timeout, env=ENV)


def start(run_dir: Path, *overrides: str, patched: tuple[str, Path] | None = None) -> subprocess.Popen:
    """The CLI in the background (stdout/stderr piped: read them with ``communicate``)."""
    head = [sys.executable, "-c", PATCHED, patched[0], str(patched[1])] if patched else [sys.executable, "-m", "rlspec.train"]
    return subprocess.Popen([*head, *FAST, f"run_dir={run_dir}", *overrides], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=ENV)


def wait_for(condition: Callable[[], bool], proc: subprocess.Popen | None = None, timeout: float = 240) -> None:
    deadline = time.time() + timeout
    while not condition():
        if proc is not None and proc.poll() is not None:
            out, err = proc.communicate()
            raise AssertionError(f"the run ended (rc {proc.returncode}) first: {err[-3000:]}")
        if time.time() > deadline:
            raise AssertionError("timed out")
        time.sleep(0.02)


def train_steps(run_dir: Path) -> list[int]:
    """The steps in ``metrics.jsonl`` that trained (in file order, repeats kept)."""
    path = run_dir / "metrics.jsonl"
    if not path.is_file():
        return []
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return [r["step"] for r in rows if "reward/mean" in r]


def rlspec_lines(stderr: str) -> list[str]:
    """The lines rlspec itself wrote to stderr (errors, warnings, stop notices)."""
    return [line for line in stderr.splitlines() if line.startswith("rlspec: ")]
