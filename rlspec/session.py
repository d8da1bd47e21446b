"""A training run from a config: compose and check it, prepare the run directory, wire the pieces, train.

* :func:`compose` / :func:`precheck_overrides` -- the Hydra config (``rlspec/configs``) with
  command-line overrides, every misspelled key or group option caught before Hydra starts;
* :func:`build_trainer` -- model, tokenizer, data, rollout engine (native / vLLM / a Ray pool,
  sharded over DeepSpeed ranks), speculative drafter and its online trainer, rewards, strategy,
  all wired into a :class:`~rlspec.trainers.grpo.GRPOTrainer`;
* :func:`run` -- the run directory (its lock, ``config.yaml``, resume checks), logging, ``fit``,
  ``summary.json``; SIGTERM / SIGINT checkpoint and stop (:mod:`rlspec.stopping`).
"""

from __future__ import annotations

import difflib
import json
import os
import sys
import time
from importlib import resources
from pathlib import Path
from typing import Any

import torch
from omegaconf import OmegaConf

from rlspec.checkpoint import checkpoint_root, find_latest_checkpoint, step_dir_name
from rlspec.config import RLSpecConfig, defaults, validate_config
from rlspec.data import build_prompt_ids, build_prompt_texts, load_split
from rlspec.embedded import get_embedded_drafter_path, resolve_model_path
from rlspec.errors import ConfigError, ModelLoadError
from rlspec.input_guards import check_tokenizer, fit_prompts, model_positions, source_description
from rlspec.models import eos_token_ids, gguf_model_dir, gguf_source, load_causal_lm, load_tokenizer
from rlspec.rewards import build_reward_terms
from rlspec.rollout.engines import make_engine
from rlspec.rollout.ray_engine import make_ray_engine
from rlspec.rollout.speculative.eagle import EagleDrafter
from rlspec.rollout.speculative.history import HistoryCheckpoint
from rlspec.rollout.speculative.online import DrafterCheckpoint, OnlineDrafting
from rlspec.rollout.speculative.remote_spot_trainer import RemoteSpotTrainer
from rlspec.rollout.speculative.spot_trainer import SpotDrafterTrainer
from rlspec.run_lock import RunLock, remove_stale_temps
from rlspec.schema import is_known_key, schema_keys, unknown_key_error
from rlspec.schema import to_dict as config_to_dict
from rlspec.stopping import StopOnSignal
from rlspec.tracking import MetricsLogger
from rlspec.trainers.critic import Critic, CriticCheckpoint, build_value_model, critic_trainer_config
from rlspec.trainers.grpo import GRPOTrainer
from rlspec.trainers.schedules import length_at
from rlspec.trainers.strategy import DataParallelEngine, make_strategy

CONFIG_GROUPS = ("model", "data", "rollout", "trainer", "reward", "logger", "recipe")
HELP_HINT = ". See all keys with: python -m rlspec.train --help"
# keys that may change when resuming a run (everything else must match the saved config)
RESUMABLE_CHANGES = (
    "trainer.steps", "trainer.resume", "trainer.save_every", "trainer.save_total_limit",
    "trainer.log_completions_every", "trainer.num_threads", "logger.", "eval.", "run_dir", "recipe_notes",
    "trainer.no_learning.", "trainer.divergence.", "reward.custom.timeout_s",
)


# ------------------------------------------------------------------------------------ composing the config
def group_options(group: str) -> list[str]:
    folder = resources.files("rlspec.configs") / group
    return sorted(p.name[: -len(".yaml")] for p in folder.iterdir() if p.name.endswith(".yaml"))


def normalize_argv(argv: list[str]) -> list[str]:
    """``+recipe=X`` and ``recipe=X`` both select a recipe (the defaults list has ``recipe: null``)."""
    return [arg[1:] if arg.startswith("+recipe=") else arg for arg in argv]


def check_key(key: str) -> None:
    """Raise ConfigError with a 'did you mean' when ``key`` (dotted) is not in the schema."""
    keys = schema_keys(RLSpecConfig)
    if not is_known_key(key, keys):
        raise unknown_key_error(key, keys, see=HELP_HINT)


