"""Drafter drift during RL: a frozen drafter vs the online-trained one (TLT's spot trainer).

Runs a real rlspec training run (default ``+recipe=grpo`` on the embedded default, with
``rollout.speculative.enable=true`` so the spot trainer trains the engine's drafter during each
rollout's long tail). After every RL step both drafters -- a frozen copy of the warmed-up starting
drafter and the online one -- draft for the *current* policy on the same fixed probe prompts
(greedy, always-on speculative decoding, one fixed draft shape) and their acceptance lengths
(tokens emitted per target forward) are printed side by side and plotted. The online drafter should
hold its acceptance length while the frozen one's falls as the policy drifts away from it.

Usage::

    python bench/drafter_drift.py [--steps 20] [--out runs/drafter_drift] [hydra overrides...]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--recipe", default="grpo")
    ap.add_argument("--out", default="runs/drafter_drift")
    ap.add_argument("--probe-prompts", type=int, default=32)
    ap.add_argument("--probe-tokens", type=int, default=160)
    ap.add_argument("--arm", default="4_1_4", help="draft shape depth_topk_verify for the probes")
    args, overrides = ap.parse_known_args()

    from rlspec.config import SpeculativeConfig
    from rlspec.rollout.base import SamplingParams
    from rlspec.rollout.native import NativeEngine
    from rlspec.session import build_trainer, compose

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    typed = compose([
        f"recipe={args.recipe}", f"run_dir={out / 'run'}", f"trainer.steps={args.steps}", "eval.at_start=false",
        "eval.at_end=false", "trainer.save_every=0", "trainer.resume=disable", "logger.progress=off",
        "rollout.speculative.enable=true", *overrides])
    import shutil

    shutil.rmtree(out / "run", ignore_errors=True)
    (out / "run").mkdir(parents=True)
    trainer = build_trainer(typed, out / "run")
    online = trainer.engine.drafter
    frozen = online.clone()  # the warmed-up starting drafter, never trained again
    probe = trainer.eval_prompt_ids[: args.probe_prompts]
    params = SamplingParams(max_new_tokens=args.probe_tokens, temperature=0.0)

    def acceptance(drafter) -> float:
        engine = NativeEngine(trainer.model, trainer.eos_ids, speculative=SpeculativeConfig(
            mode="always", bandit={"policy": "fixed", "fixed_arms": [args.arm] * 4}))
        engine.set_drafter(drafter)
        return engine.generate(probe, params).stats["spec/accept_length"]

    series = {"step": [], "frozen": [], "online": [], "drafter_steps": []}
    print(f"{'step':>5}{'frozen':>10}{'online':>10}{'drafter steps':>15}")
    for step in range(0, args.steps + 1):
        if step:
            metrics = trainer.train_step()
        else:
            metrics = {}
        series["step"].append(step)
        series["frozen"].append(acceptance(frozen))
        series["online"].append(acceptance(online))
        series["drafter_steps"].append(metrics.get("drafter/steps", 0.0))
        print(f"{step:>5}{series['frozen'][-1]:>10.3f}{series['online'][-1]:>10.3f}{series['drafter_steps'][-1]:>15.0f}",
              flush=True)
    (out / "drift.json").write_text(json.dumps(series, indent=2))
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.plot(series["step"], series["frozen"], "o-", label="frozen drafter")
    ax.plot(series["step"], series["online"], "s-", label="online drafter (spot trainer)")
    ax.set_xlabel("RL step")
    ax.set_ylabel("acceptance length (tokens / target forward)")
    ax.set_title(f"drafter drift, +recipe={args.recipe}, draft shape {args.arm}")
    ax.legend()
    fig.tight_layout()
    fig.savefig(out / "drift.png", dpi=120)
    print(f"wrote {out / 'drift.json'} and {out / 'drift.png'}")


if __name__ == "__main__":
    main()
