"""Eval throughput: ``rlspec.eval``'s batched ``per_problem`` path against one problem per call.

``python -m rlspec.eval`` with ``eval.seeding=per_problem`` used to generate one problem per
``generate`` call (a MATH-500 run at k=1 decoded at batch 1). Every row now draws from its own
random stream keyed by (problem uid, sample), so the runner batches ``eval.call_rows`` rows per
call (default ``max_batch_size``) and a problem's samples stay bit-identical. This script runs the
runner (:func:`rlspec.evals.runner.evaluate_benchmark`) both ways on the same problems, in the
same process:

* ``one``: ``eval.call_rows=1`` -- one problem per call, the old cost;
* ``batched``: ``--call-rows`` rows per call (default 0: the runner's default, ``max_batch_size``).
  On CPU a call of prompts of very different lengths wastes decode attention (every row attends
  over the longest row's columns); the runner sorts prompts by length, so smaller calls (32-64
  rows) are faster there: 256 problems of the embedded default, 1 thread: 14-16 s in one call,
  11 s at 64 rows, 10.5 s at 32.

It counts the problems whose samples are the same both ways (all of them, up to floating-point
rounding of the logits at another batch size: same streams), then prints wall time and
generated tokens/s per path and ``ratio = batched tokens/s / one tokens/s`` (same tokens both ways,
so also the wall-time ratio). Grading and file writes are included (they are part of an eval).

Models (``--models``): ``embedded`` (the embedded default), ``m40`` (a random-init Qwen2 with
bench/vllm_vs_native.py's ~40M body -- hidden 512, 8 layers, MLP 1536, 8/2 heads, tied embeddings --
and SmolLM2-135M's tokenizer and chat template, so a 49,152-token vocabulary: 49.3M params; random
weights rarely stop early, so most responses run to ``--max-new-tokens``), ``smollm2`` or a local
HF directory. Problems: the first ``--problems`` of MATH-500 from ``../shared/data/math500``.

Measured (AMD EPYC, 2 vCPUs shared with other jobs at load average ~3; ``--threads 1``, since two
torch threads on a loaded 2-core machine make batch-1 steps pathologically slow -- 52x "speed-ups"),
k=1, <= 256 tokens, every problem's samples the same both ways:

* embedded: 128 problems 5.3-5.7x (28.6 s -> 5.3 s, 35.4 s -> 6.2 s); 256 problems with
  ``--call-rows 64`` 5.2x (69.1 s -> 13.3 s); 64 problems 3.9x, 32 problems 4.4x;
* m40: 64 problems 5.5x (420.9 s -> 76.3 s: 39 -> 215 tokens/s).

Usage::

    python bench/eval_batching.py                                    # embedded and m40, 32 problems, k=1
    python bench/eval_batching.py --models embedded --problems 64 --max-new-tokens 256
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
MATH500 = Path(__file__).resolve().parents[2] / "shared" / "data" / "math500" / "test.jsonl"


def random_m40(vocab_size: int, eos_id: int, pad_id: int, seed: int = 0):
    """bench/vllm_vs_native.py's ~40M Qwen2 body with the given vocabulary, random weights, fp32.

    The tied embedding is scaled x8 so next-token distributions are peaked, as a trained model's:
    with near-uniform logits over 49k ids, top-p's cut-off token sits within float rounding of
    the 0.95 mark often enough that a row batched and alone keeps different nuclei (other tokens).
    """
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(seed)
    cfg = Qwen2Config(vocab_size=vocab_size, hidden_size=512, intermediate_size=1536, num_hidden_layers=8,
                      num_attention_heads=8, num_key_value_heads=2, max_position_embeddings=4096,
                      tie_word_embeddings=True, eos_token_id=eos_id, pad_token_id=pad_id)
    model = Qwen2ForCausalLM(cfg).eval()
    with torch.no_grad():
        model.get_input_embeddings().weight.mul_(8.0)
    return model


def load(name: str):
    """``(model, tokenizer, description)`` of a ``--models`` entry."""
    from _models import load_bench_model, resolve_bench_model_dir
    from rlspec.models import load_tokenizer

    if name == "m40":
        tokenizer = load_tokenizer(str(resolve_bench_model_dir("smollm2")))
        model = random_m40(len(tokenizer), tokenizer.eos_token_id, tokenizer.pad_token_id or 0)
        return model, tokenizer, "random-init Qwen2 (h512, L8, MLP 1536) + SmolLM2 tokenizer"
    model, tokenizer, path = load_bench_model(name)
    return model, tokenizer, str(path)


def run_one_model(name: str, args) -> dict:
    from rlspec.evals.benchmarks import load_benchmark
    from rlspec.evals.runner import RunnerSettings, engine_and_eos, evaluate_benchmark

    model, tokenizer, what = load(name)
    params = sum(p.numel() for p in model.parameters()) / 1e6
    problems = load_benchmark("math500", str(args.data), limit=args.problems)
    engine, _ = engine_and_eos(model, tokenizer, args.max_batch_size)
    base = dict(samples=args.samples, max_new_tokens=args.max_new_tokens, max_batch_size=args.max_batch_size,
                seed=args.seed)
    # warm-up: both shapes once (first-call allocations, kernels), not timed
    with tempfile.TemporaryDirectory() as tmp:
        evaluate_benchmark(engine, tokenizer, problems[:2], RunnerSettings(**{**base, "max_new_tokens": 8}), tmp,
                           progress=False)
    times: dict[str, list[float]] = {"one": [], "batched": []}
    samples: dict[str, dict] = {}
    tokens: dict[str, int] = {}
    for _ in range(args.repeats):
        for path, call_rows in (("one", 1), ("batched", args.call_rows)):  # alternating: load changes hit both
            with tempfile.TemporaryDirectory() as tmp:
                t0 = time.perf_counter()
                result = evaluate_benchmark(engine, tokenizer, problems, RunnerSettings(**base, call_rows=call_rows),
                                            tmp, progress=False)
                times[path].append(time.perf_counter() - t0)
            samples[path] = {r["uid"]: r["samples"] for r in result["records"]}
            tokens[path] = sum(s["tokens"] for r in result["records"] for s in r["samples"])
    same = sum(samples["one"][uid] == samples["batched"][uid] for uid in samples["one"])
    best = {path: min(ts) for path, ts in times.items()}
    row = dict(model=name, what=what, params_m=params, problems=len(problems), tokens=tokens["batched"], same=same,
               one_s=best["one"], batched_s=best["batched"], one_tps=tokens["one"] / best["one"],
               batched_tps=tokens["batched"] / best["batched"])
    row["ratio"] = row["batched_tps"] / row["one_tps"]
    print(f"{name}: {what}, {params:.1f}M params; {len(problems)} MATH-500 problems x k={args.samples}, "
          f"<= {args.max_new_tokens} tokens, max_batch_size={args.max_batch_size}, call_rows={args.call_rows}: "
          f"{tokens['batched']} tokens; "
          f"problems with the same samples both ways: {same}/{len(problems)}", flush=True)
    print(f"  one problem per call: {row['one_s']:.1f} s, {row['one_tps']:.0f} tokens/s (all: "
          f"{', '.join(f'{t:.1f}' for t in times['one'])} s)")
    print(f"  batched:              {row['batched_s']:.1f} s, {row['batched_tps']:.0f} tokens/s (all: "
          f"{', '.join(f'{t:.1f}' for t in times['batched'])} s)")
    print(f"  ratio batched / one: {row['ratio']:.2f}x", flush=True)
    return row


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", nargs="+", default=["embedded", "m40"])
    ap.add_argument("--problems", type=int, default=32, help="the first N MATH-500 problems")
    ap.add_argument("--samples", type=int, default=1, help="k, samples per problem")
    ap.add_argument("--max-new-tokens", type=int, default=256)
    ap.add_argument("--max-batch-size", type=int, default=256)
    ap.add_argument("--call-rows", type=int, default=0, help="eval.call_rows of the batched path (0: max_batch_size)")
    ap.add_argument("--repeats", type=int, default=1, help="timed runs per path (alternating); the fastest is reported")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--seed", type=int, default=1234)
    ap.add_argument("--data", type=Path, default=MATH500, help="MATH-500 test.jsonl")
    args = ap.parse_args(argv)
    if not args.data.is_file():
        raise SystemExit(f"no MATH-500 file at {args.data} (see ../shared/data/README.md); pass --data")
    torch.set_num_threads(args.threads)
    print(f"{args.threads} torch threads; CPU: {cpu_name()}")
    rows = [run_one_model(name, args) for name in args.models]
    print("\n| model | params | problems x k | tokens | one per call | batched | ratio | same samples |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- |")
    for r in rows:
        print(f"| {r['model']} | {r['params_m']:.1f}M | {r['problems']} x {args.samples} | {r['tokens']} | "
              f"{r['one_s']:.1f} s ({r['one_tps']:.0f} tok/s) | {r['batched_s']:.1f} s ({r['batched_tps']:.0f} tok/s) | "
              f"{r['ratio']:.2f}x | {r['same']}/{r['problems']} |")


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return "unknown"


if __name__ == "__main__":
    main()
