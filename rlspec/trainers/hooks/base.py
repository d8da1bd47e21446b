"""The interface of method-specific rollout behaviour (a "rollout hook") and the data it works on.

Efficiency methods change more than the reward: HBPO prefills a budget per subgroup, L1 puts a
target length in the prompt, DA-DLER and PALU cut responses at per-prompt limits,
AnytimeReasoner cuts the thinking at budgets and samples summaries. Each is a
:class:`RolloutHook` registered by name (:data:`rlspec.registry.ROLLOUT_HOOKS`) in its own module;
the trainer calls every active hook at fixed points of a generation chunk::

    before_rollout   the prompts (and sampling) of each rollout          (budgets, anytime)
    -> generate
    after_rollout    more sampling on the rollouts                         (anytime's summaries)
    before_scoring   change what is scored, or score it                   (truncation, anytime)
    -> score with the reward terms (unless a hook scored)
    after_scoring    remember what this chunk showed                      (PALU)

and later asks it for advantage inputs, metrics and its checkpoint state.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Mapping, Sequence

import torch

from rlspec.config import RLSpecConfig
from rlspec.errors import ConfigError
from rlspec.rewards.terms import RewardBatch
from rlspec.rollout.base import RolloutEngine, RolloutResult, SamplingParams


@dataclass
class HookContext:
    """What a hook may use: the run's config, tokenizer and training prompts."""

    cfg: RLSpecConfig
    tokenizer: Any
    eos_ids: list[int]
    train_rows: Sequence[dict[str, Any]]
    train_prompt_ids: Sequence[Sequence[int]]
    max_length_at: Callable[[int], int]  # the rollout cap of a (0-based) step

    def encode(self, text: str) -> list[int]:
        return list(self.tokenizer(text, add_special_tokens=False)["input_ids"])


@dataclass
class RolloutChunk:
    """One generation chunk: ``P`` prompts x ``n`` rollouts, prompt-major (``B = P * n`` entries)."""

    step: int  # RL steps done (0-based index of the step being collected)
    seed: int  # the chunk's sampling seed
    max_length: int  # the step's rollout cap (rollout.max_response_length or its schedule)
    engine: RolloutEngine  # the rollout engine (for more sampling)
    row_indices: list[int]  # [P] training rows
    rows: list[dict[str, Any]]  # [B] the training row of each rollout
    prompt_ids: list[list[int]]  # [B] the prompt each rollout is sampled from
    params: SamplingParams
    timing: dict[str, float]  # rollout / reward seconds, generated tokens of the step
    budgets: list[int] | None = None  # [B] budget-conditioned rollouts: each rollout's budget
    columns: dict[str, list[Any]] = field(default_factory=dict)  # extra reward-batch columns
    result: RolloutResult | None = None  # what the engine sampled (a hook may replace it)
    texts: list[str] = field(default_factory=list)  # [B] decoded responses
    batch: RewardBatch | None = None  # what the reward terms score
    # filled by scoring, or by a hook that scores on its own
    rewards: list[float] | None = None
    per_term: dict[str, list[float]] = field(default_factory=dict)
    correct: list[bool] = field(default_factory=list)
    packed: list[Any] | None = None  # [B] rollouts packed with extra segments (per-token advantages)
    extras: dict[str, list[Any]] = field(default_factory=dict)  # [B] per-rollout values a hook logs


class RolloutHook:
    """Base class: every method is optional (the defaults change nothing)."""

    name = ""
    config_key = ""  # where its settings live (named by the errors of check())
    kwargs_keys: frozenset[str] | None = None  # the keys its kwargs take (None: checked by check() only)

    def __init__(self, ctx: HookContext, kwargs: dict[str, Any]) -> None:
        self.ctx = ctx
        self.kwargs = dict(kwargs)

    @classmethod
    def check_kwargs(cls, kwargs: Mapping[str, Any]) -> None:
        """Reject kwargs keys the hook does not take; the config calls this, before any model loads."""
        if cls.kwargs_keys is None:
            return
        unknown = sorted(set(kwargs) - cls.kwargs_keys)
        if unknown:
            section = cls.config_key.rsplit(".", 1)[0]
            raise ConfigError(f"unknown key(s) {', '.join(f'{cls.config_key}.{k}' for k in unknown)} for "
                              f"{section}.name={cls.name}; it takes: {', '.join(sorted(cls.kwargs_keys))}")

    def check(self) -> None:
        """Try the hook's settings once at start: a bad one raises ConfigError, or ValueError /
        TypeError that the trainer reports under :attr:`config_key`."""

    def before_rollout(self, chunk: RolloutChunk) -> None:
        """Set the prompts (``chunk.prompt_ids``, ``budgets``, ``columns``) or ``chunk.params``."""

    def after_rollout(self, chunk: RolloutChunk) -> None:
        """Sample more after the rollout (counted as rollout time)."""

    def before_scoring(self, chunk: RolloutChunk) -> None:
        """Change ``chunk.result`` / ``chunk.batch`` before scoring, or score (set ``chunk.rewards``)."""

    def after_scoring(self, chunk: RolloutChunk) -> None:
        """Read the scored chunk."""

    def advantage_inputs(self, budgets: torch.Tensor | None) -> dict[str, Any]:
        """Extra per-response inputs of the advantage estimator (``budgets`` ``[B]`` when set)."""
        return {}

    def metrics(self, groups: Sequence[Any]) -> dict[str, float]:
        """Step metrics from the step's generated groups."""
        return {}

    def state_dict(self) -> dict[str, Any]:
        """What a checkpoint keeps (run-long state)."""
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore :meth:`state_dict`."""
