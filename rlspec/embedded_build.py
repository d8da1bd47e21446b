"""How the embedded default is built: tokenizer, procedural SFT data, training, and its build card.

:func:`build_embedded_model` trains a byte-level BPE tokenizer on the procedural math tasks of
:mod:`rlspec.tasks` and a small ``Qwen2ForCausalLM`` by supervised fine-tuning on worked
solutions shaped like a long-CoT model's (build version 7, issue 17):

* a first pass that states the result *at a glance* ("At a glance, 5*8+4=44."), then
  0..``max_rechecks`` checks (the first works the steps out). Wrong glances in the data are
  corrected by the first check but left out of the loss (``mask_slips``), so the model's own
  glances fail only where one token cannot compute the result (multi-step levels): checking pays
  on hard problems, also after RL (docs/decisions.md, builds 5g-5m). ``first_pass="steps"`` gives
  version 5's data (worked first passes with learnt slips; the tiny test preset keeps it);
* over-thinking *spirals*: re-check after re-check, cut off without an answer past the rollout
  cap -- the long tail of a rollout;
* HBPO's budget prefill (the most re-checks that fit the budget) and L1's target-length
  instruction on a share of the data, so budget-conditioned recipes start from a model that reads
  them.

The build card (``build_card.json``) reports accuracy, lengths and re-check counts at the standard
evaluation sampling, the long tail at the rollout temperature, budget forcing per level and budget
following (:mod:`rlspec.embedded_eval`). Caching is :mod:`rlspec.embedded`'s.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import random
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any, Sequence

import torch

from rlspec import tasks
from rlspec.errors import ConfigError
from rlspec.embedded_eval import budget_following, budget_forcing, sample_records, summarize, summary_line
from rlspec.embedded_config import BUILD_VERSION, EmbeddedModelConfig
from rlspec.embedded_sft import sft_batches

SPECIAL_TOKENS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>", "<think>", "</think>")
PAD_TOKEN, EOS_TOKEN = "<|endoftext|>", "<|im_end|>"
GENERATION_PROMPT = "<|im_start|>assistant\n<think>\n"
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n<think>\n' }}{% endif %}"
)


# ------------------------------------------------------------------------------------ tokenizer


def build_tokenizer(corpus: Sequence[str], vocab_size: int):
    """A byte-level BPE tokenizer (digits split individually) wrapped as PreTrainedTokenizerFast."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Digits(individual_digits=True), pre_tokenizers.ByteLevel(add_prefix_space=False)]
    )
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=list(SPECIAL_TOKENS),
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(corpus, trainer)
    # <think> / </think> stay in decoded text (like Qwen3): atomic tokens, but not "special".
    tok.add_tokens([AddedToken(t, special=False, normalized=False) for t in ("<think>", "</think>")])
    hf = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=EOS_TOKEN, pad_token=PAD_TOKEN,
                                 padding_side="left", model_max_length=4096)
    hf.chat_template = CHAT_TEMPLATE
    return hf


# ----------------------------------------------------------------------------------------- build


def build_threads() -> int:
    """Torch threads used by the build: ``$RLSPEC_BUILD_THREADS``, default ``min(2, cores)``.

    Set ``RLSPEC_BUILD_THREADS=1`` on a machine shared with other busy processes (thread barriers
    wait on the busy core). The build is deterministic for a thread count; across thread counts the
    weights may differ in float summation order (docs/decisions.md).
    """
    raw = os.environ.get("RLSPEC_BUILD_THREADS", str(min(2, os.cpu_count() or 1)))
    try:
        n = int(raw)
    except ValueError:
        n = 0
    if n < 1:
        raise ConfigError(f"RLSPEC_BUILD_THREADS must be a positive integer, got {raw!r}")
    return n


