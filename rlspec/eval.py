"""Evaluate a model on math benchmarks (pass@1, pass@k, maj@k, tokens, truncation; resumable).

    python -m rlspec.eval [model.path=DIR|HUB_ID|FILE.gguf] [model.gguf_file=NAME.gguf] [eval.benchmarks=[math500,heldout]]
        [out=runs/eval/NAME] [eval.prompt_template=chat|r1_zero|plain|'...{question}...']
        [eval.samples=4] [eval.max_new_tokens=32768] [eval.limit=N] [eval.temperature=0.6] [eval.top_p=0.95]
        [eval.top_k=0] [eval.seed=1234] [eval.seeding=per_problem|shared] [eval.require_think_close=false]
        [eval.last_number_fallback=null|true|false]
        [eval.grader_timeout_s=5] [eval.max_batch_size=256] [eval.call_rows=0] [eval.benchmarks.NAME.path=FILE_OR_DIR]
        [eval.base=DIR_OR_SUMMARY_JSON] [model.dtype=float32] [model.embedded_preset=default|tiny] [progress=auto|on|off]

``model.path`` omitted = the embedded default model. Benchmarks load from the hub unless
``eval.benchmarks.NAME.path`` points at a local copy (``heldout`` is rlspec's procedural split).
Written to ``out`` (default ``runs/eval/<model name>``): ``<benchmark>.jsonl`` per benchmark (one
line per problem with every sample; a rerun resumes from it), ``summary.json`` and ``summary.md``.
``eval.base`` names an earlier ``rlspec.eval`` output (its ``summary.json``) of the base model: each
benchmark then gets an AES score against it (same benchmark; use the same settings).
"""

from __future__ import annotations

import dataclasses
import json
import math
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, List, Literal, Optional, Sequence

from rlspec.cli import parse_options, run_main
from rlspec.config import ModelConfig
from rlspec.data import build_prompt_texts
from rlspec.embedded import resolve_model_path
from rlspec.errors import ConfigError
from rlspec.input_guards import check_tokenizer
from rlspec.evals.benchmarks import benchmark_names, load_benchmark
from rlspec.evals.metrics import aes_against
from rlspec.evals.runner import RunnerSettings, engine_and_eos, evaluate_benchmark
from rlspec.models import gguf_model_dir, gguf_source, is_gguf, load_causal_lm, load_tokenizer
from rlspec.schema import setting
from rlspec.session import resolve_device

TOOL = "rlspec.eval"
USAGE = (
    "python -m rlspec.eval [model.path=DIR] [eval.benchmarks=[math500,heldout]] [eval.samples=4] "
    "[eval.max_new_tokens=N] [eval.limit=N] [eval.benchmarks.NAME.path=FILE] [eval.base=DIR] [out=DIR]"
)
# the spelling users know, kept: eval.benchmarks.NAME.path=FILE is eval.paths.NAME=FILE
ALIASES = ((r"eval\.benchmarks\.([^.]+)\.path", r"eval.paths.\1"),)


@dataclass
class ModelOptions(ModelConfig):
    """The model(s) to evaluate (the training config's ``model`` keys; ``path`` may list several)."""

    path: Optional[Any] = setting(None, "a save_pretrained dir, hub id or .gguf file; [A,B,...]: several models, one table "
                                        "and plot; null = the embedded default")

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.path == "":
            self.path = None
        if isinstance(self.path, list) and len(self.path) < 2:
            raise ConfigError("model.path=[...] needs at least two models (give one as model.path=DIR)")


@dataclass
class EvalSection(RunnerSettings):
    """What to evaluate (``benchmarks``, ``paths``, ``limit``, ``base``) and how (the runner's settings)."""

    benchmarks: List[str] = setting(help="benchmarks to run", default_factory=lambda: ["heldout"])
    paths: Dict[str, str] = setting(help="local copy per benchmark (also eval.benchmarks.NAME.path=FILE); "
                                         "unset: the hub", default_factory=dict)
    limit: Optional[int] = setting(None, "the first N problems of each benchmark")
    base: Optional[str] = setting(None, "an earlier rlspec.eval out= dir (or its summary.json) of the base "
                                        "model: AES against it")

    def __post_init__(self) -> None:
        super().__post_init__()
        names = benchmark_names()
        if not self.benchmarks:
            raise ConfigError(f"eval.benchmarks is empty; name at least one of {', '.join(names)}")
        for b in self.benchmarks:
            if b not in names:
                raise ConfigError(f"unknown benchmark {b!r} in eval.benchmarks; available: {', '.join(names)}")
        if len(set(self.benchmarks)) != len(self.benchmarks):
            raise ConfigError(f"eval.benchmarks names a benchmark twice: {self.benchmarks}")
        for b in self.paths:
            if b not in self.benchmarks:
                raise ConfigError(f"eval.benchmarks.{b}.path is set but {b!r} is not in eval.benchmarks="
                                  f"{self.benchmarks}; add it there or drop the path")
        if self.limit is not None and self.limit < 1:
            raise ConfigError(f"eval.limit must be >= 1 (or null: every problem), got {self.limit}")

    @property
    def settings(self) -> RunnerSettings:
        return RunnerSettings(**self.record())


