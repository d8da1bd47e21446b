"""SIGTERM and SIGINT stop a run cleanly: the current step finishes, a checkpoint is saved, one
line says how to resume, and the process exits 143 (SIGTERM) or 130 (SIGINT), the shell's
128 + signal number. A second signal exits at once (the last checkpoint stays the resume point).

:class:`StopOnSignal` is installed by the run wiring (:func:`rlspec.session.run`) around a run;
the trainer checks its ``stop_requested`` between steps (every rank agrees on the step under
DeepSpeed). Handlers can be set only in the main thread: elsewhere (a Ray actor's method) the
signals keep their defaults.
"""

from __future__ import annotations

import os
import signal
import sys
from types import FrameType
from typing import Any

EXIT_CODES = {signal.SIGINT: 130, signal.SIGTERM: 143}


class StopOnSignal:
    """Context manager: the first SIGTERM/SIGINT sets ``trainer.stop_requested`` (before a trainer
    is attached it exits at once: nothing is trained yet), a second one exits at once."""

    def __init__(self) -> None:
        self.trainer: Any = None
        self.signum: int | None = None
        self._previous: dict[int, Any] = {}

    @property
    def exit_code(self) -> int:
        return EXIT_CODES.get(signal.Signals(self.signum), 128 + int(self.signum)) if self.signum else 0

    @property
    def name(self) -> str:
        return signal.Signals(self.signum).name if self.signum else ""

    def __enter__(self) -> "StopOnSignal":
        for sig in EXIT_CODES:
            try:
                self._previous[sig] = signal.signal(sig, self._handle)
            except ValueError:  # not the main thread
                break
        return self

    def __exit__(self, *exc: Any) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        name = signal.Signals(signum).name
        if self.signum is not None:
            print(f"rlspec: second {name}: exiting now without saving; re-running the same command resumes from "
                  f"the last checkpoint", file=sys.stderr, flush=True)
            os._exit(EXIT_CODES.get(signal.Signals(signum), 128 + signum))
        self.signum = signum
        if self.trainer is None:
            print(f"rlspec: {name} while starting: stopped before any training step", file=sys.stderr, flush=True)
            raise SystemExit(self.exit_code)
        self.trainer.stop_requested = name
        print(f"{name}: finishing step {self.trainer.global_step + 1}, then saving a checkpoint and stopping "
              f"(send it again to exit at once)", flush=True)
