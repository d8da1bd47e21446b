"""The rollout interface the trainer talks to.

The trainer only ever calls :meth:`RolloutEngine.generate` and :meth:`RolloutEngine.update_weights`,
so speculative decoding (TLT) and a vLLM backend plug in behind it without touching the trainer.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol, Sequence

import torch

FINISH_STOP = "stop"  # EOS token or a stop string was produced
FINISH_LENGTH = "length"  # max_new_tokens reached without stopping (truncated)


@dataclass
class SamplingParams:
    """How to sample. ``temperature == 0`` means greedy decoding."""

    max_new_tokens: int = 256
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0  # 0 disables top-k
    stop_strings: tuple[str, ...] = ()
    seed: int | None = None  # seeds a private torch.Generator; None uses the global RNG

    def __post_init__(self) -> None:
        if self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {self.max_new_tokens}")
        if self.temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.top_k < 0:
            raise ValueError(f"top_k must be >= 0 (0 = off), got {self.top_k}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


@dataclass
class RolloutResult:
    """What one ``generate`` call returns, one entry per input prompt, in input order.

    ``response_logprobs[i][t]`` is log pi(token_t | prefix) under the *policy as trained*:
    ``log_softmax(logits / temperature)`` (temperature 1 when greedy), before top-p/top-k
    filtering -- the same quantity the trainer recomputes, as in verl and TRL.
    """

    prompt_ids: list[list[int]]
    response_ids: list[list[int]]  # generated ids, including the EOS / stop-string tokens
    response_logprobs: list[torch.Tensor]  # float32, shape [len(response_ids[i])]
    finish_reasons: list[str]  # FINISH_STOP or FINISH_LENGTH
    stats: dict[str, float] = field(default_factory=dict)  # e.g. tokens, seconds, tokens_per_s

    @property
    def response_lengths(self) -> list[int]:
        return [len(r) for r in self.response_ids]


def check_prompt_ids(prompt_ids: Sequence[Sequence[int]], vocab_size: int) -> list[list[int]]:
    """The prompts as lists of ints; an empty prompt or an id outside ``[0, vocab_size)`` raises
    DataError naming the prompt (every engine checks its input the same way)."""
    from rlspec.errors import DataError

    prompts = []
    for i, p in enumerate(prompt_ids):
        ids = [int(t) for t in p]
        if not ids:
            raise DataError(f"prompt {i} is empty: every prompt needs at least one token id")
        lo, hi = min(ids), max(ids)
        if lo < 0 or hi >= vocab_size:
            raise DataError(
                f"prompt {i} has token id {hi if hi >= vocab_size else lo} outside the model's "
                f"vocabulary [0, {vocab_size}): tokenize with the model's own tokenizer"
            )
        prompts.append(ids)
    return prompts


class RolloutEngine(Protocol):
    def generate(self, prompt_ids: Sequence[Sequence[int]], params: SamplingParams) -> RolloutResult:
        """Sample one response per prompt (repeat a prompt n times for a GRPO group)."""
        ...

    def update_weights(self) -> None:
        """Called by the trainer after every optimizer step (new policy weights are ready)."""
        ...
