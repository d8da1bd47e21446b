"""Time one GRPO step of rlspec against TRL's GRPOTrainer on the same model, data and lengths.

Both sides get the same model directory, the same prompt rows (in the same order, no shuffling),
the same group size, prompts per step, max completion length, sampling temperature and torch
thread count, run ``--warmup-steps`` untimed steps, then ``--steps`` timed ones. Printed:
each side's mean s/step and mean completion length, and

    ratio = trl_s_per_step / rlspec_s_per_step          (> 1: rlspec is faster)

plus the same ratio per generated token, because sampled completions differ in length between
the two runs and step time grows with length.

TRL runs as fast as it goes on CPU (see bench/_trl_side.py): fp32, no gradient checkpointing,
no reference model, loss_type="dapo" with epsilon 0.2 / epsilon_high 0.28, HF ``generate``.

Usage::

    python bench/vs_trl.py                              # embedded default model + its train split
    python bench/vs_trl.py --embedded-preset tiny --steps 3
    python bench/vs_trl.py --model PATH                 # any save_pretrained dir with a chat template
    python bench/vs_trl.py --tiny-random --side trl     # smoke run of the TRL side on a random 4 M Qwen2
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Sequence

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _trl_side import StepTiming, build_random_tiny_qwen2, correctness_grader, time_trl_steps  # noqa: E402

INSTRUCTION = "Please reason step by step, and put your final answer within \\boxed{}."


# ------------------------------------------------------------------------------- rlspec side


def time_rlspec_steps(
    model_dir: str | Path,
    rows: Sequence[dict[str, Any]],
    *,
    num_generations: int,
    prompts_per_step: int,
    max_completion_length: int,
    temperature: float,
    steps: int,
    warmup_steps: int = 1,
    micro_batch_size: int | None = None,
    learning_rate: float = 2e-5,
    seed: int = 0,
) -> StepTiming:
    """Time ``steps`` rlspec GRPO steps after ``warmup_steps`` untimed ones.

    Same contract as :func:`_trl_side.time_trl_steps`: rlspec's trainer built from the
    Hydra-composed config on ``model_dir`` with ``rows`` in this order (``data.shuffle=false``),
    ``rollout.n = num_generations``, ``prompts_per_step``, ``max_response_length =
    max_completion_length``, ``temperature``, token-mean loss with clip 0.2 / 0.28 and no KL, as
    TRL is configured. Each step time covers the whole step: rollout + reward + update.
    """

    from rlspec.session import build_trainer, compose

    work = Path(tempfile.mkdtemp(prefix="rlspec-bench-vs-trl-"))
    data = work / "train.jsonl"
    data.write_text("".join(json.dumps({"question": r["question"], "answer": r["answer"]}) + "\n" for r in rows))
    overrides = [
        f"model.path={model_dir}",
        f"data.path={data}",
        f"data.test_path={data}",
        "data.shuffle=false",
        f"rollout.n={num_generations}",
        f"rollout.max_response_length={max_completion_length}",
        f"rollout.temperature={temperature}",
        f"trainer.prompts_per_step={prompts_per_step}",
        f"trainer.micro_batch_size={micro_batch_size or prompts_per_step * num_generations}",
        f"trainer.lr={learning_rate}",
        f"trainer.seed={seed}",
        "trainer.loss_agg_mode=token-mean",
        "trainer.clip_ratio_low=0.2",
        "trainer.clip_ratio_high=0.28",
        "trainer.kl_coef=0.0",
        f"trainer.steps={warmup_steps + steps}",
        "trainer.log_completions_every=0",
        "eval.at_start=false",
        "eval.at_end=false",
        f"run_dir={work / 'run'}",
    ]
    started = time.perf_counter()
    cfg = compose(overrides)
    trainer = build_trainer(cfg, work / "run")
    setup = time.perf_counter() - started
    timing = StepTiming(framework="rlspec", step_seconds=[], completion_lengths=[], accuracy=[], setup_seconds=setup)
    for i in range(warmup_steps + steps):
        t0 = time.perf_counter()
        metrics = trainer.train_step()
        elapsed = time.perf_counter() - t0
        if i < warmup_steps:
            timing.warmup_seconds += elapsed
            continue
        timing.step_seconds.append(elapsed)
        timing.completion_lengths.append(metrics["response_length/mean"])
        timing.accuracy.append(metrics["acc/mean"])
        for phase in ("rollout", "reward", "train"):
            timing.phase_seconds.setdefault(phase, []).append(metrics[f"timing_s/{phase}"])
    return timing


# ------------------------------------------------------------------------------ model + data


def resolve_model(args: argparse.Namespace) -> Path:
    if args.tiny_random:
        return build_random_tiny_qwen2(Path(tempfile.mkdtemp(prefix="rlspec-bench-tiny-")))
    if args.model:  # embedded | smollm2 | a .gguf file (dequantized once) | an HF dir
        from _models import resolve_bench_model_dir

        return resolve_bench_model_dir(args.model)
    try:
        from rlspec.embedded import resolve_model_path
    except ImportError:
        sys.exit("rlspec's embedded default is not importable yet; pass --model PATH or --tiny-random")
    print(f"resolving the embedded default (preset {args.embedded_preset}; built on first use) ...", flush=True)
    return Path(resolve_model_path(None, args.embedded_preset))


def load_rows(model_dir: Path, count: int, seed: int) -> tuple[list[dict[str, Any]], str]:
    """``count`` rows ``{question, answer, prompt}``: the model's train split, rlspec.tasks, or sums."""
    questions: list[tuple[str, str]] = []
    source = ""
    if (model_dir / "train.jsonl").is_file():  # the embedded model ships its data splits
        for line in (model_dir / "train.jsonl").read_text().splitlines():
            if line.strip():
                row = json.loads(line)
                questions.append((str(row["question"]), str(row["answer"])))
            if len(questions) == count:
                break
        source = f"{model_dir / 'train.jsonl'} (first {len(questions)} rows)"
    if len(questions) < count:
        try:
            from rlspec.tasks import make_splits
        except ImportError:
            rng = random.Random(seed)
            pairs = [(rng.randint(1, 50), rng.randint(1, 50)) for _ in range(count)]
            questions = [(f"What is {a} + {b}?", str(a + b)) for a, b in pairs]
            source = "random two-term sums (rlspec.tasks not importable)"
        else:
            train, _ = make_splits(seed=seed, n_train=count, n_test=0)
            questions = [(p.question, p.answer) for p in train]
            source = f"rlspec.tasks.make_splits(seed={seed})"
    rows = [
        {"question": q, "answer": a, "prompt": [{"role": "user", "content": f"{q}\n{INSTRUCTION}"}]}
        for q, a in questions
    ]
    return rows, source


