"""Offline warm-up of an EAGLE drafter on the target's own generations (TLT warms the drafter up
before RL); the command line is ``python -m rlspec.warmup_drafter``."""

from __future__ import annotations

import time
from typing import Any, Callable, Sequence

import torch
import torch.nn as nn

from rlspec.errors import ConfigError, DataError
from rlspec.models import eos_token_ids as default_eos_token_ids
from rlspec.rollout.base import SamplingParams
from rlspec.rollout.native import NativeEngine
from rlspec.rollout.speculative.drafter_buffer import DrafterBuffer
from rlspec.rollout.speculative.drafter_training import DrafterTrainer
from rlspec.rollout.speculative.eagle import EagleDrafter


def warmup_drafter(
    target_model: nn.Module,
    tokenizer: Any,
    prompts: list[list[int]],
    steps: int,
    *,
    drafter: EagleDrafter | None = None,
    max_new_tokens: int = 256,
    temperature: float = 1.0,
    top_p: float = 1.0,
    rollout_batch_size: int = 64,
    batch_size: int = 4,
    window: int = 512,
    lr: float = 5e-5,
    warmup_steps: int = 0,
    eval_windows: int = 16,
    seed: int = 0,
    eos_token_ids: Sequence[int] | None = None,
    log_every: int = 50,
    log: Callable[[str], None] | None = print,
) -> tuple[EagleDrafter, dict[str, Any]]:
    """Offline warm-up (TLT): train a drafter on the target's own generations.

    Samples one response per prompt with ``NativeEngine.generate(..., return_hidden_states=True)``,
    stores them in a :class:`DrafterBuffer` (step 0) and runs ``steps`` :class:`DrafterTrainer` steps.
    Returns the (published) drafter and metrics: ``rollout_tokens``, ``samples``, ``train`` (the
    :meth:`DrafterTrainer.train` result) and ``eval_before`` / ``eval_after`` (loss metrics on the same
    ``eval_windows`` windows, drawn from the buffer with a fixed seed before training).
    """
    say = log or (lambda _msg: None)
    if not prompts:
        raise DataError("warmup_drafter: no prompts given")
    if steps < 0 or rollout_batch_size < 1 or log_every < 1:
        raise ConfigError("warmup_drafter: steps must be >= 0, rollout_batch_size and log_every >= 1")
    if drafter is None:
        drafter = EagleDrafter.from_target(target_model, seed=seed)
    eos = list(eos_token_ids) if eos_token_ids is not None else default_eos_token_ids(target_model, tokenizer)
    engine = NativeEngine(target_model, eos, tokenizer=tokenizer, max_batch_size=rollout_batch_size)
    buffer = DrafterBuffer(keep_steps=1, max_samples=max(len(prompts), 1))
    rollout_tokens = 0
    start = time.monotonic()
    was_training = target_model.training
    target_model.eval()
    try:
        for i in range(0, len(prompts), rollout_batch_size):
            chunk = prompts[i : i + rollout_batch_size]
            params = SamplingParams(max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p, seed=seed + i)
            result = engine.generate(chunk, params, return_hidden_states=True)
            buffer.add_rollout(0, result)
            rollout_tokens += sum(len(r) for r in result.response_ids)
            say(
                f"drafter warm-up: generated {min(i + rollout_batch_size, len(prompts))}/{len(prompts)} prompts, "
                f"{rollout_tokens} tokens ({rollout_tokens / max(time.monotonic() - start, 1e-9):.0f} tok/s)"
            )
    finally:
        target_model.train(was_training)
    trainer = DrafterTrainer(drafter, lr=lr, warmup_steps=warmup_steps, batch_size=batch_size, window=window, seed=seed)
    eval_batch = buffer.sample_windows(eval_windows, window, torch.Generator().manual_seed(seed + 1))
    before = trainer.evaluate(eval_batch) if eval_batch is not None else {}
    if before:
        say(f"drafter warm-up: before training loss {before['loss']:.4f} top1 {before['top1']:.3f}")
    done, sums, tokens = 0, {"loss": 0.0, "vloss": 0.0, "ploss": 0.0, "top1": 0.0}, 0.0
    last: dict[str, Any] = {"steps": 0.0, "stopped": "max_steps"}
    while done < steps:
        last = trainer.train(buffer, min(log_every, steps - done))
        if last["steps"] == 0:
            break
        done += int(last["steps"])
        tokens += float(last["tokens"])
        for key in sums:
            sums[key] += float(last[key]) * float(last["tokens"])
        say(f"drafter warm-up: step {done}/{steps} loss {last['loss']:.4f} top1 {last['top1']:.3f}")
        if last["stopped"] != "max_steps":
            break
    after = trainer.evaluate(eval_batch) if eval_batch is not None else {}
    if after:
        say(f"drafter warm-up: after training loss {after['loss']:.4f} top1 {after['top1']:.3f}")
    train_metrics = {key: (value / tokens if tokens else float("nan")) for key, value in sums.items()}
    train_metrics.update(steps=float(done), tokens=tokens, version=float(drafter.version), stopped=last["stopped"])
    metrics = {
        "rollout_tokens": rollout_tokens,
        "samples": len(buffer),
        "train": train_metrics,
        "eval_before": before,
        "eval_after": after,
    }
    return drafter, metrics
