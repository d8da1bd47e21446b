"""The rollout interface the trainer talks to.

The trainer only ever calls :meth:`RolloutEngine.generate` and :meth:`RolloutEngine.update_weights`,
so speculative decoding (TLT) and a vLLM backend plug in behind it without touching the trainer.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Protocol, Sequence

import torch

from rlspec.errors import DataError

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
    # one random-stream key per prompt (ints in [0, 2**63)): with a seed, token j of prompt i draws
    # with the numbers of (seed, streams[i], j) (vLLM: request i is seeded from (seed, streams[i])),
    # so a row samples the same tokens whichever rows share its call or batch (an eval keys rows by
    # problem and sample); None = the request index. Steps drafted by EAGLE use the call's RNG.
    streams: tuple[int, ...] | None = None

    def __post_init__(self) -> None:
        if self.streams is not None:
            self.streams = tuple(int(s) for s in self.streams)
            bad = [s for s in self.streams if not 0 <= s < 2**63]
            if bad:
                raise ValueError(f"streams must be ints in [0, 2**63) (one key per prompt), got {bad[0]}")
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


@dataclass
class RolloutResultWithHidden(RolloutResult):
    """A :class:`RolloutResult` plus the hidden states that produced each generated token.

    ``response_hidden_states[i][t]`` is the last-layer hidden state (after the final norm, i.e.
    what ``lm_head`` saw) at the position *before* response token ``t`` -- the state whose logits
    sampled that token (what an EAGLE drafter trains on). Shape ``[len(response_ids[i]), hidden_size]``,
    in the model's dtype.
    """

    response_hidden_states: list[torch.Tensor] = field(default_factory=list)


# (prompt ids, response ids, hidden states [len, H]) of a response that finished before the long
# tail (what an engine's ``on_long_tail`` listener receives)
FinishedSample = tuple[list[int], list[int], torch.Tensor]


def stream_keys(params: SamplingParams, n: int) -> list[int]:
    """The random-stream key of each of ``n`` prompts: ``params.streams``, else the request index.

    >>> stream_keys(SamplingParams(), 3), stream_keys(SamplingParams(streams=(9, 4)), 2)
    ([0, 1, 2], [9, 4])
    """
    if params.streams is None:
        return list(range(n))
    if len(params.streams) != n:
        raise ValueError(
            f"SamplingParams.streams has {len(params.streams)} keys for {n} prompts: give one stream key "
            "per prompt (in prompt order), or streams=None for the request index"
        )
    return list(params.streams)


def check_prompt_ids(prompt_ids: Sequence[Sequence[int]], vocab_size: int) -> list[list[int]]:
    """The prompts as lists of ints; an empty prompt or an id outside ``[0, vocab_size)`` raises
    DataError naming the prompt (every engine checks its input the same way)."""
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


def merge_results(parts: Sequence[RolloutResult], want_hidden: bool) -> RolloutResult:
    """Concatenate per-chunk results (in chunk order) into one result; stats are not merged here."""
    kw: dict[str, Any] = dict(prompt_ids=[], response_ids=[], response_logprobs=[], finish_reasons=[], stats={})
    hidden: list[torch.Tensor] = []
    for part in parts:
        kw["prompt_ids"] += part.prompt_ids
        kw["response_ids"] += part.response_ids
        kw["response_logprobs"] += part.response_logprobs
        kw["finish_reasons"] += part.finish_reasons
        if want_hidden:
            hidden += part.response_hidden_states
    if not want_hidden:
        return RolloutResult(**kw)
    return RolloutResultWithHidden(**kw, response_hidden_states=hidden)


_SUMMED = ("tokens", "prompt_tokens", "decode_steps", "spec/sd_steps", "spec/switch_seconds", "spec/reentered",
           "spec/draft_seconds", "spec/verify_seconds")
_SUMMED_SUFFIXES = ("/drafted", "/accepted", "/rows")  # per draft source: spec/<source>/...


def merge_stats(parts: Sequence[dict[str, float]]) -> dict[str, float]:
    """Per-chunk engine stats -> one dict: counts summed, ``spec/*`` rates averaged with the chunks'
    speculative steps as weights (``spec/frac_steps_sd`` = SD steps / decode steps), ``spec/arm/*``
    summed, ``spec/reverted`` = max. ``seconds`` / ``tokens_per_s`` are set by the caller (wall time)."""
    out: dict[str, float] = {k: 0.0 for k in ("tokens", "prompt_tokens", "decode_steps")}
    keys = {k for p in parts for k in p}
    for key in keys:
        vals = [float(p.get(key, 0.0)) for p in parts]
        if key in _SUMMED or key.startswith("spec/arm/") or key.endswith(_SUMMED_SUFFIXES):
            out[key] = sum(vals)
        elif key == "spec/reverted":
            out[key] = max(vals)
        elif key.startswith("spec/") and key != "spec/frac_steps_sd":
            weights = [float(p.get("spec/sd_steps", 0.0)) for p in parts]
            total = sum(weights)
            out[key] = sum(w * v for w, v in zip(weights, vals)) / total if total else 0.0
    if "spec/sd_steps" in out:
        out["spec/frac_steps_sd"] = out["spec/sd_steps"] / out["decode_steps"] if out["decode_steps"] else 0.0
    for key in [k for k in out if k.endswith("/rows")]:  # per source: from the summed counts
        rows = out[key]
        out[key[: -len("rows")] + "accept_length"] = (out[key[: -len("rows")] + "accepted"] + rows) / rows if rows else 0.0
    return out


class RolloutEngine(Protocol):
    def generate(self, prompt_ids: Sequence[Sequence[int]], params: SamplingParams, *,
                 return_hidden_states: bool = False) -> RolloutResult:
        """Sample one response per prompt (repeat a prompt n times for a GRPO group); with
        ``return_hidden_states`` a :class:`RolloutResultWithHidden`."""
        ...

    def update_weights(self) -> None:
        """Called by the trainer after every optimizer step (new policy weights are ready)."""
        ...
