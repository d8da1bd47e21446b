"""Evaluate a model on math benchmarks (pass@1, pass@k, maj@k, tokens, truncation; resumable).

    python -m rlspec.eval [model.path=DIR|HUB_ID] [eval.benchmarks=[math500,heldout]] [out=runs/eval/NAME]
        [eval.samples=4] [eval.max_new_tokens=32768] [eval.limit=N] [eval.temperature=0.6] [eval.top_p=0.95]
        [eval.top_k=0] [eval.seed=1234] [eval.seeding=per_problem|shared] [eval.require_think_close=false]
        [eval.grader_timeout_s=5] [eval.max_batch_size=256] [eval.benchmarks.NAME.path=FILE_OR_DIR]
        [eval.base=DIR_OR_SUMMARY_JSON] [model.dtype=float32] [model.embedded_preset=default|tiny] [progress=auto|on|off]

``model.path`` omitted = the embedded default model. Benchmarks load from the hub unless
``eval.benchmarks.NAME.path`` points at a local copy (``heldout`` is rlspec's procedural split).
Written to ``out`` (default ``runs/eval/<model name>``): ``<benchmark>.jsonl`` per benchmark (one
line per problem with every sample; a rerun resumes from it), ``summary.json`` and ``summary.md``.
``eval.base`` names an earlier ``rlspec.eval`` output (its ``summary.json``) of the base model: each
benchmark then gets an AES score against it (same benchmark; use the same settings).
"""

from __future__ import annotations

import json
import math
import sys
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Sequence

from rlspec.cli_args import parse_bool, parse_float, parse_int
from rlspec.errors import ConfigError, RLSpecError
from rlspec.evals.runner import RunnerSettings

USAGE = (
    "python -m rlspec.eval [model.path=DIR] [eval.benchmarks=[math500,heldout]] [eval.samples=4] "
    "[eval.max_new_tokens=N] [eval.limit=N] [eval.benchmarks.NAME.path=FILE] [eval.base=DIR] [out=DIR]"
)
DEFAULT_BENCHMARKS = ("heldout",)
_SETTING_TYPES = {f.name: f.type for f in fields(RunnerSettings)}


@dataclass
class EvalOptions:
    model_path: str | None = None
    model_paths: list[str] = field(default_factory=list)  # model.path=[A,B]: several models, one table + plot
    embedded_preset: str = "default"
    dtype: str = "float32"
    benchmarks: list[str] = field(default_factory=lambda: list(DEFAULT_BENCHMARKS))
    paths: dict[str, str] = field(default_factory=dict)
    limit: int | None = None
    base: str | None = None
    out: Path | None = None
    progress: str = "auto"
    settings: RunnerSettings = field(default_factory=RunnerSettings)


def _list(value: str) -> list[str]:
    value = value.strip()
    if value.startswith("[") and value.endswith("]"):
        value = value[1:-1]
    return [v.strip().strip("'\"") for v in value.split(",") if v.strip()]


def parse_args(argv: Sequence[str]) -> EvalOptions:
    """Options from ``key=value`` arguments (see the module docstring).

    >>> o = parse_args(["eval.benchmarks=[math500,heldout]", "eval.samples=2", "eval.limit=5", "out=x"])
    >>> (o.benchmarks, o.settings.samples, o.limit, str(o.out))
    (['math500', 'heldout'], 2, 5, 'x')
    """
    from rlspec.evals.benchmarks import benchmark_names

    opts = EvalOptions()
    setting_values: dict[str, Any] = {}
    for arg in argv:
        key, sep, value = arg.lstrip("+").partition("=")
        if not sep:
            raise ConfigError(f"argument {arg!r} is not key=value; usage: {USAGE}")
        if key == "model.path":
            if value.startswith("["):
                opts.model_paths = _list(value)
                if len(opts.model_paths) < 2:
                    raise ConfigError("model.path=[...] needs at least two models (give one as model.path=DIR)")
            else:
                opts.model_path = value or None
        elif key == "model.embedded_preset":
            if value not in ("default", "tiny"):
                raise ConfigError(f"model.embedded_preset must be default or tiny, got {value!r}")
            opts.embedded_preset = value
        elif key == "model.dtype":
            if value not in ("float32", "bfloat16", "float16"):
                raise ConfigError(f"model.dtype must be float32, bfloat16 or float16, got {value!r}")
            opts.dtype = value
        elif key == "out":
            if not value:
                raise ConfigError("out= is empty; give the output directory, e.g. out=runs/eval/mymodel")
            opts.out = Path(value)
        elif key == "progress":
            if value not in ("auto", "on", "off"):
                raise ConfigError(f"progress must be auto, on or off, got {value!r}")
            opts.progress = value
        elif key == "eval.benchmarks":
            opts.benchmarks = _list(value)
            if not opts.benchmarks:
                raise ConfigError(f"eval.benchmarks is empty; name at least one of {', '.join(benchmark_names())}")
        elif key.startswith("eval.benchmarks.") and key.endswith(".path"):
            opts.paths[key[len("eval.benchmarks."):-len(".path")]] = value
        elif key == "eval.limit":
            opts.limit = None if value.lower() in ("", "null", "none") else parse_int(key, value, 1)
        elif key == "eval.base":
            opts.base = value or None
        elif key.startswith("eval.") and key[5:] in _SETTING_TYPES:
            name = key[5:]
            kind = _SETTING_TYPES[name]
            if kind in ("int", int):
                setting_values[name] = parse_int(key, value, 0)
            elif kind in ("float", float):
                setting_values[name] = parse_float(key, value)
            elif kind in ("bool", bool):
                setting_values[name] = parse_bool(key, value)
            else:
                setting_values[name] = value
        else:
            known = ["model.path", "model.dtype", "model.embedded_preset", "out", "progress", "eval.benchmarks",
                     "eval.benchmarks.NAME.path", "eval.limit", "eval.base", *(f"eval.{n}" for n in _SETTING_TYPES)]
            raise ConfigError(f"unknown key {key!r}; valid keys: {', '.join(known)}")
    names = benchmark_names()
    for b in opts.benchmarks:
        if b not in names:
            raise ConfigError(f"unknown benchmark {b!r} in eval.benchmarks; available: {', '.join(names)}")
    if len(set(opts.benchmarks)) != len(opts.benchmarks):
        raise ConfigError(f"eval.benchmarks names a benchmark twice: {opts.benchmarks}")
    for b in opts.paths:
        if b not in opts.benchmarks:
            raise ConfigError(f"eval.benchmarks.{b}.path is set but {b!r} is not in eval.benchmarks={opts.benchmarks}; "
                              f"add it there or drop the path")
    opts.settings = RunnerSettings(**setting_values)
    return opts