def precheck_overrides(argv: list[str]) -> None:
    """Fail before Hydra starts, with one line, on a misspelled key or an unknown group option."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    candidates = [a for a in argv if not a.startswith("-") and "=" in a or a.startswith(("~", "+"))]
    try:
        overrides = OverridesParser.create().parse_overrides(candidates)
    except Exception as err:  # noqa: BLE001
        raise ConfigError(f"cannot parse the command-line overrides: {str(err).splitlines()[0]}") from None
    for override in overrides:
        key = override.key_or_group
        if key.startswith("hydra") or override.is_delete():
            continue
        if key in CONFIG_GROUPS:
            options = group_options(key)
            value = override.value()
            values = value if isinstance(value, list) else [value]
            if override.is_sweep_override():
                values = [str(v) for v in override.sweep_string_iterator()]
            for option in values:
                if option is not None and str(option) not in options:
                    close = difflib.get_close_matches(str(option), options, n=1)
                    hint = f" (did you mean {close[0]!r}?)" if close else ""
                    raise ConfigError(f"unknown {key} {option!r}{hint}; available: {', '.join(options)}")
            continue
        check_key(key)


def compose(overrides: list[str]) -> RLSpecConfig:
    """The typed config of ``python -m rlspec.train OVERRIDES`` (without running Hydra's app)."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_module

    argv = normalize_argv(list(overrides))
    precheck_overrides(argv)
    with initialize_config_module(config_module="rlspec.configs", version_base="1.3"):
        return validate_config(hydra_compose(config_name="train", overrides=argv))


# ------------------------------------------------------------------------------------ the run directory
def _flatten(prefix: str, value: Any, out: dict[str, Any]) -> dict[str, Any]:
    if isinstance(value, dict):
        for k, v in value.items():
            _flatten(f"{prefix}.{k}" if prefix else str(k), v, out)
    else:
        out[prefix] = value
    return out


def config_differences(saved: dict[str, Any], current: dict[str, Any],
                       defaults: dict[str, Any] | None = None) -> list[str]:
    """Keys whose values differ. A key the saved config lacks and whose current value is its
    schema default (``defaults``, flattened or nested) is not a difference: it was added by a
    newer rlspec and changes nothing for the run being resumed; nor is a key the saved config has
    that the schema no longer knows (removed by a newer rlspec)."""
    a, b = _flatten("", saved, {}), _flatten("", current, {})
    d = _flatten("", defaults or {}, {})
    missing = object()
    diffs = []
    for key in sorted(set(a) | set(b)):
        if any(key == c or (c.endswith(".") and key.startswith(c)) for c in RESUMABLE_CHANGES):
            continue
        if key not in a and key in b and d.get(key, missing) == b[key]:
            continue
        if key in a and key not in b and d and not is_known_key(key, schema_keys(RLSpecConfig)):
            continue
        if a.get(key) != b.get(key):
            diffs.append(f"{key}: {a.get(key)!r} -> {b.get(key)!r}")
    return diffs


def prepare_run_dir(cfg: RLSpecConfig, resolved: dict[str, Any]) -> Path:
    """Refuse to resume a run whose config differs (nothing is overwritten), then save the config.
    Call it holding the run dir's lock (:func:`run` does)."""
    run_dir = Path(cfg.run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    saved_path = run_dir / "config.yaml"
    if cfg.trainer.resume == "auto" and find_latest_checkpoint(run_dir) is not None and saved_path.is_file():
        saved = OmegaConf.to_container(OmegaConf.load(saved_path), resolve=True)
        diffs = config_differences(saved, resolved, defaults())
        if diffs:
            raise ConfigError(
                f"{run_dir} holds a run with a different config ({'; '.join(diffs[:3])}); "
                f"choose a new run_name=... or delete that directory to start over"
            )
    elif cfg.trainer.resume == "disable" and find_latest_checkpoint(run_dir) is not None:
        raise ConfigError(
            f"{run_dir} already has checkpoints and trainer.resume=disable would overwrite them; "
            f"use trainer.resume=auto to continue it or a new run_name=... to start over"
        )
    saved_path.write_text(OmegaConf.to_yaml(OmegaConf.create(resolved)))
    return run_dir


# ------------------------------------------------------------------------------------ wiring
def resolve_device(device: str) -> torch.device:
    """``model.device``: ``auto`` picks this rank's GPU (``LOCAL_RANK`` under torchrun) when CUDA is
    available, else the CPU."""
    if device == "auto":
        device = f"cuda:{int(os.environ.get('LOCAL_RANK', '0'))}" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(f"model.device={device} but CUDA is not available (torch {torch.__version__}); "
                          f"use model.device=cpu or install a CUDA build of torch 2.13.0")
    return torch.device(device)


def spot_training_allowed(cfg: RLSpecConfig, device: torch.device) -> bool:
    """Whether TLT's spot trainer may train the drafter during rollouts: it must use compute that
    would otherwise idle. On a GPU the long tail leaves most of it idle; on a CPU in one process
    the rollout already runs on every core (measured: a rollout of 17 s took 27 s with the drafter
    training beside it), so there it trains only with ``runtime=ray`` (cores of its own) or when
    ``rollout.speculative.online.on_cpu=true``."""
    online = cfg.rollout.speculative.online
    return online.enable and (device.type != "cpu" or cfg.runtime == "ray" or online.on_cpu)


def load_drafter(cfg: RLSpecConfig, model: Any, tokenizer: Any, model_path: Any,
                 train_prompt_ids: list[list[int]], trains_online: bool) -> EagleDrafter | None:
    """The EAGLE drafter for ``rollout.speculative``: ``drafter_path``; else, when it will train
    online, for the embedded default one warmed up on the model's own generations and cached beside
    it (built once) and for other models a fresh one (shared embeddings and LM head, a new layer);
    else None: the model-free sources draft alone (a drafter that cannot learn would only cost)."""
    sc = cfg.rollout.speculative
    if sc.drafter_path:
        return EagleDrafter.load(Path(sc.drafter_path).expanduser(), model)
    if trains_online:
        if cfg.model.path is None:
            path = get_embedded_drafter_path(Path(model_path), model, tokenizer, train_prompt_ids,
                                             sc.drafter_warmup_steps)
            return EagleDrafter.load(path, model)
        return EagleDrafter.from_target(model, seed=cfg.trainer.seed)  # learns from the first rollouts
    lookups = [s for s in sc.sources if s != "eagle"]
    if not lookups:
        raise ModelLoadError(
            "rollout.speculative.sources=[eagle] on a CPU needs a drafter (none is trained online there): warm one "
            "up with `python -m rlspec.warmup_drafter model=... out=DIR` and set rollout.speculative.drafter_path=DIR, "
            "set rollout.speculative.online.on_cpu=true, or add the model-free sources (self, group, history)"
        )
    print(f"rollout.speculative: EAGLE is off on this CPU (no drafter_path, online.on_cpu=false); "
          f"drafting with {', '.join(lookups)}")
    return None


def longest_response(cfg: RLSpecConfig) -> tuple[int, str]:
    """The longest response a training rollout may sample, and the key that sets it."""
    sched = cfg.rollout.length_schedule
    if sched.name is None:
        return cfg.rollout.max_response_length, "rollout.max_response_length"
    return max(length_at(sched.name, s, sched.kwargs) for s in range(cfg.trainer.steps)), "rollout.length_schedule"


def build_trainer(cfg: RLSpecConfig, run_dir: Path, logger: MetricsLogger | None = None) -> GRPOTrainer:
    """Load model, tokenizer, data, engine and rewards, and wire them into a trainer."""
    if cfg.trainer.num_threads:
        torch.set_num_threads(cfg.trainer.num_threads)
    torch.manual_seed(cfg.trainer.seed)
    reward_terms = build_reward_terms(cfg.reward, cfg.hbpo)  # a bad term or custom reward fails before any loading
    model_path = resolve_model_path(gguf_source(cfg.model.path, cfg.model.gguf_file), cfg.model.embedded_preset)
    model_path = gguf_model_dir(model_path, cfg.model.dtype, cfg.model.trust_remote_code)  # GGUF: dequantized HF dir
    data_path = cfg.data.path if cfg.data.path is not None else model_path  # embedded: splits ship with the model
    train_rows = load_split(data_path, cfg.data.split, cfg.data.question_key, cfg.data.answer_key)
    test_source = cfg.data.test_path if cfg.data.test_path is not None else data_path
    eval_rows = load_split(test_source, cfg.data.test_split, cfg.data.question_key, cfg.data.answer_key)
    if cfg.data.max_train_samples:
        train_rows = train_rows[: cfg.data.max_train_samples]
    tokenizer = load_tokenizer(model_path, cfg.model.trust_remote_code)
    build_prompt_texts(tokenizer, train_rows[:1], cfg.data.instruction, cfg.data.prompt_template)  # before the model
    model = load_causal_lm(model_path, cfg.model.dtype, cfg.model.trust_remote_code).eval()
    model.to(resolve_device(cfg.model.device))
    eos_ids = eos_token_ids(model, tokenizer)
    check_tokenizer(tokenizer, model, model_path)  # e.g. no tokenizer.json: one line, not 1-token prompts
    # trainer.strategy: local (AdamW in this process) or deepspeed (ZeRO over the launched ranks);
    # `model` becomes the policy the engine samples from (ZeRO-3: a full copy of the sharded one)
    strategy = make_strategy(model, cfg.trainer)
    model = strategy.policy
    sc = cfg.rollout.speculation()  # None: off (rollout.speculative.enable=false, or auto on vLLM)
    engine_kwargs: dict[str, Any] = {"speculative": sc} if sc is not None else {}
    train_prompt_ids = build_prompt_ids(tokenizer, train_rows, cfg.data.instruction, cfg.data.prompt_template)
    eval_prompt_ids = build_prompt_ids(tokenizer, eval_rows, cfg.data.instruction, cfg.data.prompt_template)
    train_rows, train_prompt_ids = fit_prompts(  # before anything generates: data.overlong_prompts
        train_rows, train_prompt_ids, model_positions(model), *longest_response(cfg),
        source_description(data_path, cfg.data.split), cfg.data.overlong_prompts)
    eval_rows, eval_prompt_ids = fit_prompts(
        eval_rows, eval_prompt_ids, model_positions(model), cfg.eval.max_new_tokens, "eval.max_new_tokens",
        source_description(test_source, cfg.data.test_split), cfg.data.overlong_prompts)
    if cfg.rollout.backend == "vllm":
        longest = max(len(p) for p in [*train_prompt_ids, *eval_prompt_ids])
        engine_kwargs["settings"] = cfg.rollout.vllm
        # budget prefills (HBPO) and summaries (AnytimeReasoner) extend a prompt: leave room
        hint = longest + max(cfg.rollout.max_response_length, cfg.eval.max_new_tokens) + 64
        engine_kwargs["max_len_hint"] = min(hint, int(getattr(model.config, "max_position_embeddings", None) or hint))
    if cfg.runtime == "ray":  # rollout workers as Ray actors, each with its own engine (rollout.backend)
        if strategy.world_size > 1:
            raise ConfigError("runtime=ray runs one learner; use it with trainer.strategy=local, or launch "
                              "trainer.strategy=deepspeed with torchrun and runtime=local")
        engine = make_ray_engine(cfg.ray, cfg.rollout, model, tokenizer, eos_ids, **engine_kwargs)
    else:
        engine = make_engine(cfg.rollout.backend, model, tokenizer, eos_token_ids=eos_ids,
                             max_batch_size=cfg.rollout.max_batch_size, **engine_kwargs)
    if strategy.world_size > 1:  # each rank samples a share of every rollout batch; all ranks get all of it
        engine = DataParallelEngine(engine, strategy)
    online, parts = None, []
    drafter = None
    if sc is not None and "eagle" in sc.sources:
        trains_online = spot_training_allowed(cfg, next(model.parameters()).device)
        drafter = load_drafter(cfg, model, tokenizer, model_path, train_prompt_ids, trains_online)
    if drafter is not None:
        engine.set_drafter(drafter)
        spot = None
        if trains_online:
            if cfg.runtime == "ray":  # the drafter trainer as an actor beside the rollout workers
                spot = RemoteSpotTrainer(drafter, model, sc.online, seed=cfg.trainer.seed, engine=engine,
                                         namespace=cfg.ray.namespace, num_cpus=cfg.ray.drafter_trainer_cpus,
                                         num_gpus=cfg.ray.drafter_trainer_gpus)
            else:
                spot = SpotDrafterTrainer(drafter, sc.online, seed=cfg.trainer.seed)
            online = OnlineDrafting(engine, spot)
        parts.append(DrafterCheckpoint(drafter, model, spot))  # trained online: part of the run's state
    critic = None
    if cfg.trainer.adv_estimator == "gae":  # PPO: a value model trained beside the policy, in the checkpoints
        value_model = build_value_model(cfg.critic.path, str(model_path), cfg.model.dtype,
                                        cfg.model.trust_remote_code, next(model.parameters()).device)
        pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos_ids[0]
        critic = Critic(cfg, make_strategy(value_model, critic_trainer_config(cfg)), pad_id)
        parts.append(CriticCheckpoint(critic))
    history = getattr(engine, "history", None)  # the native engine's history source (Ray workers keep their own)
    if history is not None and sc is not None and sc.lookup.checkpoint_history_mb > 0:
        parts.append(HistoryCheckpoint(history, int(sc.lookup.checkpoint_history_mb * 2**20)))
    return GRPOTrainer(
        cfg, model=model, tokenizer=tokenizer, engine=engine, eos_ids=eos_ids, train_rows=train_rows,
        eval_rows=eval_rows, train_prompt_ids=train_prompt_ids, eval_prompt_ids=eval_prompt_ids, run_dir=run_dir,
        reward_terms=reward_terms, logger=logger, start_model_path=str(model_path), strategy=strategy,
        online_drafting=online, checkpoint_parts=parts, critic=critic,
    )


# ------------------------------------------------------------------------------------ the run
def run(cfg: RLSpecConfig, resolved: dict[str, Any] | None = None) -> dict[str, Any]:
    """Train ``cfg`` in its run directory (resuming it when it holds a run); returns the summary."""
    from rich.console import Console
    from rich.syntax import Syntax

    resolved = resolved if resolved is not None else config_to_dict(cfg)
    started = time.time()
    console = Console()
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1 and cfg.trainer.strategy != "deepspeed":
        raise ConfigError(f"launched with {world} processes (WORLD_SIZE={world}) but trainer.strategy="
                          f"{cfg.trainer.strategy} trains in one process; set trainer.strategy=deepspeed or "
                          f"launch a single process")
    # under torchrun (trainer.strategy=deepspeed) only rank 0 prints, logs, writes the run dir and
    # holds its lock; every rank stops on a signal after the same step
    if int(os.environ.get("RANK", "0")) != 0:
        with StopOnSignal() as stopper:
            trainer = build_trainer(cfg, Path(cfg.run_dir), None)
            stopper.trainer = trainer
            trainer.maybe_resume()
            summary = trainer.fit()
            trainer.strategy.close()
        if trainer.stop_requested is not None and trainer.global_step < cfg.trainer.steps:
            raise SystemExit(stopper.exit_code or 143)
        return summary
    console.print(Syntax(OmegaConf.to_yaml(OmegaConf.create(resolved)), "yaml", theme="ansi_dark"))
    with RunLock(cfg.run_dir), StopOnSignal() as stopper:  # a second start on this run dir exits 2 naming us
        remove_stale_temps(checkpoint_root(cfg.run_dir))  # temporary checkpoints of dead writers only
        run_dir = prepare_run_dir(cfg, resolved)
        console.print(f"[bold]run dir:[/bold] {run_dir}  (resolved config saved as {run_dir / 'config.yaml'})")
        logger = MetricsLogger(run_dir, cfg.logger.backends, project=cfg.logger.project, run_name=cfg.run_name,
                               wandb_mode=cfg.logger.wandb_mode, wandb_entity=cfg.logger.wandb_entity,
                               config=resolved, progress=cfg.logger.progress, total_steps=cfg.trainer.steps)
        try:
            trainer = build_trainer(cfg, run_dir, logger)
            resumed = trainer.maybe_resume()
            if resumed is not None:
                console.print(f"resumed from {resumed} (step {trainer.global_step}/{cfg.trainer.steps})")
            stopper.trainer = trainer
            summary = trainer.fit()
            trainer.strategy.close()
        finally:
            logger.close()
        if trainer.stop_requested is not None and trainer.global_step < cfg.trainer.steps:
            again = "the same command" if cfg.trainer.resume == "auto" else "the command with trainer.resume=auto"
            print(f"rlspec: stopped by {stopper.name or trainer.stop_requested} after step {trainer.global_step}/"
                  f"{cfg.trainer.steps}; checkpoint {checkpoint_root(run_dir) / step_dir_name(trainer.global_step)} "
                  f"saved; re-run {again} to resume from it", file=sys.stderr, flush=True)
            raise SystemExit(stopper.exit_code or 143)
        # wall time of this process (an embedded-model build on first use included); a resumed run
        # reports only its own part
        summary["wall_seconds"] = round(time.time() - started, 1)
        (run_dir / "summary.json").write_text(json.dumps(summary, indent=2))
    print_summary(console, summary, run_dir)
    console.print(f"wall time: {summary['wall_seconds']:.0f} s (this process)")
    return summary


def print_summary(console: Any, summary: dict[str, Any], run_dir: Path) -> None:
    from rich.table import Table

    table = Table(title=f"{summary['run_name']}: held-out evaluation")
    table.add_column("model")
    for col in ("accuracy", "mean tokens", "tokens (correct)", "truncated"):
        table.add_column(col, justify="right")
    for label, m in (("start", summary.get("start")), (f"step {summary['steps']}", summary.get("end"))):
        if m:
            table.add_row(label, f"{100 * m['eval/accuracy']:.1f}%", f"{m['eval/mean_tokens']:.1f}",
                          f"{m['eval/mean_tokens_correct']:.1f}", f"{100 * m['eval/truncation_rate']:.1f}%")
    console.print(table)
    if "token_change_percent" in summary:
        console.print(
            f"tokens {summary['token_change_percent']:+.1f}%  accuracy {summary['accuracy_change_points']:+.1f} points  "
            f"(details: {run_dir / 'summary.json'}, plot: {run_dir / 'training_curves.png'})"
        )
