"""Speculation on or off in one engine, call by call: the rollout-level A/B with its noise floor.

Two engines on the same weights differ by up to ~7% in speed on the 2-core machines (where each
one's caches and fused weights land in memory), more than the effect to measure. So this script
uses ONE :class:`~rlspec.rollout.native.NativeEngine` with speculative settings and toggles its
lookup selector per call: ``plain`` (selector off), ``plain_again`` (the same, a second time: the
noise floor) and ``adaptive`` (lookups chosen per batch size), in a rotating order, over
``--calls`` training-like batches (``--prompts`` x ``--n`` samples of the training split, T=1, cap
``--max-new-tokens``). Printed: tokens/s of each and the ratio to ``plain``.

Usage::

    python bench/speculation_ab.py                                   # the embedded default (start model)
    python bench/speculation_ab.py --model runs/dler/checkpoints/step_000040/model --calls 24
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from longtail import build_prompts  # noqa: E402
from roofline import cpu_name  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=None, help="HF model dir (default: the embedded default)")
    ap.add_argument("--calls", type=int, default=24)
    ap.add_argument("--prompts", type=int, default=16)
    ap.add_argument("--n", type=int, default=8)
    ap.add_argument("--max-new-tokens", type=int, default=128)
    args = ap.parse_args()

    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from rlspec.config import SpeculativeConfig
    from rlspec.data import load_split
    from rlspec.embedded import get_embedded_model_path
    from rlspec.models import eos_token_ids
    from rlspec.rollout.base import SamplingParams
    from rlspec.rollout.native import NativeEngine

    data_dir = get_embedded_model_path()
    model_dir = Path(args.model) if args.model else data_dir
    model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    questions = load_split(data_dir, "train", "question", "answer")
    engine = NativeEngine(model, eos_token_ids(model, tokenizer), tokenizer=tokenizer,
                          speculative=SpeculativeConfig(enable=True, sources=["self", "group", "history"]))
    selector = engine.selector
    params = SamplingParams(max_new_tokens=args.max_new_tokens, temperature=1.0, seed=0)
    arms = ["plain", "plain_again", "adaptive"]
    seconds = {a: 0.0 for a in arms}
    tokens = {a: 0.0 for a in arms}
    sd_steps = 0.0
    rows = args.prompts * args.n
    for i in range(args.calls):
        prompts = build_prompts(tokenizer, questions, rows, args.n, offset=args.prompts * i)
        for arm in arms[i % 3:] + arms[: i % 3]:  # rotate the order
            engine.selector = selector if arm == "adaptive" else None
            t0 = time.perf_counter()
            out = engine.generate(prompts, params)
            seconds[arm] += time.perf_counter() - t0
            tokens[arm] += out.stats["tokens"]
            sd_steps += out.stats.get("spec/sd_steps", 0.0)
    print(f"{cpu_name()}, torch threads {torch.get_num_threads()}; model {model_dir}; {args.calls} calls of "
          f"{args.prompts} x {args.n}, cap {args.max_new_tokens}; {sd_steps:.0f} speculative steps")
    base = tokens["plain"] / seconds["plain"]
    for arm in arms:
        rate = tokens[arm] / seconds[arm]
        print(f"{arm:<12} {rate:>8.0f} tokens/s   ratio to plain {rate / base:.3f}")


if __name__ == "__main__":
    main()
