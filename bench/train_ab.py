"""End-to-end training with speculation on or off, side by side in ONE process, step by step.

Two training runs started minutes apart on the 2-core machines differ by up to 20% in wall time
(the same ``dler`` run took 115-141 s over one session), far more than the 2% that "never slower"
is about. So this script builds the arms' trainers in one process from the same config and seed
and interleaves them: step 1 of every arm (in a rotating order), then step 2, ... Machine drift
hits every arm alike. The arms:

* ``off``: ``rollout.speculative.enable=false``;
* ``off_again``: the same run again: its rollouts are bit-identical to ``off`` (seeded per step),
  so its time ratio to ``off`` is the noise floor (a second engine's memory placement included);
* ``on``: ``rollout.speculative.enable=true`` (the lossless lookup drafts and the step selector).

Each arm's time is what ``python -m rlspec.train`` spends after loading: the start eval, the
steps, the end eval (no checkpoints). Printed per arm: that time, its rollout time and rate, the
end accuracy and mean tokens, and the ratios to ``off``.

Usage::

    python bench/train_ab.py --recipe dler
    python bench/train_ab.py --recipe grpo --steps 40 trainer.seed=1
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from roofline import cpu_name  # noqa: E402

ARMS = {"off": "false", "off_again": "false", "on": "true"}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--recipe", default="dler")
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--arms", nargs="+", default=list(ARMS), choices=list(ARMS))
    ap.add_argument("overrides", nargs="*", help="more train overrides, e.g. trainer.seed=1")
    args = ap.parse_args()

    import torch

    from rlspec.session import build_trainer, compose

    trainers, seconds, rollout_s, tokens = {}, {}, {}, {}
    with tempfile.TemporaryDirectory() as tmp:
        for arm in args.arms:
            cfg = compose([f"+recipe={args.recipe}", f"trainer.steps={args.steps}", f"run_dir={tmp}/{arm}",
                           f"rollout.speculative.enable={ARMS[arm]}", "trainer.save_every=0", *args.overrides])
            Path(cfg.run_dir).mkdir(parents=True)
            trainers[arm] = build_trainer(cfg, Path(cfg.run_dir), None)
            seconds[arm] = rollout_s[arm] = tokens[arm] = 0.0

        def timed(arm: str, fn) -> dict:
            t0 = time.perf_counter()
            out = fn()
            seconds[arm] += time.perf_counter() - t0
            return out

        arms = list(args.arms)
        for arm in arms:
            timed(arm, lambda: trainers[arm].evaluate(0))
        for step in range(args.steps):
            k = step % len(arms)
            for arm in arms[k:] + arms[:k]:  # rotate who goes first
                m = timed(arm, trainers[arm].train_step)
                rollout_s[arm] += m["timing_s/rollout"]
                tokens[arm] += m["perf/generated_tokens"]
            if (step + 1) % 10 == 0:
                print(f"step {step + 1}: " + "  ".join(f"{a} {seconds[a]:.1f}s" for a in arms), flush=True)
        end = {arm: timed(arm, lambda: trainers[arm].evaluate(args.steps)) for arm in arms}

    print(f"\n{cpu_name()}, torch threads {torch.get_num_threads()}; +recipe={args.recipe}, {args.steps} steps, "
          f"interleaved in one process {' '.join(args.overrides)}")
    base, base_rate = seconds[arms[0]], tokens[arms[0]] / max(rollout_s[arms[0]], 1e-9)
    print(f"{'arm':<10} {'time_s':>7} {'ratio':>6} {'rollout_s':>9} {'tok/s':>7} {'rate':>6} {'acc':>6} {'tokens':>7}")
    for arm in arms:
        rate = tokens[arm] / max(rollout_s[arm], 1e-9)
        print(f"{arm:<10} {seconds[arm]:>7.1f} {seconds[arm] / base:>6.3f} {rollout_s[arm]:>9.1f} {rate:>7.0f} "
              f"{rate / base_rate:>6.3f} {end[arm]['eval/accuracy']:>6.3f} {end[arm]['eval/mean_tokens']:>7.1f}")


if __name__ == "__main__":
    main()
