"""Long-tail rollout: plain decoding vs always-on speculative decoding vs the adaptive engine.

One RL-style rollout batch (``--prompts`` prompts x ``--n`` samples, T=1, EOS on, cap
``--max-new-tokens``): most responses end early and a few long ones form the tail. The same
prompts and seed go through three engines on the same model:

* ``plain``     -- NativeEngine without speculative decoding;
* ``always``    -- speculative decoding from the first decode step (``mode=always``);
* ``adaptive``  -- TLT's switch: speculative once <= ``--threshold`` rows stay unfinished for
                   ``--warmup-checks`` steps, reverting to plain if it measures SD slower.

Each engine is warmed up once (the adaptive bandit and revert state learn across calls, as in a
training run), then timed ``--repeats`` times; the median wall time is printed with the ratio
``plain / engine`` (> 1: faster than plain), the acceptance length and the share of SD steps.
The long-tail phase (from the point where the adaptive engine switches: <= ``--threshold`` rows
unfinished for ``--warmup-checks`` steps) is also timed on its own: plain's share of the wall time
in it bounds what speculative decoding on the tail can save, and its tokens/s against plain's is
the speed-up where SD runs.
Output distributions are identical by construction (tests/rollout/test_spec_engine.py), so the
token counts differ only by sampling noise.

Usage::

    python bench/longtail.py                                   # embedded default + its cached drafter
    python bench/longtail.py --model DIR --drafter DIR         # any Llama/Qwen2 model and its drafter
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=None, help="HF model dir (default: the embedded default)")
    ap.add_argument("--drafter", default=None, help="EagleDrafter dir (default: the embedded default's, built once)")
    ap.add_argument("--prompts", type=int, default=16)
    ap.add_argument("--n", type=int, default=8)
    ap.add_argument("--max-new-tokens", type=int, default=512)
    ap.add_argument("--threshold", type=int, default=8)
    ap.add_argument("--warmup-checks", type=int, default=10)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    from transformers import AutoModelForCausalLM, AutoTokenizer

    from rlspec.config import STANDARD_INSTRUCTION, SpeculativeConfig
    from rlspec.data import build_prompt_ids, load_split
    from rlspec.models import eos_token_ids
    from rlspec.rollout.base import SamplingParams
    from rlspec.rollout.native import NativeEngine
    from rlspec.rollout.speculative.eagle import EagleDrafter

    if args.model is None:
        from rlspec.embedded import get_embedded_drafter_path, get_embedded_model_path

        model_dir = get_embedded_model_path()
    else:
        model_dir = Path(args.model)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    rows = load_split(model_dir, "test", "question", "answer")[: args.prompts]
    instruction = STANDARD_INSTRUCTION
    prompts = [p for p in build_prompt_ids(tokenizer, rows, instruction) for _ in range(args.n)]
    if args.drafter is None:
        if args.model is not None:
            raise SystemExit("--drafter DIR is required with --model (warm one up: python -m rlspec.warmup_drafter)")
        train = load_split(model_dir, "train", "question", "answer")
        drafter_dir = get_embedded_drafter_path(model_dir, model, tokenizer, build_prompt_ids(tokenizer, train, instruction), 300)
    else:
        drafter_dir = Path(args.drafter)
    drafter = EagleDrafter.load(drafter_dir, model)
    eos = eos_token_ids(model, tokenizer)
    params = SamplingParams(max_new_tokens=args.max_new_tokens, temperature=1.0, seed=args.seed)

    def engine(mode: str, use_drafter: bool = True) -> NativeEngine:
        spec = SpeculativeConfig(mode=mode, threshold=args.threshold, warmup_checks=args.warmup_checks)
        e = NativeEngine(model, eos, tokenizer=tokenizer, speculative=spec)
        if use_drafter:
            e.set_drafter(drafter)
        return e

    # "plain" has the speculative settings but no drafter: it decodes plainly and only marks where
    # the adaptive engine's long-tail switch would fire, so both report the same tail phase
    engines = {"plain": engine("adaptive", use_drafter=False), "always": engine("always"),
               "adaptive": engine("adaptive")}
    params_of = {name: params for name in engines}
    for name, e in engines.items():  # warm-up (and let the adaptive engine learn)
        e.generate(prompts, params_of[name])
    times: dict[str, list[float]] = {k: [] for k in engines}
    tails: dict[str, list[float]] = {k: [] for k in engines}  # wall time from the long-tail point to the end
    tail_tokens: dict[str, list[float]] = {k: [] for k in engines}
    stats: dict[str, dict] = {}
    for _ in range(args.repeats):
        for name, e in engines.items():
            t0 = time.perf_counter()
            out = e.generate(prompts, params_of[name])
            times[name].append(time.perf_counter() - t0)
            stats[name] = {**out.stats, "lengths": sorted(len(r) for r in out.response_ids)}
            tails[name].append(out.stats.get("tail_seconds", 0.0))
            tail_tokens[name].append(out.stats.get("tail_tokens", 0.0))
    params_m = sum(p.numel() for p in model.parameters()) / 1e6
    print(f"model {model_dir.name} ({params_m:.1f}M params), drafter {drafter_dir.name}, "
          f"{args.prompts} prompts x {args.n}, cap {args.max_new_tokens}, threads {torch.get_num_threads()}")
    lengths = stats["plain"]["lengths"]
    print(f"plain response lengths: median {lengths[len(lengths) // 2]}, p90 {lengths[int(0.9 * len(lengths))]}, "
          f"max {lengths[-1]} (the long tail)")
    base = statistics.median(times["plain"])
    base_tail = statistics.median(tails["plain"])
    print(f"long tail (<= {args.threshold} rows unfinished for {args.warmup_checks} steps): "
          f"{base_tail:.2f} s of plain's {base:.2f} s ({100 * base_tail / base:.0f}% of the wall time)")
    print(f"{'engine':<10}{'wall s':>9}{'plain/engine':>14}{'tail s':>9}{'tail tok/s':>12}{'tail ratio':>12}"
          f"{'accept len':>12}{'SD steps':>10}{'reverted':>10}")
    base_tail_rate = statistics.median(tail_tokens["plain"]) / base_tail if base_tail else 0.0
    summary = {}
    for name in engines:
        t, tail = statistics.median(times[name]), statistics.median(tails[name])
        rate = statistics.median(tail_tokens[name]) / tail if tail else 0.0
        s = stats[name]
        if name == "always":  # its "tail" starts at the first step: the whole rollout, not comparable
            tail_cols = f"{'-':>9}{'-':>12}{'-':>12}"
        else:
            tail_cols = f"{tail:>9.2f}{rate:>12.0f}{(rate / base_tail_rate if base_tail_rate else 0.0):>12.2f}"
        print(f"{name:<10}{t:>9.2f}{base / t:>14.2f}{tail_cols}{s.get('spec/accept_length', 0.0):>12.2f}"
              f"{s.get('spec/frac_steps_sd', 0.0):>10.2f}{s.get('spec/reverted', 0.0):>10.0f}")
        summary[name] = {"wall_s": t, "tail_s": tail, "tail_tokens_per_s": rate}
    print("tail ratio = the engine's tokens/s over the long tail / plain's (tail lengths differ by sampling noise)")
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
