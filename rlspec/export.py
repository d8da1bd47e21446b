"""Export a training run's checkpoint as a clean Hugging Face model directory with a model card.

    python -m rlspec.export run_dir=runs/dler out=exports/dler [checkpoint=latest]
        [merge.base=start|DIR] [merge.top_k=0.25] [merge.scale=0.7] [merge.per_tensor=true] [overwrite=false]

``checkpoint`` is ``latest`` (default: the run's ``checkpoints/latest``), a checkpoint name
(``step_000040``), a step number (``40``) or a tag from ``checkpoints/tags.json`` (e.g. SIRI's
``siri-low``; a tag on several checkpoints picks the newest). Written to ``out``:

* the weights as safetensors, ``config.json``, the tokenizer files and the chat template;
* ``generation_config.json`` with the sampling the run was evaluated with (``eval.temperature``,
  ``eval.top_p``, ``eval.top_k`` of the run's config; default T=0.6, top-p 0.95, no top-k),
  ``do_sample=true`` and the model's EOS / pad ids;
* ``README.md``, a model card: the recipe, the held-out evaluation of the run, the merge settings
  (if any), how to load the model, and the resolved config.

``merge.base`` turns on DLER's update-selective merge (arXiv 2510.15110, Sec. 4.6;
:func:`rlspec.merging.update_selective_merge`): the exported weights are
``base + scale * topk(tuned - base)``. ``merge.base=start`` merges into the model the run started
from (the config's ``model.path``, or the embedded default of ``model.embedded_preset``).

If the checkpoint has a ``drafter/`` directory it is copied to the sibling ``<out>-drafter``.
Both directories are built in a temporary directory beside their destination and moved into place
with ``os.replace``; an existing non-empty ``out`` is only replaced with ``overwrite=true``.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

from rlspec.cli_args import parse_bool, parse_float
from rlspec.errors import ConfigError, ModelLoadError, RLSpecError

__all__ = ["ExportOptions", "parse_args", "resolve_checkpoint", "generation_settings", "eval_table",
           "export_run", "main"]

USAGE = ("python -m rlspec.export run_dir=DIR out=DIR [checkpoint=latest|step_N|N|TAG] [merge.base=start|DIR] "
         "[merge.top_k=0.25] [merge.scale=0.7] [merge.per_tensor=true] [overwrite=false]")
KEYS = ("run_dir", "out", "checkpoint", "merge.base", "merge.top_k", "merge.scale", "merge.per_tensor", "overwrite")
DEFAULT_SAMPLING = {"temperature": 0.6, "top_p": 0.95, "top_k": 0}  # the standard reasoning-model sampling


# ------------------------------------------------------------------------------------- options
@dataclass
class ExportOptions:
    run_dir: Path
    out: Path
    checkpoint: str = "latest"
    merge_base: str | None = None  # None = no merge; "start" = the run's starting model; else a dir
    top_k: float = 0.25
    scale: float = 0.7
    per_tensor: bool = True
    overwrite: bool = False


def parse_args(argv: Sequence[str]) -> ExportOptions:
    """Options from ``key=value`` arguments (see :data:`USAGE`).

    >>> o = parse_args(["run_dir=runs/dler", "out=exports/dler", "merge.base=start", "merge.scale=0.5"])
    >>> (o.checkpoint, o.merge_base, o.top_k, o.scale, o.per_tensor, o.overwrite)
    ('latest', 'start', 0.25, 0.5, True, False)
    >>> parse_args(["run_dir=r", "out=o", "merge.top_k=0.5"])
    Traceback (most recent call last):
    ...
    rlspec.errors.ConfigError: merge.top_k is set but merge.base is not; add merge.base=start (the run's starting model) or merge.base=DIR
    """
    args: dict[str, str] = {}
    for arg in argv:
        key, sep, value = arg.partition("=")
        if not sep or key not in KEYS:
            raise ConfigError(f"unknown argument {arg!r}; usage: {USAGE}")
        args[key] = value
    missing = [k for k in ("run_dir", "out") if not args.get(k)]
    if missing:
        raise ConfigError(f"missing {', '.join(m + '=DIR' for m in missing)}; usage: {USAGE}")
    merge_keys = [k for k in ("merge.top_k", "merge.scale", "merge.per_tensor") if k in args]
    base = args.get("merge.base") or None
    if merge_keys and base is None:
        raise ConfigError(f"{merge_keys[0]} is set but merge.base is not; add merge.base=start "
                          f"(the run's starting model) or merge.base=DIR")
    top_k = parse_float("merge.top_k", args.get("merge.top_k", "0.25"))
    if not 0 < top_k <= 1:
        raise ConfigError(f"merge.top_k must be a fraction in (0, 1] of each update to keep (DLER: 0.25), got {top_k}")
    checkpoint = args.get("checkpoint", "latest").strip() or "latest"
    return ExportOptions(
        run_dir=Path(args["run_dir"]).expanduser(),
        out=Path(args["out"]).expanduser(),
        checkpoint=checkpoint,
        merge_base=base,
        top_k=top_k,
        scale=parse_float("merge.scale", args.get("merge.scale", "0.7")),
        per_tensor=parse_bool("merge.per_tensor", args.get("merge.per_tensor", "true")),
        overwrite=parse_bool("overwrite", args.get("overwrite", "false")),
    )


# --------------------------------------------------------------------------------- checkpoints
def _is_model_checkpoint(path: Path) -> bool:
    return path.is_dir() and ".tmp-" not in path.name and (path / "model" / "config.json").is_file()


def _checkpoints(run_dir: Path) -> list[str]:
    root = run_dir / "checkpoints"
    return sorted(p.name for p in root.glob("step_*") if _is_model_checkpoint(p)) if root.is_dir() else []


def _tags(run_dir: Path) -> dict[str, list[str]]:
    path = run_dir / "checkpoints" / "tags.json"
    if not path.is_file():
        return {}
    try:
        tags = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise ConfigError(f"{path} is not valid JSON ({err}); fix or delete it") from None
    return {str(k): [str(n) for n in (v if isinstance(v, list) else [v])] for k, v in tags.items()}


def resolve_checkpoint(run_dir: str | Path, name: str = "latest") -> tuple[Path, str]:
    """``(checkpoint dir, note)`` for ``checkpoint=name``: ``latest``, ``step_N``, ``N`` or a tag.

    Read-only: unlike :func:`rlspec.checkpoint.find_latest_checkpoint` it removes no leftover
    temporary directories (a trainer may still be writing one). ``note`` says how a tag or
    ``latest`` was resolved (empty if there is nothing to say).
    """
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise ConfigError(f"run_dir={run_dir} does not exist; give the directory of a training run "
                          f"(it holds config.yaml and checkpoints/)")
    root = run_dir / "checkpoints"
    names = _checkpoints(run_dir)
    if not names:
        raise ConfigError(f"run_dir={run_dir} has no checkpoint ({root}/step_*/model/config.json); train it "
                          f"until the end or with trainer.save_every > 0")
    tags = _tags(run_dir)
    if name == "latest":
        latest_file = root / "latest"
        pointed = latest_file.read_text().strip() if latest_file.is_file() else ""
        if pointed in names:
            return root / pointed, ""
        return root / names[-1], (f"checkpoints/latest names {pointed!r}, which is not a complete checkpoint; "
                                  f"using the newest complete one, {names[-1]}" if pointed else "")
    candidate = name
    if name.isdigit():
        candidate = f"step_{int(name):06d}"
    if candidate in names:
        return root / candidate, ""
    if name in tags:
        present = sorted(n for n in tags[name] if n in names)
        if not present:
            raise ConfigError(f"checkpoint={name}: the tag names {', '.join(tags[name])}, none of which is left "
                              f"in {root}; available: {_available(run_dir, names, tags)}")
        note = ""
        if len(present) > 1:
            note = (f"tag {name!r} is on {', '.join(present)}; exporting the newest, {present[-1]} "
                    f"(give checkpoint=step_N for another)")
        return root / present[-1], note
    raise ConfigError(f"checkpoint={name} is not a checkpoint or tag of {run_dir}; available: "
                      f"{_available(run_dir, names, tags)}")


def _available(run_dir: Path, names: list[str], tags: dict[str, list[str]]) -> str:
    latest_file = run_dir / "checkpoints" / "latest"
    latest = latest_file.read_text().strip() if latest_file.is_file() else names[-1]
    text = f"latest (= {latest}), {', '.join(names)}"
    if tags:
        text += "; tags: " + ", ".join(f"{t} ({', '.join(ns)})" for t, ns in sorted(tags.items()))
    return text


# ------------------------------------------------------------------------------------ run info
@dataclass
class RunInfo:
    config: dict[str, Any] | None = None
    config_path: Path | None = None
    summary: dict[str, Any] | None = None
    evals: dict[int, dict[str, float]] = field(default_factory=dict)  # step -> eval/* metrics
    recipe: str | None = None  # the Hydra recipe choice, when the run was started by rlspec.train


def _get(config: dict[str, Any] | None, dotted: str, default: Any = None) -> Any:
    node: Any = config
    for part in dotted.split("."):
        if not isinstance(node, dict) or part not in node:
            return default
        node = node[part]
    return node


def load_run_info(run_dir: Path) -> RunInfo:
    """The resolved config (``config.yaml``, else Hydra's ``.hydra/config.yaml``), ``summary.json``
    and every evaluation logged in ``metrics.jsonl``; each may be missing (a run in progress)."""
    import yaml
    from omegaconf import OmegaConf

    info = RunInfo()
    for path in (run_dir / "config.yaml", run_dir / ".hydra" / "config.yaml"):
        if path.is_file():
            try:
                info.config = OmegaConf.to_container(OmegaConf.load(path), resolve=True)
            except Exception as err:  # noqa: BLE001
                raise ConfigError(f"cannot read the run's config {path} ({err}); fix or delete it") from None
            info.config_path = path
            break
    hydra_yaml = run_dir / ".hydra" / "hydra.yaml"
    if hydra_yaml.is_file():
        try:
            recipe = _get(yaml.safe_load(hydra_yaml.read_text()), "hydra.runtime.choices.recipe")
            info.recipe = str(recipe) if recipe not in (None, "null") else None
        except yaml.YAMLError:
            pass
    metrics = run_dir / "metrics.jsonl"
    if metrics.is_file():
        for line in metrics.read_text().splitlines():
            try:
                row = json.loads(line)
            except json.JSONDecodeError:  # a line cut short by a crash
                continue
            if isinstance(row, dict) and "eval/accuracy" in row and "step" in row:
                info.evals[int(row["step"])] = {k: v for k, v in row.items() if k.startswith("eval/")}
    summary = run_dir / "summary.json"
    if summary.is_file():
        try:
            info.summary = json.loads(summary.read_text())
        except json.JSONDecodeError as err:
            raise ConfigError(f"{summary} is not valid JSON ({err}); fix or delete it") from None
        end_step = _get(info.config, "trainer.steps", info.summary.get("steps"))
        for step, key in ((0, "start"), (end_step, "end")):
            if step is not None and isinstance(info.summary.get(key), dict):
                info.evals[int(step)] = {**info.evals.get(int(step), {}), **info.summary[key]}
    info.evals = dict(sorted(info.evals.items()))
    return info


# ------------------------------------------------------------------------------------ sampling
def generation_settings(config: dict[str, Any] | None) -> dict[str, Any]:
    """The sampling of the run's held-out evaluation (``eval.temperature/top_p/top_k``), else the
    standard reasoning-model sampling. ``top_k=0`` (no top-k) is written explicitly: transformers
    otherwise applies its default top-k of 50.

    >>> generation_settings(None)
    {'do_sample': True, 'temperature': 0.6, 'top_p': 0.95, 'top_k': 0}
    >>> generation_settings({"eval": {"temperature": 0.7, "top_p": 1.0}})
    {'do_sample': True, 'temperature': 0.7, 'top_p': 1.0, 'top_k': 0}
    """
    out: dict[str, Any] = {"do_sample": True}
    for key, default in DEFAULT_SAMPLING.items():
        value = _get(config, f"eval.{key}")
        out[key] = default if value is None else type(default)(value)
    return out


# --------------------------------------------------------------------------------- model card
def _fmt(value: Any, percent: bool = False) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "n/a"
    return f"{100 * value:.1f}%" if percent else f"{value:.1f}"


EVAL_COLUMNS = (  # (header, key, percent)
    ("accuracy", "eval/accuracy", True),
    ("mean tokens", "eval/mean_tokens", False),
    ("tokens (correct)", "eval/mean_tokens_correct", False),
    ("tokens (incorrect)", "eval/mean_tokens_incorrect", False),
    ("truncated", "eval/truncation_rate", True),
    ("accuracy / 1k tokens", "eval/accuracy_per_1k_tokens", False),
)


def eval_table(evals: dict[int, dict[str, float]], exported_step: int | None = None) -> str:
    """Markdown table of the held-out evaluations, one row per evaluated step.

    >>> print(eval_table({0: {"eval/accuracy": 0.5, "eval/mean_tokens": 130.25},
    ...                   40: {"eval/accuracy": 0.75, "eval/mean_tokens": 65.0}}, exported_step=40))
    | checkpoint | accuracy | mean tokens | tokens (correct) | tokens (incorrect) | truncated | accuracy / 1k tokens |
    | --- | --- | --- | --- | --- | --- | --- |
    | start (step 0) | 50.0% | 130.2 | n/a | n/a | n/a | n/a |
    | **step 40 (exported)** | 75.0% | 65.0 | n/a | n/a | n/a | n/a |
    """
    lines = ["| checkpoint | " + " | ".join(h for h, _, _ in EVAL_COLUMNS) + " |",
             "| --- |" + " --- |" * len(EVAL_COLUMNS)]
    for step, m in evals.items():
        label = "start (step 0)" if step == 0 else f"step {step}"
        if step == exported_step:
            label = f"**{label} (exported)**"
        lines.append(f"| {label} | " + " | ".join(_fmt(m.get(k), p) for _, k, p in EVAL_COLUMNS) + " |")
    return "\n".join(lines)


def _group_table(evals: dict[int, dict[str, float]]) -> str:
    """Accuracy / mean tokens per group (e.g. difficulty level) of the evaluations that have groups."""
    groups = sorted({k.split("/")[1] for m in evals.values() for k in m
                     if k.count("/") == 2 and k.endswith("/accuracy")})
    if not groups:
        return ""
    lines = ["| checkpoint | " + " | ".join(groups) + " |", "| --- |" + " --- |" * len(groups)]
    for step, m in evals.items():
        cells = [f"{_fmt(m.get(f'eval/{g}/accuracy'), True)} / {_fmt(m.get(f'eval/{g}/mean_tokens'))}" for g in groups]
        lines.append(f"| {'start' if step == 0 else f'step {step}'} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _recipe_lines(info: RunInfo) -> list[str]:
    c = info.config
    lines = [f"- **run name:** `{_get(c, 'run_name') or (info.summary or {}).get('run_name', 'unknown')}`"]
    if info.recipe:
        lines.append(f"- **recipe:** `{info.recipe}` (`rlspec/configs/recipe/{info.recipe}.yaml`)")
    if _get(c, "recipe_notes"):
        lines.append(f"- **notes:** {' '.join(str(_get(c, 'recipe_notes')).split())}")
    if c is None:
        lines.append("- the run directory has no resolved config (config.yaml); the recipe is unknown")
        return lines
    start = _get(c, "model.path") or f"rlspec embedded default (preset `{_get(c, 'model.embedded_preset', 'default')}`)"
    lines.append(f"- **starting model:** {start}")
    t = lambda k: _get(c, f"trainer.{k}")  # noqa: E731
    lines.append(f"- **algorithm:** {t('algorithm')}, advantages `{t('adv_estimator')}`, loss `{t('loss_agg_mode')}`, "
                 f"clip {t('clip_ratio_low')}/{t('clip_ratio_high')}, KL {t('kl_coef')}, lr {t('lr')}, "
                 f"{t('steps')} steps x {t('prompts_per_step')} prompts, seed {t('seed')}")
    lines.append(f"- **rollouts:** n={_get(c, 'rollout.n')}, max {_get(c, 'rollout.max_response_length')} tokens, "
                 f"T={_get(c, 'rollout.temperature')}, top-p {_get(c, 'rollout.top_p')}")
    for part in ("length_schedule", "truncation", "budget"):
        name = _get(c, f"rollout.{part}.name")
        if name:
            kwargs = json.dumps(_get(c, f"rollout.{part}.kwargs", {}))
            lines.append(f"- **{part.replace('_', ' ')}:** `{name}` {kwargs}")
    terms = _get(c, "reward.terms", {}) or {}
    if terms:
        described = []
        for term, spec in terms.items():
            spec = spec or {}
            kwargs = f" {json.dumps(spec['kwargs'])}" if spec.get("kwargs") else ""
            described.append(f"{spec.get('weight', 1.0)} x `{term}`{kwargs}")
        lines.append("- **reward:** " + " + ".join(described))
    if _get(c, "reward.custom.path"):
        lines.append(f"- **custom reward:** `{_get(c, 'reward.custom.path')}:{_get(c, 'reward.custom.name')}`")
    if _get(c, "anytime.enable"):
        lines.append("- **AnytimeReasoner** budget-truncated summaries enabled (see config)")
    data = _get(c, "data.path") or "rlspec embedded procedural math"
    lines.append(f"- **data:** {data} (train split `{_get(c, 'data.split')}`, held-out "
                 f"`{_get(c, 'data.test_path') or _get(c, 'data.test_split')}`)")
    return lines


def model_card(info: RunInfo, *, run_dir: Path, checkpoint: Path, step: int | None, note: str, out: Path,
               generation: dict[str, Any], merge: dict[str, Any] | None, drafter: Path | None) -> str:
    """The ``README.md`` of the exported model."""
    import yaml

    c = info.config
    name = _get(c, "run_name") or (info.summary or {}).get("run_name") or run_dir.name
    tags = ["rlspec", "reasoning", "efficient-reasoning"] + ([info.recipe] if info.recipe else [])
    front = {"library_name": "transformers", "pipeline_tag": "text-generation", "tags": tags}
    model_path = _get(c, "model.path")
    if merge is None and model_path and not os.path.isabs(os.path.expanduser(model_path)) \
            and not model_path.startswith((".", "~")) and model_path.count("/") == 1:
        front["base_model"] = model_path  # a hub id
    parts = ["---", yaml.safe_dump(front, sort_keys=False).strip(), "---", "", f"# {name}", ""]
    total = _get(c, "trainer.steps")
    origin = f"checkpoint `{checkpoint.name}`"
    if step is not None:
        origin += f" (step {step} of {total})" if total else f" (step {step})"
    meta_tags = _meta(checkpoint).get("tags") or []
    if meta_tags:
        origin += f", tagged {', '.join(f'`{t}`' for t in meta_tags)}"
    parts.append(f"Trained with rlspec (reinforcement learning for efficient reasoning); exported from the run "
                 f"`{run_dir}`, {origin}." + (f" {note}." if note else ""))
    if merge is not None:
        parts.append("")
        parts.append(f"**The weights are a DLER update-selective merge** (arXiv 2510.15110, Sec. 4.6) of this "
                     f"checkpoint into `{merge['base']}`, not the trained checkpoint itself; see *Merge* below.")
    parts += ["", "## Training recipe", "", *_recipe_lines(info), ""]

    parts += ["## Evaluation", ""]
    if info.evals:
        if c is not None:
            parts.append(f"Held-out pass@1 on {_get(c, 'eval.num_problems')} problems x "
                         f"{_get(c, 'eval.samples_per_problem')} samples, T={_get(c, 'eval.temperature')}, "
                         f"top-p {_get(c, 'eval.top_p')}, at most {_get(c, 'eval.max_new_tokens')} new tokens "
                         f"(from `summary.json` and `metrics.jsonl`).")
            parts.append("")
        parts += [eval_table(info.evals, step), ""]
        start, here = info.evals.get(0), info.evals.get(step) if step is not None else None
        if step not in info.evals:
            parts += [f"The exported checkpoint (step {step}) was not evaluated; the rows above are other "
                      f"checkpoints of the run.", ""]
        elif start and here and step != 0 and start.get("eval/mean_tokens"):
            acc = 100 * (here["eval/accuracy"] - start["eval/accuracy"])
            tok = 100 * (here["eval/mean_tokens"] / start["eval/mean_tokens"] - 1)
            parts += [f"Against the starting model: accuracy {acc:+.1f} points, mean response tokens {tok:+.1f}%.", ""]
        groups = _group_table(info.evals)
        if groups:
            parts += ["By group (accuracy / mean tokens):", "", groups, ""]
        if merge is not None:
            parts += ["These numbers are of the trained (unmerged) checkpoints; the merged weights were not "
                      "evaluated.", ""]
    else:
        parts += ["The run has no evaluation (no `summary.json` and no `eval/*` rows in `metrics.jsonl`).", ""]

    if merge is not None:
        parts += ["## Merge", "",
                  "DLER update-selective merging (`rlspec.merging.update_selective_merge`): with "
                  "`delta = tuned - base`, the largest `top_k` fraction of the entries of `delta` by magnitude "
                  "are kept, scaled by `scale` and added to the base; all other entries stay at the base.", "",
                  f"- base: `{merge['base']}`" + (f" (`merge.base=start`: {merge['why']})" if merge.get("why") else ""),
                  f"- top_k: {merge['top_k']} ({'per tensor' if merge['per_tensor'] else 'over all weights at once'})",
                  f"- scale: {merge['scale']}", ""]
    if drafter is not None:
        parts += ["## Drafter", "", f"The checkpoint's drafter model was exported beside this one, to "
                  f"`{drafter.name}/` (a sibling directory).", ""]

    instruction = _get(c, "data.instruction", "Please reason step by step, and put your final answer within \\boxed{}.")
    question = "What is 17 * 23?"
    content = f"{question}\n{instruction}" if instruction else question
    sampling = ", ".join(f"{k}={v}" for k, v in generation.items())
    parts += ["## Usage", "",
              f"`generation_config.json` holds the sampling the run was evaluated with ({sampling}); "
              "`generate` uses it by default. Prompts are the question followed by the instruction the model "
              "was trained with, as a single user turn of the chat template.", "",
              "```python",
              "from transformers import AutoModelForCausalLM, AutoTokenizer",
              "",
              f"model = AutoModelForCausalLM.from_pretrained({str(out)!r})",
              f"tokenizer = AutoTokenizer.from_pretrained({str(out)!r})",
              f"messages = [{{\"role\": \"user\", \"content\": {content!r}}}]",
              "inputs = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_tensors=\"pt\",",
              "                                       return_dict=True)",
              "output = model.generate(**inputs)",
              "print(tokenizer.decode(output[0, inputs[\"input_ids\"].shape[1]:], skip_special_tokens=False))",
              "```", ""]
    if c is not None:
        parts += ["## Resolved config", "", f"From `{info.config_path}`.", "", "```yaml",
                  yaml.safe_dump(c, sort_keys=False, allow_unicode=True).rstrip(), "```", ""]
    return "\n".join(parts)


# ------------------------------------------------------------------------------------- export
def _meta(checkpoint: Path) -> dict[str, Any]:
    try:
        return json.loads((checkpoint / "meta.json").read_text())
    except (OSError, json.JSONDecodeError):
        return {}


def _step_of(checkpoint: Path) -> int | None:
    step = _meta(checkpoint).get("step")
    if isinstance(step, int):
        return step
    suffix = checkpoint.name.removeprefix("step_")
    return int(suffix) if suffix.isdigit() else None


def _model_dir(path: str | Path, key: str) -> Path:
    p = Path(path).expanduser()
    if (p / "model" / "config.json").is_file():  # a run checkpoint dir
        p = p / "model"
    if not (p / "config.json").is_file():
        raise ConfigError(f"{key}={path} is not a save_pretrained model directory (no config.json); give an HF "
                          f"model dir, a run checkpoint dir, or merge.base=start")
    return p


def resolve_merge_base(spec: str, info: RunInfo) -> tuple[Path | str, str]:
    """``(base model dir or hub id, how it was chosen)`` for ``merge.base``."""
    if spec != "start":
        return _model_dir(spec, "merge.base"), ""
    if info.config is None:
        raise ConfigError("merge.base=start needs the run's resolved config (config.yaml) to know the starting "
                          "model, and the run dir has none; give merge.base=DIR")
    recorded = (info.summary or {}).get("model_path")  # the directory the run actually loaded
    if recorded and Path(recorded).is_dir():
        return _model_dir(Path(recorded), "merge.base"), f"the model the run started from ({recorded})"
    model_path = _get(info.config, "model.path")
    if model_path:
        expanded = Path(os.path.expanduser(model_path))
        if expanded.is_dir():
            return _model_dir(expanded, "merge.base"), f"the run's model.path={model_path}"
        return model_path, f"the run's model.path={model_path} (a hub id)"
    from rlspec.models import resolve_model_path

    preset = _get(info.config, "model.embedded_preset", "default")
    return Path(resolve_model_path(None, preset)), (f"the run's model.path is null, so the embedded default "
                                                     f"(preset {preset}) as built by this rlspec version")


def _load_model(path: Path | str, trust_remote_code: bool, what: str):
    from transformers import AutoModelForCausalLM

    try:
        return AutoModelForCausalLM.from_pretrained(path, dtype="auto", trust_remote_code=trust_remote_code)
    except Exception as err:  # noqa: BLE001
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise ModelLoadError(f"cannot load the {what} from {path} ({first})") from None


def _check_destination(path: Path, overwrite: bool, protected: dict[str, Path]) -> None:
    """Refuse to replace a non-empty directory (without ``overwrite=true``) or anything holding the
    run, its checkpoint or the merge base."""
    target = path.resolve()
    for what, keep in protected.items():
        keep = keep.resolve()
        if target == keep or target in keep.parents:
            raise ConfigError(f"out={path} would replace {what} {keep}; choose an out= outside it")
    if path.exists() and not path.is_dir():
        raise ConfigError(f"out={path} exists and is not a directory; choose another out=")
    if path.is_dir() and any(path.iterdir()) and not overwrite:
        raise ConfigError(f"{path} exists and is not empty; choose another out= or pass overwrite=true to replace it")


def _make_tmp(final: Path) -> Path:
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.tmp-", dir=final.parent))
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o777 & ~umask)  # mkdtemp makes it 0700; the export is a normal directory
    return tmp


def _install(tmp: Path, final: Path) -> None:
    """Move ``tmp`` to ``final``; an existing ``final`` is moved aside first and deleted after.

    Files are made readable as the umask allows first (safetensors writes its files 0600)."""
    umask = os.umask(0)
    os.umask(umask)
    for path in tmp.rglob("*"):
        if path.is_file() and not path.is_symlink():
            os.chmod(path, (path.stat().st_mode & 0o7777) | (0o444 & ~umask))
    aside = None
    if final.exists():
        aside = final.parent / f".{final.name}.old-{os.getpid()}"
        if aside.exists():
            shutil.rmtree(aside)
        os.replace(final, aside)
    try:
        os.replace(tmp, final)
    except OSError:
        if aside is not None:
            os.replace(aside, final)
        raise
    if aside is not None:
        shutil.rmtree(aside, ignore_errors=True)


@dataclass
class ExportResult:
    out: Path
    checkpoint: Path
    step: int | None
    files: list[str]
    generation: dict[str, Any]
    num_parameters: int
    dtype: str
    merge: dict[str, Any] | None = None
    drafter: Path | None = None
    notes: list[str] = field(default_factory=list)


def export_run(opts: ExportOptions) -> ExportResult:
    """Export the chosen checkpoint of ``opts.run_dir`` to ``opts.out`` (see the module docstring)."""
    import torch
    from transformers import AutoTokenizer, GenerationConfig

    from rlspec.merging import update_selective_merge

    checkpoint, note = resolve_checkpoint(opts.run_dir, opts.checkpoint)
    notes = [note] if note else []
    info = load_run_info(opts.run_dir)
    step = _step_of(checkpoint)
    trust = bool(_get(info.config, "model.trust_remote_code", False))
    out = opts.out
    drafter_src = checkpoint / "drafter"
    drafter_out = out.parent / f"{out.name}-drafter" if drafter_src.is_dir() else None

    base_path, why = (resolve_merge_base(opts.merge_base, info) if opts.merge_base else (None, ""))
    protected = {"the run directory": opts.run_dir, "the checkpoint": checkpoint}
    if isinstance(base_path, Path):
        protected["the merge base"] = base_path
    _check_destination(out, opts.overwrite, protected)
    if drafter_out is not None:
        _check_destination(drafter_out, opts.overwrite, protected)
    elif (out.parent / f"{out.name}-drafter").exists():
        notes.append(f"{out.parent / (out.name + '-drafter')} exists (an earlier export?) and was left as it is; "
                     f"this checkpoint has no drafter")

    model_dir = checkpoint / "model"
    model = _load_model(model_dir, trust, "checkpoint")
    merge = None
    if base_path is not None:
        base = _load_model(base_path, trust, "merge base")
        if type(base) is not type(model):
            raise ConfigError(f"merge.base={opts.merge_base}: cannot merge a {type(model).__name__} checkpoint into a "
                              f"{type(base).__name__}; give the model the run started from")
        try:
            merged = update_selective_merge(base.state_dict(), model.state_dict(), opts.top_k, opts.scale,
                                            opts.per_tensor)
        except ValueError as err:
            raise ConfigError(f"merge.base={opts.merge_base}: {err}; merge.base must be the model the run started "
                              f"from (same architecture and shapes)") from None
        with torch.no_grad():
            model.load_state_dict(merged)
        del base, merged
        merge = {"base": str(base_path), "why": why, "top_k": opts.top_k, "scale": opts.scale,
                 "per_tensor": opts.per_tensor}
    try:
        tokenizer = AutoTokenizer.from_pretrained(model_dir, trust_remote_code=trust)
    except Exception as err:  # noqa: BLE001
        raise ModelLoadError(f"cannot load the tokenizer of {model_dir} ({str(err).strip().splitlines()[0]})") from None
    if not getattr(tokenizer, "chat_template", None):
        notes.append(f"the checkpoint's tokenizer has no chat template; {out} has none either")

    # generation config: the checkpoint's, with the evaluation sampling and the model's EOS / pad
    gen_file = model_dir / "generation_config.json"
    if gen_file.is_file():
        gen = GenerationConfig.from_pretrained(model_dir)
    else:
        gen = GenerationConfig.from_model_config(model.config)
    sampling = generation_settings(info.config)
    for key, value in sampling.items():
        setattr(gen, key, value)
    if gen.eos_token_id is None:
        eos = getattr(model.config, "eos_token_id", None)
        gen.eos_token_id = eos if eos is not None else tokenizer.eos_token_id
    if gen.pad_token_id is None:
        pad = getattr(model.config, "pad_token_id", None)
        gen.pad_token_id = pad if pad is not None else tokenizer.pad_token_id
    if gen.max_new_tokens is None and gen.max_length is None and _get(info.config, "eval.max_new_tokens"):
        gen.max_new_tokens = int(_get(info.config, "eval.max_new_tokens"))
    if gen.eos_token_id is None:
        raise ModelLoadError(f"{model_dir} has no EOS token id (config, generation_config or tokenizer); set one")
    gen.validate(strict=True)
    model.generation_config = gen
    generation = {**sampling, "eos_token_id": gen.eos_token_id, "pad_token_id": gen.pad_token_id}

    tmp = _make_tmp(out)
    tmp_drafter = None
    try:
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        gen.save_pretrained(tmp)
        card = model_card(info, run_dir=opts.run_dir, checkpoint=checkpoint, step=step, note=note, out=out,
                          generation=generation, merge=merge, drafter=drafter_out)
        (tmp / "README.md").write_text(card, encoding="utf-8")
        if drafter_out is not None:
            tmp_drafter = _make_tmp(drafter_out)
            shutil.copytree(drafter_src, tmp_drafter, dirs_exist_ok=True)
        files = sorted(p.name for p in tmp.iterdir())
        _install(tmp, out)
        if tmp_drafter is not None:
            _install(tmp_drafter, drafter_out)
    finally:
        for leftover in (tmp, tmp_drafter):
            if leftover is not None and leftover.exists():
                shutil.rmtree(leftover, ignore_errors=True)
    if drafter_out is None:
        notes.append(f"no drafter found ({drafter_src} does not exist); none exported")
    return ExportResult(out=out, checkpoint=checkpoint, step=step, files=files, generation=generation,
                        num_parameters=sum(p.numel() for p in model.parameters()),
                        dtype=str(next(model.parameters()).dtype).removeprefix("torch."),
                        merge=merge, drafter=drafter_out, notes=notes)


def describe(result: ExportResult) -> str:
    """The short summary printed after an export."""
    step = f" (step {result.step})" if result.step is not None else ""
    lines = [f"exported {result.checkpoint}{step} -> {result.out}",
             f"  weights: {result.num_parameters:,} parameters, {result.dtype}, safetensors"]
    if result.merge:
        m = result.merge
        lines.append(f"  merged (DLER update-selective): base={m['base']} top_k={m['top_k']} scale={m['scale']} "
                     f"per_tensor={str(m['per_tensor']).lower()}")
    lines.append("  generation_config.json: " + " ".join(f"{k}={v}" for k, v in result.generation.items()))
    lines.append(f"  files: {', '.join(result.files)}")
    if result.drafter is not None:
        lines.append(f"  drafter: {result.drafter}")
    lines += [f"  note: {n}" for n in result.notes]
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> None:
    """``python -m rlspec.export run_dir=DIR out=DIR [checkpoint=latest] [merge.base=start|DIR] ...``."""
    try:
        opts = parse_args(list(sys.argv[1:] if argv is None else argv))
        result = export_run(opts)
    except (RLSpecError, ValueError) as err:
        print(f"rlspec: error: {err}", file=sys.stderr)
        sys.exit(2)
    print(describe(result))


if __name__ == "__main__":
    main()
