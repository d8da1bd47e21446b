"""Speculative rollouts against plain decoding, and against the roofline bound, on one model.

An RL-style rollout batch (``--prompts`` prompts x ``--n`` samples, T=1, EOS on, cap
``--max-new-tokens``) goes through three engines on the same model, prompts and seed:

* ``plain``    -- NativeEngine without drafts (it marks where the long tail starts);
* ``adaptive`` -- the default: per batch-size bucket the selector picks plain steps or lookup drafts
                  (``--sources``: self / group / history) by measured tokens/s; with ``--drafter``
                  the EAGLE drafter also runs on the long tail (TLT's switch, probe and revert);
* ``always``   -- a draft at every decode step (no plain arm).

Each engine first decodes a warm-up batch (the selector learns; the history source remembers it):
with ``--history warm`` the warm-up is the same prompts (a later epoch of a small training set),
with ``cold`` (default) other prompts, so only the rollout's own text and its group can draft.
Then each engine is timed ``--repeats`` times (median). Printed: wall time and ``plain / engine``,
the long tail's share and tokens/s ratio, acceptance length per source, and the **bound** from
``bench/roofline.py``: the best whole-rollout speed-up any draft source could give at the measured
acceptance length, for this rollout's rows-per-step profile, with plain steps where speculation
loses (``T(rows, q)`` measured in the same run). ``engine / bound`` is how much of it is reached.

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


def make_engines(model, tokenizer, args) -> dict:
    from rlspec.config import LookupConfig, SpeculativeConfig
    from rlspec.models import eos_token_ids
    from rlspec.rollout.native import NativeEngine
    from rlspec.rollout.speculative.eagle import EagleDrafter

    eos = eos_token_ids(model, tokenizer)
    sources = list(args.sources) + (["eagle"] if args.drafter else [])
    drafter = EagleDrafter.load(Path(args.drafter), model) if args.drafter else None

    def engine(mode: str, srcs: list[str]) -> NativeEngine:
        spec = SpeculativeConfig(enable=True, mode=mode, sources=srcs or ["eagle"], threshold=args.threshold,
                                 lookup=LookupConfig(lengths=list(args.lengths)))
        e = NativeEngine(model, eos, tokenizer=tokenizer, speculative=spec)
        if drafter is not None and srcs:
            e.set_drafter(drafter)
        return e

    # "plain" keeps speculative settings with no source that can draft: it marks the tail switch only
    return {"plain": engine("adaptive", []), "adaptive": engine("adaptive", sources),
            "always": engine("always", sources)}


def time_engines(engines: dict, prompts: list[list[int]], warm: list[list[int]], args) -> dict:
    from rlspec.rollout.base import SamplingParams

    params = SamplingParams(max_new_tokens=args.max_new_tokens, temperature=1.0, seed=args.seed)
    for e in engines.values():  # warm-up: the selector learns, the history remembers
        e.generate(warm, params)
    runs: dict[str, list[tuple[float, dict, list[int]]]] = {k: [] for k in engines}
    for _ in range(args.repeats):
        for name, e in engines.items():
            t0 = time.perf_counter()
            out = e.generate(prompts, params)
            runs[name].append((time.perf_counter() - t0, dict(out.stats), [len(r) for r in out.response_ids]))
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
    print(f"{'engine':<10}{'wall s':>8}{'plain/eng':>10}{'accept':>8}{'SD frac':>8}{'bound':>7}{'of bound':>9}"
          f"   per source: accept length (drafted tokens)")
    for name in runs:
        t = statistics.median(t for t, _, _ in runs[name])
        a = med(name, "spec/accept_length")
        bound = profile_bound(grid, profile, max(a, 1.0), adaptive=True) if a > 1.0 else 1.0
        per = "  ".join(f"{src} {med(name, f'spec/{src}/accept_length'):.2f} ({med(name, f'spec/{src}/drafted'):.0f})"
                        for src in ("self", "group", "history", "eagle") if med(name, f"spec/{src}/drafted"))
        ratio = base / t
        print(f"{name:<10}{t:>8.2f}{ratio:>10.2f}{a:>8.2f}{med(name, 'spec/frac_steps_sd'):>8.2f}{bound:>7.2f}"
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
        engines = make_engines(model, tokenizer, args)
        runs = time_engines(engines, prompts, warm, args)
        results.append(report(runs, grid, f"{rows} rows" if args.rows else "rollout"))
    if args.rows:
        print("\nrows  " + "  ".join(f"{r['label'].split()[0]:>6}" for r in results))
        for name in ("adaptive", "always"):
            print(f"{name:<6}" + "  ".join(f"{r[name]['ratio']:>6.2f}" for r in results))
    print("ratios: plain wall time / engine wall time (> 1: faster); bound: bench/roofline.py at the measured "
          "acceptance length")
    if args.json:
        args.json.write_text(json.dumps({"cpu": cpu_name(), "args": vars(args) | {"json": str(args.json)},
                                         "grid": {str(q): v for q, v in grid.items()}, "results": results}, indent=1))


if __name__ == "__main__":
    main()
