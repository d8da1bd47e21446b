"""Speculative rollouts against plain decoding, and against the roofline bound, on one model.

An RL-style rollout batch (``--prompts`` prompts x ``--n`` samples, T=1, EOS on, cap
``--max-new-tokens``) goes through ONE engine on the model, prompts and seed, with its step
selector swapped call by call (two engines on the same weights differ by up to ~7% in speed on the
2-core machines, where each one's caches and fused weights land in memory: more than the effect to
measure):

* ``plain``       -- no drafts (the engine marks where the long tail starts);
* ``plain_again`` -- the same a second time: the noise floor of the comparison;
* ``adaptive``    -- the default: per batch-size bucket the selector picks plain steps or lookup
                     drafts (``--sources``: self / group / history) by their measured speed-up over a
                     plain step; with ``--drafter`` the EAGLE drafter also runs on the long tail
                     (TLT's switch, probe and revert);
* ``always``      -- a draft at every decode step (no plain arm; the selector picks the length).

The engine first decodes a warm-up batch once per arm (the selectors learn; the history source
remembers it): with ``--history warm`` the warm-up is the same prompts (a later epoch of a small
training set), with ``cold`` (default) other prompts, so only the rollout's own text and its group
can draft. Every timed call starts from the history the warm-up left. Then each arm is timed
``--repeats`` times in a rotating order (median). Printed: wall time and ``plain / arm``, the long
tail's share, acceptance length per source, and the **bound** from ``bench/roofline.py``: the
best whole-rollout speed-up any draft source could give at the measured acceptance length, for
this rollout's rows-per-step profile, with plain steps where speculation loses (``T(rows, q)``
measured in the same run). ``arm / bound`` is how much of it is reached.

``--rows 1 2 4 ... 128`` instead runs fixed batches of that many rows (``--n`` samples per prompt,
one prompt below ``--n`` rows) and prints the same per batch size: the "never below 0.97x at any
batch size" check.

Usage::

    python bench/longtail.py                                     # embedded default, lookups
    python bench/longtail.py --rows 1 2 4 8 16 32 64 128 --max-new-tokens 256
    python bench/longtail.py --model smollm2 --rows 1 2 4 8 --max-new-tokens 128 --history warm
    python bench/longtail.py --model DIR --drafter DIR           # + the EAGLE drafter on the tail
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _models import bench_questions, load_bench_model  # noqa: E402
from roofline import QS, cpu_name, measure_grid, profile_bound, profile_from_lengths  # noqa: E402

GRID_ROWS = (1, 2, 4, 8, 16, 32, 64, 128)


def build_prompts(tokenizer, questions: list[dict], rows: int, n: int, offset: int) -> list[list[int]]:
    """``rows`` prompts: ``rows // n`` questions x ``n`` samples (one question below ``n`` rows)."""
    from rlspec.config import STANDARD_INSTRUCTION
    from rlspec.data import build_prompt_ids

    group = max(1, min(n, rows))
    picked = questions[offset: offset + -(-rows // group)]
    if len(picked) * group < rows:
        raise SystemExit(f"not enough questions for {rows} rows from offset {offset}")
    prompts = build_prompt_ids(tokenizer, picked, STANDARD_INSTRUCTION)
    return [p for p in prompts for _ in range(group)][:rows]


ARMS = ("plain", "plain_again", "adaptive", "always")


def make_engine(model, tokenizer, args):
    """The one engine, and per arm the step selector (None: plain) and drafter it runs with."""
    from rlspec.config import LookupConfig, SpeculativeConfig
    from rlspec.models import eos_token_ids
    from rlspec.rollout.native import NativeEngine
    from rlspec.rollout.speculative.eagle import EagleDrafter
    from rlspec.rollout.speculative.selector import StepSelector

    sources = list(args.sources) + (["eagle"] if args.drafter else [])
    spec = SpeculativeConfig(enable=True, mode="adaptive", sources=sources or ["eagle"], threshold=args.threshold,
                             lookup=LookupConfig(lengths=list(args.lengths)))
    engine = NativeEngine(model, eos_token_ids(model, tokenizer), tokenizer=tokenizer, speculative=spec)
    drafter = EagleDrafter.load(Path(args.drafter), model) if args.drafter else None
    adaptive = engine.selector
    always = StepSelector.for_lookups(spec.lookup, "always") if adaptive is not None else None
    return engine, {"plain": (None, None), "plain_again": (None, None), "adaptive": (adaptive, drafter),
                    "always": (always, drafter)}


def time_engines(engine, arms: dict, prompts: list[list[int]], warm: list[list[int]], args) -> dict:
    from rlspec.rollout.base import SamplingParams

    params = SamplingParams(max_new_tokens=args.max_new_tokens, temperature=1.0, seed=args.seed)

    def run(name: str, batch: list[list[int]]):
        engine.selector, drafter = arms[name]
        engine.set_drafter(drafter)
        t0 = time.perf_counter()
        out = engine.generate(batch, params)
        return time.perf_counter() - t0, out

    for name in ARMS:  # warm-up: the selectors learn, the history remembers
        run(name, warm)
    # every timed call starts from the history the warm-up left (not from the earlier calls' answers)
    warmed = engine.history.state_dict() if engine.history is not None else None
    runs: dict[str, list[tuple[float, dict, list[int]]]] = {k: [] for k in ARMS}
    for i in range(args.repeats):
        for name in ARMS[i % len(ARMS):] + ARMS[: i % len(ARMS)]:  # rotate the order: drift hits all alike
            if warmed is not None:
                engine.history.load_state_dict(warmed)
            seconds, out = run(name, prompts)
            runs[name].append((seconds, dict(out.stats), [len(r) for r in out.response_ids]))
    return runs


def report(runs: dict, grid: dict, label: str) -> dict:
    """One block of results; returns the figures as a dict."""
    def med(name: str, key: str) -> float:  # over the repeats that report it (a source may not draft in every one)
        values = [s[key] for _, s, _ in runs[name] if key in s]
        return statistics.median(values) if values else 0.0

    base = statistics.median(t for t, _, _ in runs["plain"])
    lengths = runs["plain"][0][2]
    profile = profile_from_lengths(lengths)
    base_tail = med("plain", "tail_seconds")
    out = {"label": label, "plain_s": base, "tail_share": base_tail / base if base else 0.0}
    print(f"\n== {label}: {len(lengths)} rows, plain {base:.2f} s, lengths median "
          f"{sorted(lengths)[len(lengths) // 2]} max {max(lengths)}, long tail {100 * out['tail_share']:.0f}% of it")
    print(f"{'arm':<12}{'wall s':>8}{'plain/arm':>10}{'accept':>8}{'SD frac':>8}{'bound':>7}{'of bound':>9}"
          f"   per source: accept length (drafted tokens)")
    for name in runs:
        t = statistics.median(t for t, _, _ in runs[name])
        a = med(name, "spec/accept_length")
        bound = profile_bound(grid, profile, max(a, 1.0), adaptive=True) if a > 1.0 else 1.0
        per = "  ".join(f"{src} {med(name, f'spec/{src}/accept_length'):.2f} ({med(name, f'spec/{src}/drafted'):.0f})"
                        for src in ("self", "group", "history", "eagle") if med(name, f"spec/{src}/drafted"))
        ratio = base / t
        print(f"{name:<12}{t:>8.2f}{ratio:>10.2f}{a:>8.2f}{med(name, 'spec/frac_steps_sd'):>8.2f}{bound:>7.2f}"
              f"{ratio / bound:>9.2f}   {per}")
        out[name] = {"wall_s": t, "ratio": ratio, "accept_length": a, "bound": bound, "of_bound": ratio / bound}
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="embedded", help="embedded | smollm2 | an HF model dir")
    ap.add_argument("--drafter", default=None, help="an EagleDrafter dir: EAGLE joins on the long tail")
    ap.add_argument("--sources", nargs="*", default=["self", "group", "history"])
    ap.add_argument("--lengths", nargs="+", type=int, default=[2, 4, 8], help="lookup draft lengths (arms)")
    ap.add_argument("--history", choices=["cold", "warm"], default="cold")
    ap.add_argument("--prompts", type=int, default=16)
    ap.add_argument("--n", type=int, default=8)
    ap.add_argument("--rows", nargs="*", type=int, default=None, help="fixed batch sizes instead of one rollout")
    ap.add_argument("--max-new-tokens", type=int, default=512)
    ap.add_argument("--threshold", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    model, tokenizer, model_dir = load_bench_model(args.model)
    questions = bench_questions(args.model, model_dir)
    params_m = sum(p.numel() for p in model.parameters()) / 1e6
    print(f"{cpu_name()}, torch threads {torch.get_num_threads()}; model {model_dir.name} ({params_m:.1f}M params); "
          f"sources {args.sources}{' + eagle' if args.drafter else ''}, lengths {args.lengths}, history {args.history}")
    sizes = args.rows or [args.prompts * args.n]
    grid_rows = sorted({r for r in GRID_ROWS if r <= max(sizes)} | {1})
    grid, _ = measure_grid(model, grid_rows, QS, context=200, repeats=3)
    results = []
    for rows in sizes:
        prompts = build_prompts(tokenizer, questions, rows, args.n, offset=0)
        warm = prompts if args.history == "warm" else build_prompts(tokenizer, questions, rows, args.n,
                                                                     offset=-(-rows // max(1, min(args.n, rows))))
        engine, arms = make_engine(model, tokenizer, args)
        runs = time_engines(engine, arms, prompts, warm, args)
        results.append(report(runs, grid, f"{rows} rows" if args.rows else "rollout"))
    if args.rows:
        print("\nrows        " + "  ".join(f"{r['label'].split()[0]:>6}" for r in results))
        for name in ARMS[1:]:
            print(f"{name:<12}" + "  ".join(f"{r[name]['ratio']:>6.2f}" for r in results))
    print("ratios: plain wall time / arm wall time (> 1: faster; plain_again: the noise floor); bound: bench/roofline.py at the measured "
          "acceptance length")
    if args.json:
        args.json.write_text(json.dumps({"cpu": cpu_name(), "args": vars(args) | {"json": str(args.json)},
                                         "grid": {str(q): v for q, v in grid.items()}, "results": results}, indent=1))


if __name__ == "__main__":
    main()
