"""``python -m rlspec.warmup_drafter model=DIR out=DIR`` -- warm an EAGLE drafter up for a model.

Warms a drafter up on the model's own responses to prompts from ``data`` (default: the model
directory's ``train.jsonl``, as the embedded default ships it), each formatted with the tokenizer's
chat template and the standard instruction (TLT's offline warm-up,
:func:`rlspec.rollout.speculative.warmup.warmup_drafter`), and saves it to ``out`` -- the
directory ``rollout.speculative.drafter_path`` takes.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence

import torch

from rlspec.cli import parse_options, run_main
from rlspec.config import STANDARD_INSTRUCTION, Dtype
from rlspec.data import build_prompt_ids, load_split
from rlspec.errors import ConfigError
from rlspec.models import check_model_path, eos_token_ids, load_causal_lm, load_tokenizer
from rlspec.rollout.speculative.warmup import warmup_drafter
from rlspec.schema import setting

TOOL = "rlspec.warmup_drafter"
USAGE = (
    "python -m rlspec.warmup_drafter model=DIR out=DIR [steps=200] [num_prompts=64] [max_new_tokens=256] "
    "[batch_size=4] [window=512] [lr=5e-5] [temperature=1.0] [rollout_batch_size=64] [seed=0] "
    "[dtype=float32] [device=cpu] [data=PATH] [split=train] [threads=0]"
)


@dataclass
class WarmupOptions:
    """``python -m rlspec.warmup_drafter`` options."""

    model: Optional[str] = setting(None, "the target model dir or hub id (required)")
    out: Optional[str] = setting(None, "where the drafter is written (required)")
    steps: int = setting(200, "drafter training steps")
    num_prompts: int = setting(64, "prompts the model answers for the training data")
    max_new_tokens: int = setting(256, "tokens per answer")
    batch_size: int = setting(4, "windows per drafter step")
    window: int = setting(512, "tokens per training window")
    lr: float = setting(5e-5, "AdamW learning rate")
    temperature: float = setting(1.0, "sampling temperature of the answers")
    rollout_batch_size: int = setting(64, "answers generated at once")
    seed: int = setting(0, "seed of prompt choice, sampling and training")
    dtype: Dtype = setting("float32", "model dtype")
    device: str = setting("cpu", "cpu | cuda | cuda:N")
    data: Optional[str] = setting(None, "prompt data (file, dir or hub id); null = the model dir's train.jsonl")
    split: str = setting("train", "split of data")
    threads: int = setting(0, "torch threads; 0 = torch's default")

    def __post_init__(self) -> None:
        missing = [k for k in ("model", "out") if not getattr(self, k)]
        if missing:
            raise ConfigError(f"missing {', '.join(m + '=DIR' for m in missing)}; usage: {USAGE}")
        if self.num_prompts < 1:
            raise ConfigError(f"num_prompts must be >= 1, got {self.num_prompts}")


def _main(argv: list[str]) -> None:
    o = parse_options(WarmupOptions, argv, tool=TOOL, usage=USAGE)
    if o.threads:
        torch.set_num_threads(o.threads)
    model_path = check_model_path(o.model)
    rows = load_split(o.data or model_path, o.split)
    pick = torch.randperm(len(rows), generator=torch.Generator().manual_seed(o.seed))[: o.num_prompts].tolist()
    tokenizer = load_tokenizer(model_path)
    model = load_causal_lm(model_path, o.dtype).to(o.device).eval()
    prompts = build_prompt_ids(tokenizer, [rows[i] for i in pick], STANDARD_INSTRUCTION)
    print(f"drafter warm-up: {len(prompts)} prompts from {o.data or model_path} ({o.split})")
    drafter, metrics = warmup_drafter(
        model, tokenizer, prompts, o.steps, max_new_tokens=o.max_new_tokens, temperature=o.temperature,
        rollout_batch_size=o.rollout_batch_size, batch_size=o.batch_size, window=o.window, lr=o.lr, seed=o.seed,
        eos_token_ids=eos_token_ids(model, tokenizer),
    )
    out = drafter.save(o.out)
    after = metrics.get("eval_after") or {}
    summary = f"loss {after['loss']:.4f} top1 {after['top1']:.3f}" if after else "no evaluation windows"
    print(f"drafter written to {out} (version {drafter.version}, {summary})")


def main(argv: Sequence[str] | None = None) -> None:
    """``python -m rlspec.warmup_drafter model=DIR out=DIR [steps=...] [num_prompts=...] ...``."""
    run_main(_main, argv, WarmupOptions, tool=TOOL, usage=USAGE)


if __name__ == "__main__":
    main()