# ------------------------------------------------------------------------------------- main


def _warn_if_busy(threads: int, when: str) -> None:
    """Other processes on the cores distort both sides, and 2 torch threads on a busy 2-core machine
    can be several times slower than 1 (OpenMP threads wait for each other), so say so."""
    load1 = os.getloadavg()[0]
    cores = os.cpu_count() or 1
    note = f"load average {load1:.2f} on {cores} cores {when} the runs"
    if load1 > max(cores - threads, 0) + 0.5:
        note += " -- the machine is busy: timings are unreliable; rerun when idle"
    print(note, flush=True)


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    src = p.add_mutually_exclusive_group()
    src.add_argument("--model", help="embedded | smollm2 | a .gguf file | a save_pretrained dir (tokenizer + chat "
                                     "template); default: embedded")
    src.add_argument("--tiny-random", action="store_true", help="a random 4 M Qwen2 (smoke runs only)")
    p.add_argument("--embedded-preset", choices=("default", "tiny"), default="default")
    p.add_argument("--num-generations", type=int, default=8, help="group size (rollout.n)")
    p.add_argument("--prompts-per-step", type=int, default=2)
    p.add_argument("--max-completion-length", type=int, default=256)
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--micro-batch-size", type=int, default=None, help="default: the whole step at once")
    p.add_argument("--steps", type=int, default=5, help="timed steps per side")
    p.add_argument("--warmup-steps", type=int, default=1)
    p.add_argument("--threads", type=int, default=2, help="torch threads for both sides")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--side", choices=("both", "trl", "rlspec"), default="both")
    return p.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    import torch

    torch.set_num_threads(args.threads)
    model_dir = resolve_model(args)
    rows, source = load_rows(model_dir, args.prompts_per_step * (args.warmup_steps + args.steps), args.seed)
    _, grader = correctness_grader()
    common = dict(
        num_generations=args.num_generations,
        prompts_per_step=args.prompts_per_step,
        max_completion_length=args.max_completion_length,
        temperature=args.temperature,
        steps=args.steps,
        warmup_steps=args.warmup_steps,
        micro_batch_size=args.micro_batch_size,
        seed=args.seed,
    )
    print(f"model: {model_dir}\ndata: {source}\nreward: {grader}")
    print(
        f"per step: {args.prompts_per_step} prompts x {args.num_generations} completions, "
        f"max {args.max_completion_length} tokens, T={args.temperature}, {args.threads} torch threads; "
        f"{args.warmup_steps} warm-up + {args.steps} timed steps per side",
        flush=True,
    )
    _warn_if_busy(args.threads, "before")
    results: dict[str, StepTiming] = {}
    if args.side in ("both", "trl"):
        results["trl"] = time_trl_steps(model_dir, rows, **common)
        print(results["trl"].summary(), flush=True)
    if args.side in ("both", "rlspec"):
        try:
            results["rlspec"] = time_rlspec_steps(model_dir, rows, **common)
        except NotImplementedError as err:
            print(f"rlspec: not timed ({err})")
            return 1
        print(results["rlspec"].summary(), flush=True)
    _warn_if_busy(args.threads, "after")
    if len(results) == 2:
        trl, ours = results["trl"], results["rlspec"]
        ratio = trl.s_per_step / ours.s_per_step
        per_token = (trl.s_per_step / trl.mean_completion_length) / (ours.s_per_step / ours.mean_completion_length)
        print(f"ratio = trl_s_per_step / rlspec_s_per_step = {trl.s_per_step:.3f} / {ours.s_per_step:.3f} = {ratio:.2f}x")
        if ours.phase_seconds.get("train"):
            update = statistics.fmean(ours.phase_seconds["train"])
            print(f"rlspec's update phase (forward + backward + optimizer, the same fp32 matmuls as TRL's) is "
                  f"{update:.2f} s of its step: even a free rollout and reward would give at most "
                  f"{trl.s_per_step / update:.2f}x")
        print(f"per generated token: {per_token:.2f}x (mean lengths trl {trl.mean_completion_length:.1f}, "
              f"rlspec {ours.mean_completion_length:.1f})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