def _fmt(x: Any, pct: bool = False) -> str:
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "n/a"
    return f"{100 * x:.1f}%" if pct else f"{x:.1f}"


def markdown_summary(summary: dict[str, Any]) -> str:
    """The ``summary.md`` table: one row per benchmark."""
    k = summary["settings"]["samples"]
    has_aes = any(b.get("aes") is not None for b in summary["benchmarks"].values())
    head = ["benchmark", "problems", "pass@1", f"pass@{k}", f"maj@{k}", "mean tokens", "tokens (correct)",
            "tokens (incorrect)", "truncated"] + (["AES vs base"] if has_aes else [])
    lines = [
        f"Model: `{summary['model']}`  ",
        f"k={k}, T={summary['settings']['temperature']}, top-p={summary['settings']['top_p']}, "
        f"max new tokens={summary['settings']['max_new_tokens']}, seeding={summary['settings']['seeding']}",
        "",
        "| " + " | ".join(head) + " |",
        "| " + " | ".join("---" for _ in head) + " |",
    ]
    for name, b in summary["benchmarks"].items():
        m = b["metrics"]
        row = [name, str(int(m["num_problems"])), _fmt(m["pass@1"], True), _fmt(m[f"pass@{k}"], True),
               _fmt(m[f"maj@{k}"], True), _fmt(m["mean_tokens"]), _fmt(m["mean_tokens_correct"]),
               _fmt(m["mean_tokens_incorrect"]), _fmt(m["truncation_rate"], True)]
        if has_aes:
            row.append("n/a" if b.get("aes") is None else f"{b['aes']:+.3f}")
        lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines) + "\n"


def _load_base(base: str) -> dict[str, Any]:
    path = Path(base).expanduser()
    if path.is_dir():
        path = path / "summary.json"
    if not path.is_file():
        raise ConfigError(f"eval.base={base}: {path} does not exist; point it at an earlier rlspec.eval out= directory")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
        data["benchmarks"]
    except (json.JSONDecodeError, KeyError, TypeError) as err:
        raise ConfigError(f"eval.base={base}: {path} is not an rlspec.eval summary.json ({err})") from None
    return data


