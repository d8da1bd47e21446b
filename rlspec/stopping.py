"""SIGTERM and SIGINT stop a run cleanly: the current step finishes, a checkpoint is saved, one
line says how to resume, and the process exits 143 (SIGTERM) or 130 (SIGINT), the shell's
128 + signal number. A second signal exits at once (the last checkpoint stays the resume point).

:class:`StopOnSignal` is installed by the run wiring (:func:`rlspec.session.run`) around a run;
the trainer checks its ``stop_requested`` between steps (every rank agrees on the step under
DeepSpeed). Handlers can be set only in the main thread: elsewhere (a Ray actor's method) the
signals keep their defaults.

Under torchrun (``TORCHELASTIC_RUN_ID`` set, or ``WORLD_SIZE`` > 1) each worker usually gets a
signal twice within milliseconds: torchrun's agent forwards the one it receives to every worker,
and Ctrl-C also reaches the whole process group directly. So there a repeat of the same signal
within ``TORCHRUN_REPEAT_S`` (3 s) of the first is ignored; a later one still exits at once.
torchrun SIGKILLs its workers 30 s after forwarding a signal, so the current step plus the
checkpoint save must fit in that grace period (or in your launcher's, e.g. a scheduler's).

The handler writes with ``os.write(2, ...)``, not ``print``: a signal that lands while the main
thread is inside a buffered stdout/stderr write would make ``print`` raise
``RuntimeError: reentrant call``.
"""

from __future__ import annotations

import os
import signal
import time
from types import FrameType
from typing import Any

EXIT_CODES = {signal.SIGINT: 130, signal.SIGTERM: 143}
TORCHRUN_REPEAT_S = 3.0  # under torchrun, the same signal again this soon is the launcher's copy


def under_torchrun() -> bool:
    """Whether this process is one of several workers (torchrun, or another launcher setting WORLD_SIZE)."""
    try:
        world_size = int(os.environ.get("WORLD_SIZE", "1"))
    except ValueError:
        world_size = 1
    return bool(os.environ.get("TORCHELASTIC_RUN_ID")) or world_size > 1


def _say(line: str) -> None:
    """One line to stderr, safe inside a signal handler (no buffered-IO lock to re-enter)."""
    data = (line + "\n").encode("utf-8", "replace")
    try:
        while data:
            data = data[os.write(2, data):]
    except OSError:  # stderr closed: nothing to tell
        pass


class StopOnSignal:
    """Context manager: the first SIGTERM/SIGINT sets ``trainer.stop_requested`` (before a trainer
    is attached it exits at once: nothing is trained yet), a second one exits at once."""

    def __init__(self) -> None:
        self.trainer: Any = None
        self.signum: int | None = None
        self._first_at = 0.0  # time.monotonic() of the first signal
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
        now = time.monotonic()
        if self.signum is not None:
            if signum == self.signum and now - self._first_at < TORCHRUN_REPEAT_S and under_torchrun():
                return  # the launcher's forwarded copy of the same Ctrl-C / SIGTERM, not a second request
            _say(f"rlspec: second {name}: exiting now without saving; re-running the same command resumes from "
                 f"the last checkpoint")
            os._exit(EXIT_CODES.get(signal.Signals(signum), 128 + signum))
        self.signum, self._first_at = signum, now
        if self.trainer is None:
            _say(f"rlspec: {name} while starting: stopped before any training step")
            raise SystemExit(self.exit_code)
        self.trainer.stop_requested = name
        _say(f"{name}: finishing step {self.trainer.global_step + 1}, then saving a checkpoint and stopping "
             f"(send it again to exit at once)")
