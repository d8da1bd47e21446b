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
import sys
from pathlib import Path
from typing import Any, Sequence

from rlspec.errors import ConfigError, RLSpecError

DEFAULT_RECIPES = ("grpo", "dler")


def parse_argv(argv: Sequence[str]) -> tuple[list[str], Path, list[str]]:
    """``(recipes, out_dir, overrides)`` from ``recipes=[a,b] out=DIR key=value ...``."""
    from rlspec.train import group_options

    recipes: list[str] = list(DEFAULT_RECIPES)
    out = Path("runs/compare")
    overrides: list[str] = []
    for arg in argv:
        if arg.startswith("recipes="):
            value = arg[len("recipes="):].strip()
            if value.startswith("[") and value.endswith("]"):
                value = value[1:-1]
            recipes = [r.strip() for r in value.split(",") if r.strip()]
        elif arg.startswith("out="):
            out = Path(arg[len("out="):])
        elif arg.startswith(("recipe=", "+recipe=", "run_name=", "run_dir=")):
            raise ConfigError(f"{arg.split('=')[0]} is set per recipe by rlspec.compare; use recipes=[...] and out=DIR")
        else:
            overrides.append(arg)
    if not recipes:
        raise ConfigError("recipes=[...] is empty; name at least one recipe, e.g. recipes=[grpo,dler]")
    available = group_options("recipe")
    for r in recipes:
        if r not in available:
            raise ConfigError(f"unknown recipe {r!r} in recipes=[...]; available: {', '.join(available)}")
    if len(set(recipes)) != len(recipes):
        raise ConfigError(f"recipes=[...] names a recipe twice: {recipes}")
    return recipes, out, overrides


def run_recipe(recipe: str, out: Path, overrides: Sequence[str]) -> dict[str, Any]:
    """Compose, validate and run one recipe; return its ``summary.json``."""
    from hydra import compose, initialize_config_module
    from omegaconf import OmegaConf

    from rlspec.config import validate_config
    from rlspec.train import precheck_overrides, run

    args = [f"recipe={recipe}", f"run_name={recipe}", f"run_dir={out / recipe}", *overrides]
    precheck_overrides(args)
    with initialize_config_module(config_module="rlspec.configs", version_base="1.3"):
        cfg = compose(config_name="train", overrides=args)
    typed = validate_config(cfg)
    if not (typed.eval.at_start and typed.eval.at_end):
        raise ConfigError("rlspec.compare needs eval.at_start=true and eval.at_end=true (it compares those evals)")
    resolved = OmegaConf.to_container(OmegaConf.structured(typed), resolve=True)
    return run(typed, resolved)


def comparison_rows(summaries: dict[str, dict[str, Any]]) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """The base row (shared start evaluation) and one row per recipe, with AES against the base.

    Raises :class:`RLSpecError` if the recipes' start evaluations differ (then they did not
    share the base model or the evaluation settings, and a comparison would be meaningless).
    """
    from rlspec.evals.efficiency import aes

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


def main(argv: Sequence[str] | None = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        recipes, out, overrides = parse_argv(argv)
        table = compare(recipes, out, overrides)
    except RLSpecError as err:
        print(f"rlspec: error: {err}", file=sys.stderr)
        sys.exit(2)
    print(table)
    print(f"written: {out / 'compare.md'}, {out / 'compare.json'}, {out / 'pareto.png'}")


if __name__ == "__main__":
    main()
