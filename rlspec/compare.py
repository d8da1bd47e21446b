"""Train several recipes on the same setup and compare them on the same held-out split.

    python -m rlspec.compare recipes=[grpo,dler,dler_da,siri] [out=runs/compare] [overrides...]

Every recipe runs with the same model, data, seed, steps and evaluation (the extra ``overrides``
apply to all of them, e.g. ``trainer.steps=20``); each run lives in ``<out>/<recipe>/`` and resumes
like any run. The start evaluation of the shared base model is the reference of the efficiency
scores. Written to ``<out>/``: ``compare.md`` (the table), ``compare.json`` and ``pareto.png``
(accuracy vs mean response tokens).
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any, Sequence

from rlspec.cli import parse_key_values, run_main
from rlspec.config import RLSpecConfig
from rlspec.errors import ConfigError, RLSpecError
from rlspec.evals.efficiency import aes
from rlspec.session import compose, group_options, run

DEFAULT_RECIPES = ("grpo", "dler")
USAGE = "python -m rlspec.compare recipes=[grpo,dler,...] [out=runs/compare] [training key=value ...]"


def parse_argv(argv: Sequence[str]) -> tuple[list[str], Path, list[str]]:
    """``(recipes, out_dir, overrides)`` from ``recipes=[a,b] out=DIR key=value ...``."""
    own, overrides = [], []
    for arg in argv:
        key = arg.lstrip("+").split("=", 1)[0]
        if key in ("recipe", "run_name", "run_dir"):
            raise ConfigError(f"{key} is set per recipe by rlspec.compare; use recipes=[...] and out=DIR")
        (own if key in ("recipes", "out") else overrides).append(arg)
    values = parse_key_values(own, USAGE)
    recipes = values.get("recipes", list(DEFAULT_RECIPES))
    recipes = [str(r) for r in (recipes if isinstance(recipes, list) else [recipes]) if str(r).strip()]
    if not recipes:
        raise ConfigError("recipes=[...] is empty; name at least one recipe, e.g. recipes=[grpo,dler]")
    available = group_options("recipe")
    for r in recipes:
        if r not in available:
            raise ConfigError(f"unknown recipe {r!r} in recipes=[...]; available: {', '.join(available)}")
    if len(set(recipes)) != len(recipes):
        raise ConfigError(f"recipes=[...] names a recipe twice: {recipes}")
    return recipes, Path(str(values.get("out", "runs/compare"))), overrides


def run_recipe(recipe: str, out: Path, overrides: Sequence[str]) -> dict[str, Any]:
    """Compose, validate and run one recipe; return its ``summary.json``."""
    typed = compose([f"recipe={recipe}", f"run_name={recipe}", f"run_dir={out / recipe}", *overrides])
    if not (typed.eval.at_start and typed.eval.at_end):
        raise ConfigError("rlspec.compare needs eval.at_start=true and eval.at_end=true (it compares those evals)")
    return run(typed)


def comparison_rows(summaries: dict[str, dict[str, Any]]) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """The base row (shared start evaluation) and one row per recipe, with AES against the base.

    Raises :class:`RLSpecError` if the recipes' start evaluations differ (then they did not
    share the base model or the evaluation settings, and a comparison would be meaningless).
    """
    for name, s in summaries.items():
        if not s.get("start") or not s.get("end"):
            raise RLSpecError(f"recipe {name!r} has no start or end evaluation (trainer.steps must be >= 1)")
    starts = {name: s["start"] for name, s in summaries.items()}
    first = next(iter(starts.values()))
    for name, start in starts.items():
        if start is None or abs(start["eval/accuracy"] - first["eval/accuracy"]) > 1e-9 or abs(
            start["eval/mean_tokens"] - first["eval/mean_tokens"]
        ) > 1e-6:
            raise RLSpecError(
                f"recipe {name!r} started from a different evaluation than the others; the recipes must share "
                f"model, data and eval settings (do not override model.*/eval.* inside a recipe)"
            )

    def row(label: str, m: dict[str, Any]) -> dict[str, Any]:
        return {
            "recipe": label,
            "accuracy": m["eval/accuracy"],
            "mean_tokens": m["eval/mean_tokens"],
            "mean_tokens_correct": m["eval/mean_tokens_correct"],
            "truncation_rate": m["eval/truncation_rate"],
        }

    base = row("start (base)", first)
    rows = []
    for name, s in summaries.items():
        r = row(name, s["end"])
        try:
            r["aes"] = aes(r["accuracy"], r["mean_tokens"], base["accuracy"], base["mean_tokens"])
        except ValueError:  # AES divides by the base accuracy and length: undefined for a 0% base
            r["aes"] = None
        r["wall_seconds"] = s.get("wall_seconds")
        rows.append(r)
    return base, rows


def markdown_table(base: dict[str, Any], rows: list[dict[str, Any]], steps: int | None = None) -> str:
    def fmt_tokens(x: float) -> str:
        return "n/a" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:.1f}"

    lines = [
        "| recipe | accuracy | mean tokens | tokens (correct) | truncated | AES vs base |",
        "| --- | --- | --- | --- | --- | --- |",
        f"| {base['recipe']} | {100 * base['accuracy']:.1f}% | {fmt_tokens(base['mean_tokens'])} | "
        f"{fmt_tokens(base['mean_tokens_correct'])} | {100 * base['truncation_rate']:.1f}% | 0.00 |",
    ]
    for r in rows:
        lines.append(
            f"| `{r['recipe']}` | {100 * r['accuracy']:.1f}% | {fmt_tokens(r['mean_tokens'])} | "
            f"{fmt_tokens(r['mean_tokens_correct'])} | {100 * r['truncation_rate']:.1f}% | "
            f"{'n/a' if r['aes'] is None else format(r['aes'], '+.2f')} |"
        )
    return "\n".join(lines) + "\n"


def pareto_plot(base: dict[str, Any], rows: list[dict[str, Any]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 4.8))
    ax.scatter([base["mean_tokens"]], [100 * base["accuracy"]], marker="*", s=180, color="black", label="base")
    colors = plt.get_cmap("tab20").colors
    markers = "osD^vP<>Xh"
    for i, r in enumerate(rows):  # a legend entry per recipe: labels in a cluster stay readable
        ax.scatter([r["mean_tokens"]], [100 * r["accuracy"]], s=55, color=colors[i % len(colors)],
                   marker=markers[i % len(markers)], label=r["recipe"], edgecolors="black", linewidths=0.4)
    ax.set_xlabel("mean response tokens (held-out)")
    ax.set_ylabel("accuracy, pass@1 (%)")
    ax.set_title("accuracy vs tokens (up and left is better)")
    ax.grid(alpha=0.3)
    ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize=8, frameon=False)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def compare(recipes: Sequence[str], out: Path, overrides: Sequence[str]) -> str:
    out.mkdir(parents=True, exist_ok=True)
    summaries = {r: run_recipe(r, out, overrides) for r in recipes}
    base, rows = comparison_rows(summaries)
    table = markdown_table(base, rows)
    command = "python -m rlspec.compare recipes=[" + ",".join(recipes) + "]" + "".join(f" {o}" for o in overrides)
    (out / "compare.md").write_text(f"{table}\nMade with `{command}`.\n")
    (out / "compare.json").write_text(json.dumps({"command": command, "base": base, "rows": rows}, indent=2))
    pareto_plot(base, rows, out / "pareto.png")
    return table


def _main(argv: list[str]) -> None:
    recipes, out, overrides = parse_argv(argv)
    print(compare(recipes, out, overrides))
    print(f"written: {out / 'compare.md'}, {out / 'compare.json'}, {out / 'pareto.png'}")


def main(argv: Sequence[str] | None = None) -> None:
    """``python -m rlspec.compare recipes=[...] [out=DIR] [training overrides]`` (``--help``: every training key)."""
    run_main(_main, argv, RLSpecConfig, tool="rlspec.compare", usage=USAGE)


if __name__ == "__main__":
    main()
