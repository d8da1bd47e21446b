"""The vLLM backend's model copies of killed processes are removed by the next engine start."""

import os
import subprocess
import sys
import tempfile
from pathlib import Path

from rlspec.rollout.vllm_engine import _remove_orphaned_workdirs


def test_orphaned_model_copies_are_removed_and_live_ones_kept():
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()
    dead = Path(tempfile.mkdtemp(prefix=f"rlspec-vllm-{gone.pid}-"))
    live = Path(tempfile.mkdtemp(prefix=f"rlspec-vllm-{os.getppid()}-"))  # the test runner's parent: alive
    mine = Path(tempfile.mkdtemp(prefix=f"rlspec-vllm-{os.getpid()}-"))
    try:
        _remove_orphaned_workdirs()
        assert not dead.exists()
        assert live.exists() and mine.exists()
    finally:
        for p in (dead, live, mine):
            if p.exists():
                p.rmdir()
