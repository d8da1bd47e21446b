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

Identical work still takes a few % longer in one trainer than in another (where each one's
tensors land in memory). With the position-keyed sampler a lookup-speculation run emits the same
tokens as the plain run, so ``--paired`` measures without a second trainer: ONE trainer with
speculation settings generates every rollout twice on its one engine, with the lookup selector on
and off (in turns, the history source withheld from the plain call), checks that both give the
same tokens, trains on them and charges each arm its own rollout time. The end-to-end ratio is
then ``(rest + rollout_on) / (rest + rollout_off)`` over the same steps.

Usage::

    python bench/train_ab.py --recipe dler
    python bench/train_ab.py --recipe grpo --steps 40 trainer.seed=1
    python bench/train_ab.py --recipe dler --paired
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
    ap.add_argument("--paired", action="store_true", help="one trainer, every rollout timed with speculation on and off")
    ap.add_argument("overrides", nargs="*", help="more train overrides, e.g. trainer.seed=1")
    args = ap.parse_args()
    if args.paired:
        return paired(args)

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



def paired(args: argparse.Namespace) -> None:
    import torch

    from rlspec.session import build_trainer, compose

    seconds = {"on": 0.0, "off": 0.0}
    calls, mismatches = [0], [0]
    with tempfile.TemporaryDirectory() as tmp:
        cfg = compose([f"+recipe={args.recipe}", f"trainer.steps={args.steps}", f"run_dir={tmp}/paired",
                       "rollout.speculative.enable=true", "trainer.save_every=0", *args.overrides])
        Path(cfg.run_dir).mkdir(parents=True)
        trainer = build_trainer(cfg, Path(cfg.run_dir), None)
        engine = trainer.engine
        if engine.selector is None or engine.drafter is not None:
            raise SystemExit("--paired needs lookup speculation without EAGLE (EAGLE drafts are not coupled)")
        selector, history = engine.selector, engine.history

        def run(arm: str, prompt_ids, params):
            engine.selector = selector if arm == "on" else None
            engine.history = history if arm == "on" else None
            t0 = time.perf_counter()
            out = engine.generate(prompt_ids, params)
            seconds[arm] += time.perf_counter() - t0
            return out

        def both(prompt_ids, params):
            calls[0] += 1
            order = ["on", "off"] if calls[0] % 2 else ["off", "on"]
            outs = {arm: run(arm, prompt_ids, params) for arm in order}
            engine.selector, engine.history = selector, history
            a, b = outs["on"].response_ids, outs["off"].response_ids
            differ = [i for i in range(len(a)) if a[i] != b[i]]
            if differ:  # float rounding between a verify forward and a plain step can move a sample
                i = differ[0]
                j = next((k for k, (x, y) in enumerate(zip(a[i], b[i])) if x != y), min(len(a[i]), len(b[i])))
                print(f"call {calls[0]}: {len(differ)} of {len(a)} rows differ (first: row {i} at token {j})", flush=True)
                mismatches[0] += len(differ)
            return outs["on"]

        trainer._rollout = both
        t0 = time.perf_counter()
        steps_rollout = 0.0
        for step in range(args.steps):
            m = trainer.train_step()
            steps_rollout += m["timing_s/rollout"]
            if (step + 1) % 10 == 0:
                print(f"step {step + 1}: rollout on {seconds['on']:.1f}s off {seconds['off']:.1f}s", flush=True)
        total = time.perf_counter() - t0
        end = trainer.evaluate(args.steps)
    rest = total - steps_rollout  # reward, advantage, update, weight sync; both rollouts are inside steps_rollout
    print(f"\n{cpu_name()}, torch threads {torch.get_num_threads()}; +recipe={args.recipe}, {args.steps} steps, "
          f"{calls[0]} rollout calls each generated with speculation on and off (same tokens) "
          f"{' '.join(args.overrides)}")
    print(f"rollout: on {seconds['on']:.1f} s, off {seconds['off']:.1f} s, ratio on/off {seconds['on'] / seconds['off']:.3f}")
    print(f"end to end (the rest of a step {rest:.1f} s): on {rest + seconds['on']:.1f} s, off {rest + seconds['off']:.1f} s, "
          f"ratio {(rest + seconds['on']) / (rest + seconds['off']):.3f}")
    print(f"end eval: accuracy {end['eval/accuracy']:.3f}, mean tokens {end['eval/mean_tokens']:.1f}; rows whose "
          f"tokens differed between the two rollouts: {mismatches[0]}")


if __name__ == "__main__":
    main()