def build_embedded_model(cfg: EmbeddedModelConfig, out_dir: str | os.PathLike, progress: bool = True) -> dict:
    """Build the model into ``out_dir`` (no caching; see :func:`get_embedded_model_path`).

    Returns the build card (also written to ``out_dir/build_card.json``).
    """
    from transformers import GenerationConfig, Qwen2Config, Qwen2ForCausalLM

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    prev_threads = torch.get_num_threads()
    torch.set_num_threads(build_threads())
    try:
        with _Progress(progress) as prog:
            prog.log(f"building embedded model {cfg.cache_key()} into {out}")
            train, test = tasks.make_splits(cfg.seed, cfg.n_train, cfg.n_test, cfg.levels)
            _write_jsonl(out / "train.jsonl", tasks.rows(train))
            _write_jsonl(out / "test.jsonl", tasks.rows(test))

            rng = random.Random(f"rlspec-embedded-corpus-{cfg.seed}")
            corpus = []
            for p in train[:4000]:
                corpus.append(tasks.format_prompt_messages(p)[0]["content"])
                corpus.append(tasks.worked_solution(p, rng, tasks.sample_num_rechecks(rng, cfg.max_rechecks),
                                                     first_pass=cfg.first_pass, glance_sep=cfg.glance_phrasing))
            tokenizer = build_tokenizer(corpus, cfg.vocab_size)
            eos_id = tokenizer.convert_tokens_to_ids(EOS_TOKEN)
            pad_id = tokenizer.convert_tokens_to_ids(PAD_TOKEN)
            prog.log(f"tokenizer: {len(tokenizer)} tokens")

            torch.manual_seed(cfg.seed)
            mcfg = Qwen2Config(
                vocab_size=len(tokenizer), hidden_size=cfg.hidden_size, intermediate_size=cfg.intermediate_size,
                num_hidden_layers=cfg.num_hidden_layers, num_attention_heads=cfg.num_attention_heads,
                num_key_value_heads=cfg.num_key_value_heads, max_position_embeddings=cfg.max_position_embeddings,
                tie_word_embeddings=True, bos_token_id=None, eos_token_id=eos_id, pad_token_id=pad_id,
                use_cache=True,
            )
            model = Qwen2ForCausalLM(mcfg)
            n_params = sum(p.numel() for p in model.parameters())
            prog.log(f"model: Qwen2 {n_params / 1e6:.2f}M params")

            t_sft = time.time()
            batches = sft_batches(cfg, train, tokenizer, eos_id)
            sft_stats = _train_sft(model, batches, cfg, prog)
            sft_seconds = time.time() - t_sft

            model.generation_config = GenerationConfig(
                eos_token_id=eos_id, pad_token_id=pad_id, bos_token_id=None, do_sample=True,
                temperature=0.6, top_p=0.95, top_k=0, max_new_tokens=cfg.eval_max_new_tokens,
            )
            model.save_pretrained(out)
            tokenizer.save_pretrained(out)

            t_eval = time.time()
            model.eval()
            evals, records = {}, {}
            problems = test[: cfg.n_eval]
            for name, temp, top_p in (("t0.6_p0.95", 0.6, 0.95), ("t1.0", 1.0, 1.0)):
                records[name] = sample_records(model, tokenizer, problems, temperature=temp, top_p=top_p,
                                               max_new_tokens=cfg.eval_max_new_tokens, batch_size=cfg.eval_batch_size,
                                               seed=cfg.seed, progress=prog, label=f"eval T={temp}")
                evals[name] = summarize(records[name])
                prog.log(summary_line(name, evals[name]))
            rollout = evals["t1.0"]  # the rollout temperature: the long tail a training rollout meets
            long_tail = {"temperature": 1.0, "cap": cfg.eval_max_new_tokens, "p50_tokens": rollout["p50_tokens"],
                         "p99_tokens": rollout["p99_tokens"],
                         "p99_over_p50": round(rollout["p99_tokens"] / max(1, rollout["p50_tokens"]), 2),
                         "frac_at_cap": rollout["truncated"]}
            prog.log(f"long tail at T=1: p99/p50 {long_tail['p99_over_p50']}, {100 * long_tail['frac_at_cap']:.1f}% "
                     f"reach the {cfg.eval_max_new_tokens}-token cap")
            forcing = budget_forcing(model, tokenizer, problems, records["t0.6_p0.95"], batch_size=cfg.eval_batch_size)
            prog.log("budget forcing (accuracy full -> checks cut, per level): " + ", ".join(
                f"L{lv} {100 * v['full']:.0f}->{100 * v['cut']:.0f}" for lv, v in forcing.items()))
            following = budget_following(model, tokenizer, test[: cfg.n_probe], cfg.budgets, cfg.l1_probe_targets,
                                         temperature=0.6, top_p=0.95, max_new_tokens=cfg.eval_max_new_tokens,
                                         batch_size=cfg.eval_batch_size, seed=cfg.seed, progress=prog)
            prog.log("budget following (mean tokens): HBPO " + ", ".join(
                f"{b}: {v['mean_tokens']}" for b, v in following["hbpo"].items()) + "; L1 " + ", ".join(
                f"{n}: {v['mean_tokens']} (err {v['rel_error']})" for n, v in following["l1"].items()))
            eval_seconds = time.time() - t_eval

            card = {
                "build_version": BUILD_VERSION,
                "cache_key": cfg.cache_key(),
                "config": asdict(cfg),
                "params": n_params,
                "vocab_size": len(tokenizer),
                "eos_token_id": eos_id,
                "pad_token_id": pad_id,
                "zero_recheck_mean_tokens": _reference_lengths(tokenizer, test[: cfg.n_eval], cfg, eos_id),
                "sft": {**sft_stats, "seconds": round(sft_seconds, 1)},
                "eval": evals,
                "long_tail": long_tail,
                "budget_forcing": forcing,
                "budget_following": following,
                "eval_seconds": round(eval_seconds, 1),
                "build_seconds": round(time.time() - t0, 1),
                "torch_threads": torch.get_num_threads(),
            }
            (out / "build_card.json").write_text(json.dumps(card, indent=2))
            prog.log(f"built in {card['build_seconds']:.0f}s")
    finally:
        torch.set_num_threads(prev_threads)
    return card


