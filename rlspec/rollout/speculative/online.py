"""Online drafter training wired to a rollout engine (TLT's spot trainer during training rollouts).

:class:`OnlineDrafting` runs a training rollout with hidden states, starts the spot trainer when
the engine reports the long tail (buffering the responses finished so far), preempts it when the
rollout ends, publishes its weights with the next policy and buffers the rest of the rollout.
Evaluation rollouts reach a long tail too: there it does nothing, since nothing would stop the
training before the next checkpoint or publish it with the policy.

:class:`DrafterCheckpoint` is the checkpoint part of the drafter: its weights (``drafter/``, trained
online, so part of the run's state and of the exported model) and the spot trainer's optimizer,
RNG and buffer (``spot_trainer/``).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

import torch

from rlspec.rollout.base import FinishedSample, RolloutResult, SamplingParams
from rlspec.rollout.speculative.eagle import EagleDrafter


class OnlineDrafting:
    """Trains ``spot``'s drafter on ``engine``'s training rollouts (a local
    :class:`~rlspec.rollout.speculative.spot_trainer.SpotDrafterTrainer` or its Ray actor)."""

    def __init__(self, engine: Any, spot: Any) -> None:
        self.engine, self.spot = engine, spot
        self._step: int | None = None  # the RL step of the training rollout in progress
        self._added: set[int] = set()
        engine.on_long_tail = self._on_long_tail

    def generate(self, prompt_ids: Sequence[Sequence[int]], params: SamplingParams, step: int) -> RolloutResult:
        """The rollout of RL step ``step`` (``drafter/*`` metrics are added to its stats)."""
        self._added, self._step = set(), step
        try:
            result = self.engine.generate(prompt_ids, params, return_hidden_states=True)
        finally:
            self._step = None
        drafter_stats = self.spot.stop(step)  # preempt, and publish with the policy
        for prompt, response, hidden in zip(prompt_ids, result.response_ids, result.response_hidden_states):
            if hash((tuple(prompt), tuple(response))) not in self._added:  # not buffered at the long tail
                self.spot.buffer.add_response(step, prompt, response, hidden)
        result.stats.update(drafter_stats)
        result.stats["drafter/buffer_bytes"] = float(self.spot.buffer.nbytes)  # host memory, <= online.buffer_mb
        return result

    def _on_long_tail(self, finished: list[FinishedSample]) -> None:
        """Buffer the responses finished so far (this step's data, mixed with the previous steps'
        long ones) and start training the drafter."""
        if self._step is None:
            return
        for prompt, response, hidden in finished:
            if self.spot.buffer.add_response(self._step, prompt, response, hidden):
                self._added.add(hash((tuple(prompt), tuple(response))))
        self.spot.start()


class DrafterCheckpoint:
    """Saves and restores the engine's drafter (and the spot trainer's state) with a checkpoint."""

    def __init__(self, drafter: EagleDrafter, model: torch.nn.Module, spot: Any = None) -> None:
        self.drafter, self.model, self.spot = drafter, model, spot

    def save(self, checkpoint: Path) -> None:
        with self.drafter.lock:
            self.drafter.save(checkpoint / "drafter")
        if self.spot is not None:  # its optimizer, step count, RNG and (when small) its buffer
            (checkpoint / "spot_trainer").mkdir()
            torch.save(self.spot.state_dict(), checkpoint / "spot_trainer" / "state.pt")

    def load(self, checkpoint: Path) -> None:
        if not (checkpoint / "drafter").is_dir():
            return  # a checkpoint of a run without speculative decoding
        restored = EagleDrafter.load(checkpoint / "drafter", self.model)  # the online-trained drafter of that step
        with self.drafter.lock:
            self.drafter.load_state_dict(restored.state_dict(), strict=False)
            self.drafter.version = restored.version
        if self.spot is not None:
            self.spot.trainer.sync_from_drafter()
            state = checkpoint / "spot_trainer" / "state.pt"
            if state.is_file():  # older checkpoints have none: the spot trainer starts afresh
                self.spot.load_state_dict(torch.load(state, map_location="cpu", weights_only=False))
