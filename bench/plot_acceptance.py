"""Acceptance length per training step, by draft source, from runs' ``metrics.jsonl``.

Redundancy falls as training removes re-checks, and with it what a lookup drafter can predict
from the response itself; the responses a prompt got in earlier epochs keep predicting it. This
plots ``spec/<source>/accept_length`` (tokens per target step of the rows the source drafted for)
and the speculative share of decode steps for each run given, and prints the per-epoch means.

Usage::

    python bench/plot_acceptance.py RUN_DIR [RUN_DIR ...] --out docs/acceptance.png [--steps-per-epoch N]
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

SOURCES = ("self", "group", "history", "eagle")


def read_metrics(run_dir: Path) -> list[dict]:
    """The training-step rows of a run's ``metrics.jsonl`` (those with speculative counters)."""
    rows = []
    for line in (run_dir / "metrics.jsonl").read_text().splitlines():
        row = json.loads(line)
        if "spec/sd_steps" in row:
            rows.append(row)
    return rows


def by_epoch(rows: list[dict], key: str, steps_per_epoch: int) -> dict[int, float]:
    """Mean of ``key`` over the steps of each epoch (steps without it are skipped).

    >>> by_epoch([{"step": 1, "k": 2.0}, {"step": 2, "k": 4.0}, {"step": 3, "k": 6.0}], "k", 2)
    {0: 3.0, 1: 6.0}
    """
    out: dict[int, list[float]] = {}
    for row in rows:
        if key in row:
            out.setdefault((int(row["step"]) - 1) // steps_per_epoch, []).append(float(row[key]))
    return {epoch: statistics.fmean(values) for epoch, values in sorted(out.items())}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("runs", nargs="+", type=Path)
    ap.add_argument("--out", type=Path, default=Path("acceptance.png"))
    ap.add_argument("--steps-per-epoch", type=int, default=0, help="print per-epoch means (0: skip)")
    args = ap.parse_args()

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax, ax_share) = plt.subplots(2, 1, figsize=(8, 7), sharex=True)
    for run in args.runs:
        rows = read_metrics(run)
        if not rows:
            raise SystemExit(f"{run}/metrics.jsonl has no speculative counters (was rollout.speculative.enable on?)")
        steps = [r["step"] for r in rows]
        for source in SOURCES:
            key = f"spec/{source}/accept_length"
            pts = [(r["step"], r[key]) for r in rows if r.get(key)]
            if pts:
                ax.plot(*zip(*pts), marker=".", label=f"{run.name}: {source}")
                if args.steps_per_epoch:
                    means = by_epoch(rows, key, args.steps_per_epoch)
                    print(f"{run.name} {source}: " + ", ".join(f"epoch {e}: {m:.2f}" for e, m in means.items()))
        ax_share.plot(steps, [r.get("spec/frac_steps_sd", 0.0) for r in rows], label=run.name)
    ax.set_ylabel("tokens per target step\n(rows the source drafted for)")
    ax.legend(fontsize=7)
    ax.grid(alpha=0.3)
    ax_share.set_ylabel("speculative share of decode steps")
    ax_share.set_xlabel("training step")
    ax_share.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(args.out, dpi=120)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