def _write_jsonl(path: Path, rows: list[dict]) -> None:
    with open(path, "w") as f:
        for r in rows:
            f.write(json.dumps(r) + "\n")


def _reference_lengths(tokenizer, problems, cfg: EmbeddedModelConfig, eos_id: int) -> dict:
    """Mean token length of the reference solutions with 0 and with max re-checks (incl. EOS)."""
    rng = random.Random(0)
    out = {}
    for k in (0, cfg.max_rechecks):
        texts = [tasks.worked_solution(p, rng, k, first_pass=cfg.first_pass, glance_sep=cfg.glance_phrasing)
                 for p in problems]
        lens = [len(ids) + 1 for ids in tokenizer(texts, add_special_tokens=False)["input_ids"]]
        out[f"rechecks_{k}"] = round(sum(lens) / len(lens), 1)
    return out


# ------------------------------------------------------------------------------------------ SFT


def _lr_at(step: int, cfg: EmbeddedModelConfig) -> float:
    """Linear warmup then cosine decay to ``min_lr_ratio * lr``."""
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    t = (step - cfg.warmup_steps) / max(1, cfg.sft_steps - cfg.warmup_steps)
    return cfg.lr * (cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * t)))


def _train_sft(model, batches, cfg: EmbeddedModelConfig, prog: "_Progress") -> dict:
    decay = [p for n, p in model.named_parameters() if p.ndim >= 2]
    no_decay = [p for n, p in model.named_parameters() if p.ndim < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": cfg.weight_decay},
                             {"params": no_decay, "weight_decay": 0.0}], lr=cfg.lr, betas=(0.9, 0.98),
                            fused=True)
    model.train()
    task = prog.add_task("SFT", total=len(batches))
    ema = None
    tokens = 0
    t0 = time.time()
    for step, (ids, labels) in enumerate(batches):
        for g in opt.param_groups:
            g["lr"] = _lr_at(step, cfg)
        hidden = model.model(input_ids=ids).last_hidden_state[:, :-1]
        target = labels[:, 1:]
        mask = target != -100
        logits = model.lm_head(hidden[mask])
        loss = torch.nn.functional.cross_entropy(logits, target[mask])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        opt.step()
        tokens += ids.numel()
        val = loss.item()
        ema = val if ema is None else 0.95 * ema + 0.05 * val
        prog.update(task, advance=1, description=f"SFT loss {ema:.3f}")
        if (step + 1) % max(1, len(batches) // 5) == 0:
            prog.log(f"SFT step {step + 1}/{len(batches)}: loss {ema:.3f}, {tokens / (time.time() - t0):.0f} tok/s")
    seconds = time.time() - t0
    return {"steps": len(batches), "final_loss_ema": round(ema or float("nan"), 4),
            "tokens_per_s": round(tokens / max(seconds, 1e-9))}


# ------------------------------------------------------------------------------------- progress


class _Progress(contextlib.AbstractContextManager):
    """A thin wrapper over rich.progress that does nothing when disabled."""

    def __init__(self, enabled: bool) -> None:
        self.enabled = enabled
        self._p = None

    def __enter__(self) -> "_Progress":
        if self.enabled:
            from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

            self._p = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                               TimeElapsedColumn(), transient=False)
            self._p.__enter__()
        return self

    def __exit__(self, *exc: object) -> None:
        if self._p is not None:
            self._p.__exit__(*exc)

    def add_task(self, description: str, total: int):
        return self._p.add_task(description, total=total) if self._p else None

    def update(self, task, **kw: Any) -> None:
        if self._p is not None and task is not None:
            self._p.update(task, **kw)

    def log(self, msg: str) -> None:
        if self._p is not None:
            self._p.console.log(msg)
