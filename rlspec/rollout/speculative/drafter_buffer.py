"""The drafter's training data: rollouts' token ids and target hidden states, by RL step (TLT's DataBuffer).

Hidden states live in host memory: the rollout engine copies each step's states out of the GPU as
it collects them (:func:`to_host`: asynchronous copies into pinned memory), and the buffer, bounded
in bytes, keeps them in ordinary host memory. A stored token costs
:meth:`DrafterBuffer.bytes_per_token` = ``hidden_size x dtype bytes`` (one layer: the last, after
the final norm, which EAGLE-1/2 regress) ``+ 9`` (its int64 id and bool loss mask): 7177 bytes
(7.0 KiB) for Qwen2.5-7B in bf16, so one step of 8192 responses x 4096 tokens would be 241 GB.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass
from typing import Any, Mapping, Sequence

import torch

from rlspec.errors import ConfigError, DataError


def to_host(tensor: torch.Tensor, non_blocking: bool = False) -> torch.Tensor:
    """``tensor`` in CPU memory: unchanged when it is there already, else a copy -- pinned when
    CUDA is available (``pin_memory`` needs it). With ``non_blocking=True`` the copy is queued on
    the current stream: call :func:`host_sync` before reading it on the host."""
    if tensor.device.type == "cpu":
        return tensor
    out = torch.empty(tensor.shape, dtype=tensor.dtype, pin_memory=torch.cuda.is_available())
    return out.copy_(tensor, non_blocking=non_blocking)


def host_sync(device: torch.device) -> None:
    """Wait for copies queued by :func:`to_host` from ``device`` (a no-op on CPU)."""
    if device.type == "cuda":
        torch.cuda.current_stream(device).synchronize()


@dataclass
class DrafterSample:
    """One stored sequence. ``hidden[t]`` is ``h`` at absolute position ``start_pos + t``."""

    step: int
    input_ids: torch.Tensor  # [T] long
    hidden: torch.Tensor  # [T, H]
    loss_mask: torch.Tensor  # [T] bool: True where input_ids[t] is a response token
    start_pos: int
    first: int  # index of the first response token
    num_pairs: int  # trainable EAGLE pairs: loss_mask[1:].sum()


@dataclass
class DrafterBatch:
    """Right-padded windows ``[B, W]`` (before the EAGLE shift; see :func:`eagle_training_pairs`)."""

    input_ids: torch.Tensor  # [B, W] long (pad 0)
    hidden: torch.Tensor  # [B, W, H] (pad 0)
    loss_mask: torch.Tensor  # [B, W] bool: response tokens
    attention_mask: torch.Tensor  # [B, W] bool: real tokens
    position_ids: torch.Tensor  # [B, W] long: absolute positions
    steps: list[int]  # RL step of each window's sample
    num_current: int  # windows drawn from the newest step

    def to(self, device: torch.device | str) -> "DrafterBatch":
        return DrafterBatch(
            self.input_ids.to(device),
            self.hidden.to(device),
            self.loss_mask.to(device),
            self.attention_mask.to(device),
            self.position_ids.to(device),
            self.steps,
            self.num_current,
        )


def _sample_bytes(sample: DrafterSample) -> int:
    return sum(t.numel() * t.element_size() for t in (sample.input_ids, sample.hidden, sample.loss_mask))


class DrafterBuffer:
    """Rollouts' token ids + target hidden states, tagged by RL step (TLT DataBuffer).

    Keeps the samples of the newest ``keep_steps`` RL steps (TLT: the last 2), at most
    ``max_samples`` of them (TLT: 10 000) and at most ``max_bytes`` (None: no bound); the oldest
    are dropped first, and a sample larger than ``max_bytes`` on its own is not stored. Hidden
    states are stored on ``device`` (default: host memory). :meth:`sample_windows` mixes the newest
    step's samples -- during rollout these are the already finished, shorter responses -- with the
    previous steps' samples, which include the long tail (TLT: "mixes partial responses of the current
    step with long sequences from the previous step to fix the long-tail data skew"): each window comes
    from the newest step with probability ``current_fraction`` when both pools are non-empty, and
    within a pool a sample is drawn with probability proportional to its number of trainable tokens.

    Thread-safe: ``add*`` and :meth:`sample_windows` may run in different threads.
    """

    def __init__(
        self,
        keep_steps: int = 2,
        max_samples: int = 10_000,
        current_fraction: float = 0.5,
        device: str | torch.device | None = None,
        max_bytes: int | None = None,
    ):
        if keep_steps < 1:
            raise ConfigError(f"drafter buffer keep_steps must be >= 1, got {keep_steps}")
        if max_samples < 1:
            raise ConfigError(f"drafter buffer max_samples must be >= 1, got {max_samples}")
        if not 0.0 <= current_fraction <= 1.0:
            raise ConfigError(f"drafter buffer current_fraction must be in [0, 1], got {current_fraction}")
        if max_bytes is not None and max_bytes < 1:
            raise ConfigError(f"drafter buffer max_bytes must be >= 1 or None, got {max_bytes} "
                              "(rollout.speculative.online.buffer_mb)")
        self.keep_steps = keep_steps
        self.max_bytes = max_bytes
        self._bytes = 0  # held by self._samples
        self.max_samples = max_samples
        self.current_fraction = current_fraction
        self.device = device
        self._samples: list[DrafterSample] = []
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return len(self._samples)

    @staticmethod
    def bytes_per_token(hidden_size: int, dtype: torch.dtype) -> int:
        """Bytes one stored token takes: its hidden state, int64 id and bool loss mask."""
        return hidden_size * torch.empty((), dtype=dtype).element_size() + 8 + 1

    @property
    def steps(self) -> list[int]:
        """The RL steps present, ascending."""
        with self._lock:
            return sorted({s.step for s in self._samples})

    @property
    def num_pairs(self) -> int:
        """Trainable (response) drafter tokens stored."""
        with self._lock:
            return sum(s.num_pairs for s in self._samples)

    def add(
        self,
        step: int,
        input_ids: Sequence[int] | torch.Tensor,
        hidden: torch.Tensor,
        loss_mask: Sequence[bool] | torch.Tensor,
        start_pos: int = 0,
    ) -> bool:
        """Store one sequence: ``input_ids [T]``, ``hidden [T, H]`` (``hidden[t] = h`` at the position of
        ``input_ids[t]``), ``loss_mask [T]`` (True = response token). Returns False when the sample was
        not kept (no trainable pair, or older than the kept steps)."""
        ids = torch.as_tensor(input_ids, dtype=torch.long).detach().flatten()
        mask = torch.as_tensor(loss_mask, dtype=torch.bool).detach().flatten()
        if hidden.dim() != 2 or hidden.shape[0] != ids.shape[0] or mask.shape[0] != ids.shape[0]:
            raise DataError(
                f"drafter buffer: input_ids [T], hidden [T, H] and loss_mask [T] must agree, got "
                f"{tuple(ids.shape)}, {tuple(hidden.shape)}, {tuple(mask.shape)}"
            )
        hid = hidden.detach()
        if self.device is not None:
            hid = hid.to(self.device)
        if hid.device.type != "cpu" and self.device is None:
            hid = hid.to("cpu")  # a fresh copy in host memory, not left on the accelerator
        elif hid.is_inference():
            hid = hid.clone()
        ids, mask = ids.to(hid.device), mask.to(hid.device)
        num_pairs = int(mask[1:].sum()) if ids.shape[0] >= 2 else 0
        if num_pairs == 0:
            return False
        first = int(mask.nonzero()[0])
        sample = DrafterSample(int(step), ids, hid, mask, int(start_pos), first, num_pairs)
        size = _sample_bytes(sample)
        if self.max_bytes is not None and size > self.max_bytes:
            return False
        with self._lock:
            oldest_kept = self._oldest_kept(sample.step)
            if sample.step < oldest_kept:
                return False
            if any(s.step < oldest_kept for s in self._samples):
                self._samples = [s for s in self._samples if s.step >= oldest_kept]
                self._bytes = sum(_sample_bytes(s) for s in self._samples)
            self._samples.append(sample)
            self._bytes += size
            drop = max(0, len(self._samples) - self.max_samples)  # the oldest first
            dropped = sum(_sample_bytes(s) for s in self._samples[:drop])
            while self.max_bytes is not None and self._bytes - dropped > self.max_bytes:  # ends at the new one
                dropped += _sample_bytes(self._samples[drop])
                drop += 1
            del self._samples[:drop]
            self._bytes -= dropped
        return True

    @property
    def nbytes(self) -> int:
        """Memory held by the stored samples (hidden states dominate)."""
        with self._lock:
            return self._bytes

    def state_dict(self) -> dict[str, Any]:
        """The stored samples (CPU tensors), for a checkpoint: a resumed run trains the drafter on
        the same recent steps as the interrupted one would have."""
        with self._lock:
            samples = [{"step": s.step, "input_ids": s.input_ids.cpu(), "hidden": s.hidden.cpu(),
                        "loss_mask": s.loss_mask.cpu(), "start_pos": s.start_pos} for s in self._samples]
        return {"samples": samples}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Replace the contents with a :meth:`state_dict` (kept-steps and size limits apply)."""
        with self._lock:
            self._samples, self._bytes = [], 0
        for s in state["samples"]:
            self.add(s["step"], s["input_ids"], s["hidden"], s["loss_mask"], s["start_pos"])

    def _oldest_kept(self, incoming: int) -> int:
        distinct = sorted({s.step for s in self._samples} | {incoming}, reverse=True)
        return distinct[min(self.keep_steps, len(distinct)) - 1]

    def add_response(
        self, step: int, prompt_ids: Sequence[int], response_ids: Sequence[int], response_hidden: torch.Tensor
    ) -> bool:
        """Store one rollout as returned by ``NativeEngine.generate(..., return_hidden_states=True)``.

        ``response_hidden[t]`` is the hidden state at the position before response token ``t``
        (``RolloutResultWithHidden``). The stored sequence is ``[prompt[-1]] + response[:-1]`` with those
        states (positions ``P-1 .. P+R-2``): the prompt's other hidden states are not returned by the
        engine, and the last response token has no following state to regress.
        """
        r = len(response_ids)
        if response_hidden.dim() != 2 or response_hidden.shape[0] != r:
            raise DataError(
                f"drafter buffer: response_hidden must be [len(response_ids)={r}, H], "
                f"got {tuple(response_hidden.shape)}"
            )
        if r < 2 or not prompt_ids:
            return False
        ids = [int(prompt_ids[-1])] + [int(t) for t in response_ids[:-1]]
        mask = [False] + [True] * (r - 1)
        return self.add(step, ids, response_hidden, mask, start_pos=len(prompt_ids) - 1)

    def add_rollout(self, step: int, result: Any) -> int:
        """Store every response of a ``RolloutResultWithHidden``; returns how many were kept."""
        hidden = getattr(result, "response_hidden_states", None)
        if hidden is None:
            raise DataError(
                "drafter buffer: the rollout has no hidden states; call generate(..., return_hidden_states=True)"
            )
        kept = 0
        for prompt, resp, h in zip(result.prompt_ids, result.response_ids, hidden):
            kept += bool(self.add_response(step, prompt, resp, h))
        return kept

    def sample_windows(
        self, batch_size: int, window: int = 512, generator: torch.Generator | None = None
    ) -> DrafterBatch | None:
        """Draw ``batch_size`` windows of at most ``window`` tokens; ``None`` when the buffer is empty.

        A window is ``[s, min(T, s + window))`` with ``s`` uniform in ``[max(0, first - 1), max(lo, T - window)]``
        (``first`` = the first response token): it starts at most one token before the response (that
        token carries ``h`` for the first response pair) and always contains response tokens. Windows
        are returned right-padded in a ``[B, W]`` batch (padding over packing: the training forward then
        needs only a causal + key-padding mask, and fixed-size windows waste little).
        """
        if batch_size < 1:
            raise ConfigError(f"drafter batch_size must be >= 1, got {batch_size}")
        if window < 2:
            raise ConfigError(f"drafter window must be >= 2 tokens, got {window}")
        with self._lock:
            samples = list(self._samples)
        if not samples:
            return None
        newest = max(s.step for s in samples)
        current = [s for s in samples if s.step == newest]
        previous = [s for s in samples if s.step != newest]
        chosen: list[tuple[DrafterSample, int, int]] = []
        num_current = 0
        for _ in range(batch_size):
            if current and previous:
                use_current = bool(torch.rand((), generator=generator) < self.current_fraction)
            else:
                use_current = bool(current)
            pool = current if use_current else previous
            num_current += use_current
            weights = torch.tensor([float(s.num_pairs) for s in pool])
            sample = pool[int(torch.multinomial(weights, 1, generator=generator))]
            t_len = sample.input_ids.shape[0]
            lo = max(0, sample.first - 1)
            hi = max(lo, t_len - window)
            start = lo + int(torch.randint(hi - lo + 1, (), generator=generator))
            chosen.append((sample, start, min(t_len, start + window)))
        width = max(e - s for _, s, e in chosen)
        hid0 = chosen[0][0].hidden
        bsz = len(chosen)
        ids = torch.zeros(bsz, width, dtype=torch.long, device=hid0.device)
        hid = torch.zeros(bsz, width, hid0.shape[1], dtype=hid0.dtype, device=hid0.device)
        lmask = torch.zeros(bsz, width, dtype=torch.bool, device=hid0.device)
        amask = torch.zeros(bsz, width, dtype=torch.bool, device=hid0.device)
        pos = torch.zeros(bsz, width, dtype=torch.long, device=hid0.device)
        for i, (sample, s, e) in enumerate(chosen):
            w = e - s
            ids[i, :w] = sample.input_ids[s:e]
            hid[i, :w] = sample.hidden[s:e].to(hid.device, hid.dtype)
            lmask[i, :w] = sample.loss_mask[s:e]
            amask[i, :w] = True
            pos[i] = sample.start_pos + s + torch.arange(width, device=hid0.device)
        return DrafterBatch(ids, hid, lmask, amask, pos, [c[0].step for c in chosen], num_current)
