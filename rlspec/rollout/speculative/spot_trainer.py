"""TLT's "spot trainer": online drafter training on idle compute during the rollout's long tail.

Infrastructure only (the loss and optimiser are
:class:`~rlspec.rollout.speculative.drafter_training.DrafterTrainer`'s).
Flow per RL step, as in TLT (arXiv 2511.16665, Sec. 4) minus the bugs found in its code:

* the rollouts' hidden states come for free from the rollout engine
  (``generate(..., return_hidden_states=True)``, copied to pinned host memory as they are
  computed); they go into a :class:`~rlspec.rollout.speculative.drafter_buffer.DrafterBuffer` that
  keeps the last ``keep_steps`` steps within ``buffer_mb`` (the previous steps' long sequences
  mixed with the current step's finished ones; :class:`~rlspec.rollout.speculative.online.OnlineDrafting`
  fills it);
* when the engine reports the long tail (:meth:`NativeEngine.on_long_tail`: few rows left, the
  hardware mostly idle) :meth:`start` trains a private copy of the drafter in a background
  thread; :meth:`stop` -- called when the rollout ends -- preempts it between two optimizer steps,
  so the RL step is never delayed by more than one drafter step;
* the trained weights are published to the engine's drafter (under its lock) at :meth:`stop`,
  i.e. together with the new policy weights before the next step's rollout (TLT pushes target
  and drafter together; a drafter left behind the target loses acceptance).

Checkpoints hold :meth:`SpotDrafterTrainer.state_dict`: the optimizer's moments, step count and
RNG, and the buffer when it is at most ``checkpoint_buffer_mb`` (the last steps' hidden states: a
few MB for a small model, GBs for a 7B one, where a resumed run refills it from its next rollout).
"""

from __future__ import annotations

import threading
import time
from typing import Any, Mapping

from rlspec.config import OnlineDrafterConfig
from rlspec.rollout.speculative.drafter_buffer import DrafterBuffer
from rlspec.rollout.speculative.drafter_training import DrafterTrainer
from rlspec.rollout.speculative.eagle import EagleDrafter


class SpotDrafterTrainer:
    """Trains ``drafter`` in a background thread between :meth:`start` and :meth:`stop`
    (``settings``: ``rollout.speculative.online``)."""

    def __init__(self, drafter: EagleDrafter, settings: OnlineDrafterConfig | None = None, *, seed: int = 0,
                 max_samples: int = 10_000) -> None:
        settings = settings or OnlineDrafterConfig()
        self.drafter = drafter
        self.checkpoint_buffer_mb = settings.checkpoint_buffer_mb
        self.buffer = DrafterBuffer(keep_steps=settings.keep_steps, max_samples=max_samples,
                                    max_bytes=int(settings.buffer_mb * 2**20))
        # publish only at stop(): the engine keeps one drafter version for a whole rollout
        self.trainer = DrafterTrainer(drafter, lr=settings.lr, batch_size=settings.batch_size, window=settings.window,
                                      publish_every=0, seed=seed)
        self.max_steps = settings.max_steps
        self._thread: threading.Thread | None = None
        self._stop = threading.Event()
        self._result: dict[str, Any] = {}
        self._started_at: float | None = None
        self.published_step = 0  # RL step whose rollouts the engine's drafter was last trained on

    def start(self) -> None:
        """Begin training in the background (no-op if already running or nothing is buffered)."""
        if self._thread is not None or not self.buffer.num_pairs:
            return
        self._stop.clear()
        self._started_at = time.perf_counter()

        def work() -> None:
            # reaching max_steps mid-rollout must not publish: stop() does, when the rollout ends
            self._result = dict(self.trainer.train(self.buffer, self.max_steps, stop_event=self._stop,
                                                   publish_at_end=False))

        self._thread = threading.Thread(target=work, name="rlspec-spot-drafter", daemon=True)
        self._thread.start()

    def stop(self, step: int) -> dict[str, float]:
        """Preempt the background training (if any), publish its weights, return its metrics."""
        if self._thread is None:
            return {"drafter/steps": 0.0, "drafter/lag_steps": float(step - self.published_step)}
        self._stop.set()
        self._thread.join()
        self._thread = None
        seconds = time.perf_counter() - (self._started_at or time.perf_counter())
        res = self._result
        if self.trainer.unpublished:  # the rollout ended: the engine gets the new weights now
            self.trainer.publish(blocking=True)
            self.published_step = step
        # lag: RL steps since the rollouts the engine's drafter last trained on (0 = this step's)
        out = {"drafter/steps": float(res.get("steps", 0)), "drafter/train_seconds": seconds,
               "drafter/version": float(self.drafter.version), "drafter/lag_steps": float(step - self.published_step)}
        for key in ("loss", "top1"):
            if isinstance(res.get(key), (int, float)):
                out[f"drafter/{key}"] = float(res[key])
        return out

    def state_dict(self) -> dict[str, Any]:
        """The trainer's state for a checkpoint (between two rollouts: training is not running)."""
        if self._thread is not None:
            raise RuntimeError("SpotDrafterTrainer.state_dict() while training runs: call stop() first")
        nbytes = self.buffer.nbytes
        keep_buffer = nbytes <= self.checkpoint_buffer_mb * 2**20
        return {"trainer": self.trainer.state_dict(), "published_step": self.published_step,
                "buffer": self.buffer.state_dict() if keep_buffer else None, "buffer_bytes": nbytes}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore a :meth:`state_dict`; the drafter's weights are restored (and synced into the
        trainer's private copy) by the caller, from the checkpoint's ``drafter/`` directory."""
        self.trainer.load_state_dict(state["trainer"])
        self.published_step = int(state["published_step"])
        if state.get("buffer") is not None:
            self.buffer.load_state_dict(state["buffer"])
