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
import os
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Sequence

import torch

from rlspec.checkpoint import newest_verified, warn_line
from rlspec.cli import parse_options, run_main
from rlspec.embedded import resolve_model_path
from rlspec.evals.model_card import RunInfo, generation_settings, get_key, load_run_info, model_card
from rlspec.errors import CheckpointError, ConfigError, ModelLoadError
from rlspec.input_guards import check_tokenizer
from rlspec.manifest import verify_checkpoint
from rlspec.merging import update_selective_merge
from rlspec.schema import setting

__all__ = ["ExportOptions", "parse_args", "resolve_checkpoint", "export_run", "main"]

TOOL = "rlspec.export"
USAGE = ("python -m rlspec.export run_dir=DIR out=DIR [checkpoint=latest|step_N|N|TAG] [merge.base=start|DIR] "
         "[merge.top_k=0.25] [merge.scale=0.7] [merge.per_tensor=true] [overwrite=false]")


# ------------------------------------------------------------------------------------- options
@dataclass
class MergeOptions:
    """DLER's update-selective merge (arXiv 2510.15110, Sec. 4.6) of the checkpoint into a base."""

    base: Optional[str] = setting(None, "start (the model the run started from) or a model dir; null = no merge")
    top_k: Optional[float] = setting(None, "fraction of each update kept, by magnitude (default 0.25, DLER's)")
    scale: Optional[float] = setting(None, "scale of the kept update (default 0.7, DLER's)")
    per_tensor: Optional[bool] = setting(None, "top-k per tensor (default true) or over the whole model")

    def __post_init__(self) -> None:
        set_keys = [f"merge.{k}" for k in ("top_k", "scale", "per_tensor") if getattr(self, k) is not None]
        if self.base == "":
            self.base = None
        if set_keys and self.base is None:
            raise ConfigError(f"{set_keys[0]} is set but merge.base is not; add merge.base=start "
                              f"(the run's starting model) or merge.base=DIR")
        self.top_k = 0.25 if self.top_k is None else self.top_k
        self.scale = 0.7 if self.scale is None else self.scale
        self.per_tensor = True if self.per_tensor is None else self.per_tensor
        if not 0 < self.top_k <= 1:
            raise ConfigError(f"merge.top_k must be a fraction in (0, 1] of each update to keep (DLER: 0.25), "
                              f"got {self.top_k}")


@dataclass
class ExportOptions:
    """``python -m rlspec.export`` options."""

    run_dir: Optional[str] = setting(None, "the training run's directory (required)")
    out: Optional[str] = setting(None, "the exported model's directory (required)")
    checkpoint: str = setting("latest", "latest | step_N | N | a tag from checkpoints/tags.json (e.g. siri-low)")
    merge: MergeOptions = setting(help="DLER update-selective merge", default_factory=MergeOptions)
    overwrite: bool = setting(False, "replace an existing non-empty out")

    def __post_init__(self) -> None:
        missing = [k for k in ("run_dir", "out") if not getattr(self, k)]
        if missing:
            raise ConfigError(f"missing {', '.join(m + '=DIR' for m in missing)}; usage: {USAGE}")
        self.checkpoint = str(self.checkpoint).strip() or "latest"

    @property
    def run_path(self) -> Path:
        return Path(self.run_dir).expanduser()

    @property
    def out_path(self) -> Path:
        return Path(self.out).expanduser()


def parse_args(argv: Sequence[str]) -> ExportOptions:
    """Options from ``key=value`` arguments (see :data:`USAGE`).

    >>> o = parse_args(["run_dir=runs/dler", "out=exports/dler", "merge.base=start", "merge.scale=0.5"])
    >>> (o.checkpoint, o.merge.base, o.merge.top_k, o.merge.scale, o.merge.per_tensor, o.overwrite)
    ('latest', 'start', 0.25, 0.5, True, False)
    >>> parse_args(["run_dir=r", "out=o", "merge.top_k=0.5"])
    Traceback (most recent call last):
    ...
    rlspec.errors.ConfigError: merge.top_k is set but merge.base is not; add merge.base=start (the run's starting model) or merge.base=DIR
    """
    return parse_options(ExportOptions, argv, tool=TOOL, usage=USAGE)


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

    Read-only: it removes no leftover temporary directories (a trainer may still be writing one);
    :func:`verified_checkpoint` then checks the files. ``note`` says how a tag or
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