def _json_safe(value: Any) -> Any:
    """NaN (e.g. mean tokens of correct samples when none is correct) as null: strict JSON."""
    if isinstance(value, float) and math.isnan(value):
        return None
    if isinstance(value, dict):
        return {k: _json_safe(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_json_safe(v) for v in value]
    return value


def run_eval(opts: EvalOptions) -> dict[str, Any]:
    """Load the model, evaluate every benchmark, write ``summary.json`` / ``summary.md``; return the summary."""
    import torch

    from rlspec.evals.benchmarks import load_benchmark
    from rlspec.evals.metrics import aes_against
    from rlspec.evals.runner import evaluate_benchmark
    from rlspec.models import load_causal_lm, load_tokenizer, resolve_model_path

    base = _load_base(opts.base) if opts.base else None
    model_path = resolve_model_path(opts.model_path, opts.embedded_preset)
    out = opts.out or Path("runs/eval") / (Path(model_path).name if opts.model_path else f"embedded-{opts.embedded_preset}")
    problems = {name: load_benchmark(name, opts.paths.get(name), opts.limit) for name in opts.benchmarks}
    tokenizer = load_tokenizer(model_path)
    model = load_causal_lm(model_path, opts.dtype)
    if torch.cuda.is_available():
        model = model.to("cuda")
    progress = opts.progress == "on" or (opts.progress == "auto" and sys.stderr.isatty())
    summary: dict[str, Any] = {
        "model": opts.model_path or f"embedded:{opts.embedded_preset}",
        "model_path": str(model_path),
        "settings": opts.settings.record(),
        "limit": opts.limit,
        "benchmarks": {},
    }
    from rlspec.evals.runner import _engine_and_eos

    engine, _ = _engine_and_eos(model, tokenizer, opts.settings.max_batch_size)
    for name, probs in problems.items():
        result = evaluate_benchmark(engine, tokenizer, probs, opts.settings, out, progress, benchmark=name)
        entry = {"metrics": result["metrics"], "settings": result["settings"], "path": opts.paths.get(name),
                 "generated": result["generated"]}
        base_entry = (base or {}).get("benchmarks", {}).get(name)
        if base_entry is not None:
            entry["aes"] = aes_against(result["metrics"], base_entry["metrics"])
            entry["base"] = opts.base
        summary["benchmarks"][name] = entry
    out.mkdir(parents=True, exist_ok=True)
    (out / "summary.json").write_text(json.dumps(_json_safe(summary), indent=2) + "\n", encoding="utf-8")
    (out / "summary.md").write_text(markdown_summary(summary), encoding="utf-8")
    summary["out"] = str(out)
    return summary


def run_many(opts: EvalOptions) -> dict[str, Any]:
    """Several models (``model.path=[A,B,...]``): each evaluated into ``<out>/<name>/`` (resumable),
    then one table over models x benchmarks (``compare.md``) and an accuracy-vs-tokens plot per
    benchmark (``pareto.png``) in ``<out>``."""
    import dataclasses

    out = opts.out or Path("runs/eval/compare")
    names = [Path(p).name or p.replace("/", "_") for p in opts.model_paths]
    if len(set(names)) != len(names):  # same dir names from different parents: use the full paths
        names = [p.strip("/").replace("/", "_") for p in opts.model_paths]
    summaries = {}
    for name, path in zip(names, opts.model_paths):
        summaries[name] = run_eval(dataclasses.replace(opts, model_path=path, model_paths=[], out=out / name))
    lines = ["| model | benchmark | pass@1 | mean tokens | tokens (correct) | truncated |", "| --- | --- | --- | --- | --- | --- |"]
    for name, summ in summaries.items():
        for bench, entry in summ["benchmarks"].items():
            m = entry["metrics"]
            lines.append(f"| {name} | {bench} | {_fmt(m.get('pass@1'), True)} | {_fmt(m.get('mean_tokens'))} | "
                         f"{_fmt(m.get('mean_tokens_correct'))} | {_fmt(m.get('truncation_rate'), True)} |")
    (out / "compare.md").write_text("\n".join(lines) + "\n", encoding="utf-8")
    plot_accuracy_vs_tokens(summaries, out / "pareto.png")
    return {"out": str(out), "models": summaries, "table": "\n".join(lines) + "\n"}


def plot_accuracy_vs_tokens(summaries: dict[str, dict[str, Any]], path: Path) -> None:
    """One panel per benchmark: pass@1 against mean tokens, a point per model."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    benches = sorted({b for s in summaries.values() for b in s["benchmarks"]})
    fig, axes = plt.subplots(1, len(benches), figsize=(4.5 * len(benches), 3.8), squeeze=False)
    for ax, bench in zip(axes[0], benches):
        for name, summ in summaries.items():
            m = summ["benchmarks"].get(bench, {}).get("metrics")
            if m and m.get("pass@1") is not None and m.get("mean_tokens") is not None:
                ax.scatter(m["mean_tokens"], 100 * m["pass@1"], label=name)
                ax.annotate(name, (m["mean_tokens"], 100 * m["pass@1"]), fontsize=7, xytext=(3, 3),
                            textcoords="offset points")
        ax.set_title(bench)
        ax.set_xlabel("mean tokens per answer")
        ax.set_ylabel("pass@1 (%)")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: Sequence[str] | None = None) -> None:
    """``python -m rlspec.eval key=value ...`` (see the module docstring)."""
    try:
        opts = parse_args(list(sys.argv[1:] if argv is None else argv))
        if opts.model_paths:
            result = run_many(opts)
            print(result["table"], end="")
            print(f"written to {result['out']}/ (compare.md, pareto.png, one folder per model)")
            return
        summary = run_eval(opts)
    except (RLSpecError, ValueError) as err:
        print(f"rlspec: error: {err}", file=sys.stderr)
        sys.exit(2)
    print(markdown_summary(summary), end="")
    print(f"written to {summary['out']}/ (summary.json, summary.md, <benchmark>.jsonl)")


if __name__ == "__main__":
    main()
