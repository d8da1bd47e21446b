"""The model card of an exported run: its recipe, held-out evaluation, sampling and config.

:func:`load_run_info` reads a run directory (``config.yaml``, ``summary.json``, the evaluations in
``metrics.jsonl``); :func:`model_card` writes the ``README.md`` that ``python -m rlspec.export``
puts beside the weights, and :func:`generation_settings` the sampling of its
``generation_config.json``.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import yaml
from omegaconf import OmegaConf

from rlspec.config import STANDARD_INSTRUCTION
from rlspec.errors import ConfigError
from rlspec.prompts import NAMED_TEMPLATES, fill, template_text, user_content

DEFAULT_SAMPLING = {"temperature": 0.6, "top_p": 0.95, "top_k": 0}  # the standard reasoning-model sampling


# ------------------------------------------------------------------------------------ run info
@dataclass
class RunInfo:
    config: dict[str, Any] | None = None
    config_path: Path | None = None
    summary: dict[str, Any] | None = None
    evals: dict[int, dict[str, float]] = field(default_factory=dict)  # step -> eval/* metrics
    recipe: str | None = None  # the Hydra recipe choice, when the run was started by rlspec.train


def get_key(config: dict[str, Any] | None, dotted: str, default: Any = None) -> Any:
    node: Any = config
    for part in dotted.split("."):
        if not isinstance(node, dict) or part not in node:
            return default
        node = node[part]
    return node


def load_run_info(run_dir: Path) -> RunInfo:
    """The resolved config (``config.yaml``, else Hydra's ``.hydra/config.yaml``), ``summary.json``
    and every evaluation logged in ``metrics.jsonl``; each may be missing (a run in progress)."""
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
            recipe = get_key(yaml.safe_load(hydra_yaml.read_text()), "hydra.runtime.choices.recipe")
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
        end_step = get_key(info.config, "trainer.steps", info.summary.get("steps"))
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
        value = get_key(config, f"eval.{key}")
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
    lines = [f"- **run name:** `{get_key(c, 'run_name') or (info.summary or {}).get('run_name', 'unknown')}`"]
    if info.recipe:
        lines.append(f"- **recipe:** `{info.recipe}` (`rlspec/configs/recipe/{info.recipe}.yaml`)")
    if get_key(c, "recipe_notes"):
        lines.append(f"- **notes:** {' '.join(str(get_key(c, 'recipe_notes')).split())}")
    if c is None:
        lines.append("- the run directory has no resolved config (config.yaml); the recipe is unknown")
        return lines
    start = get_key(c, "model.path") or f"rlspec embedded default (preset `{get_key(c, 'model.embedded_preset', 'default')}`)"
    lines.append(f"- **starting model:** {start}")
    t = lambda k: get_key(c, f"trainer.{k}")  # noqa: E731
    lines.append(f"- **algorithm:** {t('algorithm')}, advantages `{t('adv_estimator')}`, loss `{t('loss_agg_mode')}`, "
                 f"clip {t('clip_ratio_low')}/{t('clip_ratio_high')}, KL {t('kl_coef')}, lr {t('lr')}, "
                 f"{t('steps')} steps x {t('prompts_per_step')} prompts, seed {t('seed')}")
    lines.append(f"- **rollouts:** n={get_key(c, 'rollout.n')}, max {get_key(c, 'rollout.max_response_length')} tokens, "
                 f"T={get_key(c, 'rollout.temperature')}, top-p {get_key(c, 'rollout.top_p')}")
    for part in ("length_schedule", "truncation", "budget"):
        name = get_key(c, f"rollout.{part}.name")
        if name:
            kwargs = json.dumps(get_key(c, f"rollout.{part}.kwargs", {}))
            lines.append(f"- **{part.replace('_', ' ')}:** `{name}` {kwargs}")
    terms = get_key(c, "reward.terms", {}) or {}
    if terms:
        described = []
        for term, spec in terms.items():
            spec = spec or {}
            kwargs = f" {json.dumps(spec['kwargs'])}" if spec.get("kwargs") else ""
            described.append(f"{spec.get('weight', 1.0)} x `{term}`{kwargs}")
        lines.append("- **reward:** " + " + ".join(described))
    if get_key(c, "reward.custom.path"):
        lines.append(f"- **custom reward:** `{get_key(c, 'reward.custom.path')}:{get_key(c, 'reward.custom.name')}`")
    if get_key(c, "anytime.enable"):
        lines.append("- **AnytimeReasoner** budget-truncated summaries enabled (see config)")
    data = get_key(c, "data.path") or "rlspec embedded procedural math"
    lines.append(f"- **data:** {data} (train split `{get_key(c, 'data.split')}`, held-out "
                 f"`{get_key(c, 'data.test_path') or get_key(c, 'data.test_split')}`)")
    return lines


def model_card(info: RunInfo, *, run_dir: Path, checkpoint: Path, step: int | None, note: str, out: Path,
               generation: dict[str, Any], merge: dict[str, Any] | None, drafter: Path | None,
               checkpoint_tags: Sequence[str] = ()) -> str:
    """The ``README.md`` of the exported model."""
    c = info.config
    name = get_key(c, "run_name") or (info.summary or {}).get("run_name") or run_dir.name
    tags = ["rlspec", "reasoning", "efficient-reasoning"] + ([info.recipe] if info.recipe else [])
    front = {"library_name": "transformers", "pipeline_tag": "text-generation", "tags": tags}
    model_path = get_key(c, "model.path")
    if merge is None and model_path and not os.path.isabs(os.path.expanduser(model_path)) \
            and not model_path.startswith((".", "~")) and model_path.count("/") == 1:
        front["base_model"] = model_path  # a hub id
    parts = ["---", yaml.safe_dump(front, sort_keys=False).strip(), "---", "", f"# {name}", ""]
    total = get_key(c, "trainer.steps")
    origin = f"checkpoint `{checkpoint.name}`"
    if step is not None:
        origin += f" (step {step} of {total})" if total else f" (step {step})"
    if checkpoint_tags:
        origin += f", tagged {', '.join(f'`{t}`' for t in checkpoint_tags)}"
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
            parts.append(f"Held-out pass@1 on {get_key(c, 'eval.num_problems')} problems x "
                         f"{get_key(c, 'eval.samples_per_problem')} samples, T={get_key(c, 'eval.temperature')}, "
                         f"top-p {get_key(c, 'eval.top_p')}, at most {get_key(c, 'eval.max_new_tokens')} new tokens "
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

    instruction = get_key(c, "data.instruction", STANDARD_INSTRUCTION)
    question = "What is 17 * 23?"
    sampling = ", ".join(f"{k}={v}" for k, v in generation.items())
    template = get_key(c, "data.prompt_template", "chat")
    plain = template_text(template)
    intro = (f"`generation_config.json` holds the sampling the run was evaluated with ({sampling}); "
             "`generate` uses it by default. Prompts are the question followed by the instruction the model "
             "was trained with, ")
    load = ["from transformers import AutoModelForCausalLM, AutoTokenizer", "",
            f"model = AutoModelForCausalLM.from_pretrained({str(out)!r})",
            f"tokenizer = AutoTokenizer.from_pretrained({str(out)!r})"]
    if plain is None:
        content = user_content(question, instruction)
        parts += ["## Usage", "", intro + "as a single user turn of the chat template "
                  "(`data.prompt_template=chat`).", "", "```python", *load,
                  f"messages = [{{\"role\": \"user\", \"content\": {content!r}}}]",
                  "inputs = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_tensors=\"pt\",",
                  "                                       return_dict=True)"]
    else:
        named = f"`{template}`, " if template in NAMED_TEMPLATES else ""
        parts += ["## Usage", "", intro + f"in the plain prompt template the run was trained with "
                  f"(`data.prompt_template`: {named}no chat template; `{{question}}` is the question and the "
                  f"instruction):", "", "```text", plain, "```", "", "```python", *load,
                  f"prompt = {fill(plain, question, instruction)!r}",
                  "inputs = tokenizer(prompt, return_tensors=\"pt\")"]
    parts += ["output = model.generate(**inputs)",
              "print(tokenizer.decode(output[0, inputs[\"input_ids\"].shape[1]:], skip_special_tokens=False))",
              "```", ""]
    if c is not None:
        parts += ["## Resolved config", "", f"From `{info.config_path}`.", "", "```yaml",
                  yaml.safe_dump(c, sort_keys=False, allow_unicode=True).rstrip(), "```", ""]
    return "\n".join(parts)