@dataclass
class EvalOptions:
    """``python -m rlspec.eval`` options."""

    model: ModelOptions = setting(help="the model(s)", default_factory=ModelOptions)
    eval: EvalSection = setting(help="benchmarks and sampling", default_factory=EvalSection)
    out: Optional[str] = setting(None, "output dir; default runs/eval/<model name>")
    progress: Literal["auto", "on", "off"] = setting("auto", "progress bar (auto: on a TTY)")


def parse_args(argv: Sequence[str]) -> EvalOptions:
    """Options from ``key=value`` arguments (see the module docstring).

    >>> o = parse_args(["eval.benchmarks=[math500,heldout]", "eval.samples=2", "eval.limit=5", "out=x"])
    >>> (o.eval.benchmarks, o.eval.samples, o.eval.limit, o.out)
    (['math500', 'heldout'], 2, 5, 'x')
    """
    return parse_options(EvalOptions, argv, tool=TOOL, usage=USAGE, aliases=ALIASES)


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


def default_out_name(mo: Any) -> str:
    """``runs/eval/<name>``: the model dir's or hub id's last part whole (``Qwen2.5-1.5B-Instruct``:
    dots are part of model names), a GGUF file's name without ``.gguf``."""
    if not mo.path:
        return f"embedded-{mo.embedded_preset}"
    name = Path(mo.gguf_file or mo.path.rstrip("/")).name
    return name[: -len(".gguf")] if is_gguf(name) else name


def run_eval(opts: EvalOptions) -> dict[str, Any]:
    """Load the model, evaluate every benchmark, write ``summary.json`` / ``summary.md``; return the summary."""
    ev, mo = opts.eval, opts.model
    base = _load_base(ev.base) if ev.base else None
    model_path = resolve_model_path(gguf_source(mo.path, mo.gguf_file), mo.embedded_preset)
    model_path = gguf_model_dir(model_path, mo.dtype, mo.trust_remote_code)  # a GGUF file: its dequantized HF dir
    out = Path(opts.out).expanduser() if opts.out else Path("runs/eval") / default_out_name(mo)
    problems = {name: load_benchmark(name, ev.paths.get(name), ev.limit) for name in ev.benchmarks}
    tokenizer = load_tokenizer(model_path, mo.trust_remote_code)
    build_prompt_texts(tokenizer, [{"question": ""}], ev.instruction, ev.prompt_template)  # no chat template: fail now
    model = load_causal_lm(model_path, mo.dtype, mo.trust_remote_code).to(resolve_device(mo.device))
    check_tokenizer(tokenizer, model, model_path)  # no tokenizer.json: one line, not 0% on empty prompts
    progress = opts.progress == "on" or (opts.progress == "auto" and sys.stderr.isatty())
    settings = ev.settings
    summary: dict[str, Any] = {
        "model": mo.path or f"embedded:{mo.embedded_preset}",
        "model_path": str(model_path),
        "settings": settings.record(),
        "limit": ev.limit,
        "benchmarks": {},
    }
    engine, _ = engine_and_eos(model, tokenizer, settings.max_batch_size)
    for name, probs in problems.items():
        result = evaluate_benchmark(engine, tokenizer, probs, settings, out, progress, benchmark=name)
        entry = {"metrics": result["metrics"], "settings": result["settings"], "path": ev.paths.get(name),
                 "generated": result["generated"]}
        base_entry = (base or {}).get("benchmarks", {}).get(name)
        if base_entry is not None:
            entry["aes"] = aes_against(result["metrics"], base_entry["metrics"])
            entry["base"] = ev.base
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
    paths = [str(p) for p in opts.model.path]
    out = Path(opts.out).expanduser() if opts.out else Path("runs/eval/compare")
    names = [Path(p).name or p.replace("/", "_") for p in paths]
    if len(set(names)) != len(names):  # same dir names from different parents: use the full paths
        names = [p.strip("/").replace("/", "_") for p in paths]
    summaries = {}
    for name, path in zip(names, paths):
        one = dataclasses.replace(opts, model=dataclasses.replace(opts.model, path=path), out=str(out / name))
        summaries[name] = run_eval(one)
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


def _main(argv: list[str]) -> None:
    opts = parse_args(argv)
    if isinstance(opts.model.path, list):
        result = run_many(opts)
        print(result["table"], end="")
        print(f"written to {result['out']}/ (compare.md, pareto.png, one folder per model)")
        return
    summary = run_eval(opts)
    print(markdown_summary(summary), end="")
    print(f"written to {summary['out']}/ (summary.json, summary.md, <benchmark>.jsonl)")


def main(argv: Sequence[str] | None = None) -> None:
    """``python -m rlspec.eval key=value ...`` (see the module docstring; ``--help`` lists the keys)."""
    run_main(_main, argv, EvalOptions, tool=TOOL, usage=USAGE)


if __name__ == "__main__":
    main()