def verified_checkpoint(run_dir: Path, checkpoint: Path, name: str) -> Path:
    """``checkpoint`` once its manifest verifies (:mod:`rlspec.manifest`). For ``latest`` a damaged
    one falls back to the newest older checkpoint that verifies, with one warning line; a checkpoint
    named explicitly is refused with one line naming the damaged file."""
    verdict = verify_checkpoint(checkpoint, for_export=True)
    if verdict.ok:
        return checkpoint
    if name != "latest":
        raise CheckpointError(f"checkpoint={name}: {checkpoint.name}/{verdict.reason}; restore that file or export "
                              f"another checkpoint (checkpoint=step_N)")
    older = [run_dir / "checkpoints" / n for n in reversed(_checkpoints(run_dir)) if n < checkpoint.name]
    chosen, skipped = newest_verified(older, for_export=True)
    skipped = [f"{checkpoint.name} ({verdict.reason})", *skipped]
    if chosen is None:
        raise CheckpointError(f"no checkpoint of run_dir={run_dir} verifies: {'; '.join(skipped)}; restore the "
                              f"damaged file")
    warn_line(f"skipped damaged checkpoint {'; '.join(skipped)}; exporting {chosen.name}")
    return chosen


def _available(run_dir: Path, names: list[str], tags: dict[str, list[str]]) -> str:
    latest_file = run_dir / "checkpoints" / "latest"
    latest = latest_file.read_text().strip() if latest_file.is_file() else names[-1]
    text = f"latest (= {latest}), {', '.join(names)}"
    if tags:
        text += "; tags: " + ", ".join(f"{t} ({', '.join(ns)})" for t, ns in sorted(tags.items()))
    return text


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
    model_path = get_key(info.config, "model.path")
    if model_path:
        expanded = Path(os.path.expanduser(model_path))
        if expanded.is_dir():
            return _model_dir(expanded, "merge.base"), f"the run's model.path={model_path}"
        return model_path, f"the run's model.path={model_path} (a hub id)"

    preset = get_key(info.config, "model.embedded_preset", "default")
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
    from transformers import AutoTokenizer, GenerationConfig

    run_dir, m = opts.run_path, opts.merge
    checkpoint, note = resolve_checkpoint(run_dir, opts.checkpoint)
    checkpoint = verified_checkpoint(run_dir, checkpoint, opts.checkpoint)
    notes = [note] if note else []
    info = load_run_info(run_dir)
    step = _step_of(checkpoint)
    trust = bool(get_key(info.config, "model.trust_remote_code", False))
    out = opts.out_path
    drafter_src = checkpoint / "drafter"
    drafter_out = out.parent / f"{out.name}-drafter" if drafter_src.is_dir() else None

    base_path, why = (resolve_merge_base(m.base, info) if m.base else (None, ""))
    protected = {"the run directory": run_dir, "the checkpoint": checkpoint}
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
            raise ConfigError(f"merge.base={m.base}: cannot merge a {type(model).__name__} checkpoint into a "
                              f"{type(base).__name__}; give the model the run started from")
        try:
            merged = update_selective_merge(base.state_dict(), model.state_dict(), m.top_k, m.scale,
                                            m.per_tensor)
        except ValueError as err:
            raise ConfigError(f"merge.base={m.base}: {err}; merge.base must be the model the run started "
                              f"from (same architecture and shapes)") from None
        with torch.no_grad():
            model.load_state_dict(merged)
        del base, merged
        merge = {"base": str(base_path), "why": why, "top_k": m.top_k, "scale": m.scale,
                 "per_tensor": m.per_tensor}
    try:
        tokenizer = AutoTokenizer.from_pretrained(model_dir, trust_remote_code=trust)
    except Exception as err:  # noqa: BLE001
        raise ModelLoadError(f"cannot load the tokenizer of {model_dir} ({str(err).strip().splitlines()[0]})") from None
    check_tokenizer(tokenizer, model, model_dir)  # no tokenizer.json: one line, not an export without a vocabulary
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
    if gen.max_new_tokens is None and gen.max_length is None and get_key(info.config, "eval.max_new_tokens"):
        gen.max_new_tokens = int(get_key(info.config, "eval.max_new_tokens"))
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
        card = model_card(info, run_dir=run_dir, checkpoint=checkpoint, step=step, note=note, out=out,
                          generation=generation, merge=merge, drafter=drafter_out,
                          checkpoint_tags=_meta(checkpoint).get("tags") or [])
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


def _main(argv: list[str]) -> None:
    print(describe(export_run(parse_args(argv))))


def main(argv: Sequence[str] | None = None) -> None:
    """``python -m rlspec.export run_dir=DIR out=DIR [checkpoint=latest] [merge.base=start|DIR] ...``."""
    run_main(_main, argv, ExportOptions, tool=TOOL, usage=USAGE)


if __name__ == "__main__":
    main()
