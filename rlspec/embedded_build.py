"""How the embedded default is built: tokenizer, procedural SFT data, training, and its build card.

:func:`build_embedded_model` trains a byte-level BPE tokenizer on the procedural math tasks of
:mod:`rlspec.tasks` and a small ``Qwen2ForCausalLM`` by supervised fine-tuning on worked
solutions shaped like a long-CoT model's (build version 6, issue 17):

* a first pass that states the result *at a glance* ("At a glance, 5*8+4 is 44."), then
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
import hashlib
import json
import math
import os
import random
import time
from collections import defaultdict
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Sequence

import torch

from rlspec import tasks
from rlspec.errors import ConfigError
from rlspec.embedded_eval import (budget_following, budget_forcing, l1_prompt_text, prompt_text,
                                  sample_records, summarize, summary_line)
from rlspec.rewards.hbpo import HBPO_TEMPLATES
from rlspec.rewards.l1 import L1_MAX_TEMPLATE, L1_TEMPLATE

BUILD_VERSION = "6"  # bump when the build recipe changes in a way the config does not capture
SPECIAL_TOKENS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>", "<think>", "</think>")
PAD_TOKEN, EOS_TOKEN = "<|endoftext|>", "<|im_end|>"
GENERATION_PROMPT = "<|im_start|>assistant\n<think>\n"
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n<think>\n' }}{% endif %}"
)


@dataclass
class EmbeddedModelConfig:
    """Everything that determines the built model (all of it goes into the cache hash)."""

    seed: int = 0
    # tasks
    levels: tuple[int, ...] = tasks.ALL_LEVELS
    n_train: int = 4000
    n_test: int = 256
    # 6 (4 before version 6): the start over-thinks enough (~160 tokens) for DLER's 128 to bind
    max_rechecks: int = 6
    # tokenizer
    vocab_size: int = 1024
    # model (Qwen2): 2 layers learn the copying (problem -> steps) fastest (docs/decisions.md)
    hidden_size: int = 128
    intermediate_size: int = 512
    num_hidden_layers: int = 2
    num_attention_heads: int = 4
    num_key_value_heads: int = 2
    max_position_embeddings: int = 1024
    # SFT: small batches (the run is step-bound, not data-bound); lr 1e-3, as 3e-3 was unstable
    # across small changes of the data (docs/decisions.md)
    sft_steps: int = 4000
    batch_size: int = 8
    lr: float = 1e-3
    min_lr_ratio: float = 0.05
    warmup_steps: int = 50
    weight_decay: float = 0.01
    grad_clip: float = 1.0
    # curriculum: the first ``plain_frac`` of the solution steps train on zero-recheck solutions
    # with the steps written out, whatever ``first_pass`` is (short, so copying and arithmetic are
    # learnt at lower cost); the rest on 0..max_rechecks in the ``first_pass`` style.
    plain_frac: float = 0.3
    # re-check count of the later solution steps: 0 (the answer straight from the first pass) with
    # probability ``recheck_p0``, else uniform over 1..max_rechecks: a small value keeps the
    # over-thinking strong while 0 stays common at temperature 1.
    recheck_p0: float = 0.15
    # share of the later solutions that carry an HBPO budget prefill after <think> ("I will answer
    # the question within b tokens.", arXiv 2507.15844 Sec. 3.1), b drawn from ``budgets``; such a
    # solution has the most re-checks that fit within b tokens. HBPO assumes a base model that
    # follows such a prefill, and this teaches it. The defaults are the `hbpo` recipe's budgets.
    budget_frac: float = 0.35
    budgets: tuple[int, ...] = (32, 64, 128, 160)
    # share of the later solutions whose prompt ends with L1's target-length instruction ("Think for
    # n tokens.", arXiv 2503.04697 Sec. 3; a third of them L1-Max's "Think for maximum n tokens."),
    # n within 15% of the solution's length (at or above it for L1-Max): the l1 recipes then start
    # from a model that reads the target.
    l1_frac: float = 0.2
    # first-pass slip rate per level 1..5 (tasks.slipped_steps); with mask_slips the share of wrong
    # glances the checks see corrected (level 1 lower: a masked glance teaches the glance nothing;
    # builds 5l, 5m). Version 5 ("steps") used tasks.SLIP_RATES
    slip_rates: tuple[float, ...] = (0.2, 0.6, 0.6, 0.6, 0.6)
    # the first pass: "glance" (the result stated at once, then worked out; the default since
    # version 6) or "steps" (worked out, then re-checks). Left out of the cache key while "steps"
    first_pass: str = "glance"
    # leave a slipped glance's value out of the SFT loss: the data still shows wrong glances being
    # worked out and corrected, but the model is never taught to make them, so its own glances go
    # wrong only where it cannot compute the result in one token -- by capacity, which RL cannot
    # train away (errors in the data with their tokens masked: Ye et al., "Physics of Language
    # Models: Part 2.2", arXiv 2408.16293). Needs first_pass="glance"; left out of the cache key
    # while False
    mask_slips: bool = True
    # share of the later solutions that are over-thinking spirals: re-check after re-check, cut off
    # without an answer or EOS at a length drawn from ``spiral_tokens`` -- R1-style loops to the
    # length cap, the long tail of a rollout
    spiral_frac: float = 0.1
    spiral_tokens: tuple[int, int] = (500, 600)
    # interleaved arithmetic-fact drill batches (share of all steps, tokens per drill sequence)
    drill_frac: float = 0.3
    drill_seq_len: int = 96
    # draw the drilled facts operation first, then a fact of it (True), instead of uniformly over
    # all facts (False): the ~70 division facts of the linear equations are otherwise ~7% of the
    # drills, and a model that cannot divide copies a glance instead of working it out. Left out
    # of the cache key while False
    drill_by_op: bool = True
    # final evaluation written to build_card.json
    n_eval: int = 256  # test problems evaluated (<= n_test)
    eval_max_new_tokens: int = 512
    eval_batch_size: int = 64
    n_probe: int = 64  # test problems per budget in the budget-following probe (<= n_test)
    l1_probe_targets: tuple[int, ...] = (40, 80, 120, 160)

    def __post_init__(self) -> None:
        self.levels = tuple(int(x) for x in self.levels)
        self.budgets = tuple(int(x) for x in self.budgets)
        self.slip_rates = tuple(float(x) for x in self.slip_rates)
        self.spiral_tokens = tuple(int(x) for x in self.spiral_tokens)
        if self.first_pass not in tasks.FIRST_PASS_STYLES:
            raise ConfigError(f"first_pass must be one of {list(tasks.FIRST_PASS_STYLES)}, got {self.first_pass!r}")
        if self.mask_slips and self.first_pass != "glance":
            raise ConfigError("mask_slips=True masks a slipped glance's value: set first_pass='glance' too")
        if len(self.slip_rates) != len(tasks.ALL_LEVELS) or not all(0 <= r <= 1 for r in self.slip_rates):
            raise ConfigError(f"slip_rates must be {len(tasks.ALL_LEVELS)} probabilities (levels 1..5), got "
                              f"{list(self.slip_rates)}")
        if not (0 <= self.spiral_frac < 1 and 0 <= self.l1_frac <= 1 and self.budget_frac + self.l1_frac <= 1):
            raise ConfigError(f"spiral_frac must be in [0, 1) and budget_frac + l1_frac <= 1, got {self.spiral_frac}, "
                              f"{self.budget_frac} + {self.l1_frac}")
        if len(self.spiral_tokens) != 2 or not 0 < self.spiral_tokens[0] <= self.spiral_tokens[1]:
            raise ConfigError(f"spiral_tokens must be [low, high] with 0 < low <= high, got {list(self.spiral_tokens)}")
        if not 0 <= self.budget_frac <= 1:
            raise ConfigError(f"budget_frac must be in [0, 1], got {self.budget_frac}")
        if self.budget_frac and (not self.budgets or min(self.budgets) < 1):
            raise ConfigError(f"budgets must be positive token counts when budget_frac > 0, got {list(self.budgets)}")
        self.l1_probe_targets = tuple(int(x) for x in self.l1_probe_targets)
        if self.n_eval > self.n_test:
            raise ConfigError(f"n_eval={self.n_eval} must be <= n_test={self.n_test}")
        if self.n_probe > self.n_test:
            raise ConfigError(f"n_probe={self.n_probe} must be <= n_test={self.n_test}")
        if self.hidden_size % self.num_attention_heads:
            raise ConfigError(f"hidden_size={self.hidden_size} must be divisible by "
                              f"num_attention_heads={self.num_attention_heads}")
        if self.num_attention_heads % self.num_key_value_heads:
            raise ConfigError("num_attention_heads must be a multiple of num_key_value_heads")
        if self.sft_steps < 1 or self.batch_size < 1:
            raise ConfigError("sft_steps and batch_size must be >= 1")
        if not (0 <= self.plain_frac <= 1 and 0 <= self.drill_frac < 1 and 0 <= self.recheck_p0 <= 1):
            raise ConfigError(f"plain_frac and recheck_p0 must be in [0, 1] and drill_frac in [0, 1), got "
                              f"{self.plain_frac}, {self.recheck_p0} and {self.drill_frac}")

    @classmethod
    def tiny(cls, **overrides: Any) -> "EmbeddedModelConfig":
        """A seconds-scale preset for tests: well-formed outputs, weak accuracy, on version 5's
        steps-first data (the engine and trainer tests rely on its redundant, copyable text)."""
        base = dict(first_pass="steps", mask_slips=False, drill_by_op=False, slip_rates=tasks.SLIP_RATES,
                    max_rechecks=4, n_train=1000, n_test=64, vocab_size=512, hidden_size=64, intermediate_size=256,
                    num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1,
                    max_position_embeddings=512, sft_steps=300, batch_size=8, lr=3e-3,
                    warmup_steps=20, plain_frac=0.5, n_eval=16, eval_max_new_tokens=256, eval_batch_size=16,
                    n_probe=8, spiral_tokens=(150, 260))
        base.update(overrides)
        return cls(**base)

    def cache_key(self) -> str:
        """A short stable hash of the build recipe (config + :data:`BUILD_VERSION`)."""
        fields = asdict(self)
        if fields["first_pass"] == "steps":
            del fields["first_pass"]
        else:  # the glance restates the expression since version 2 of its format
            fields["glance_format"] = 2
        for flag in ("mask_slips", "drill_by_op"):
            if not fields[flag]:
                del fields[flag]
        payload = json.dumps({"build_version": BUILD_VERSION, **fields}, sort_keys=True)
        return hashlib.sha256(payload.encode()).hexdigest()[:12]


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
                                                     first_pass=cfg.first_pass))
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
            batches = _sft_batches(cfg, train, tokenizer, eos_id)
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
        texts = [tasks.worked_solution(p, rng, k, first_pass=cfg.first_pass) for p in problems]
        lens = [len(ids) + 1 for ids in tokenizer(texts, add_special_tokens=False)["input_ids"]]
        out[f"rechecks_{k}"] = round(sum(lens) / len(lens), 1)
    return out


# ------------------------------------------------------------------------------------------ SFT


def _sft_batches(cfg: EmbeddedModelConfig, train: list[tasks.MathProblem], tokenizer, eos_id: int):
    """Deterministic SFT batches: level-balanced worked solutions plus interleaved fact drills.

    Solution batches: each example is a fresh worked solution (random re-check count and wording)
    of a train problem drawn level-uniformly; the first ``plain_frac`` use zero re-checks, no slips
    and the steps written out (any ``first_pass``). The rest slip at ``slip_rates[level]`` (with
    ``mask_slips`` a slipped glance's value is out of the loss); ``spiral_frac`` of them are spirals
    cut off without EOS; of the others ``budget_frac`` carry an HBPO budget prefill (the most
    re-checks that fit), ``l1_frac`` an L1 target-length instruction, the remainder 0 re-checks
    with probability ``recheck_p0`` else uniform 1..max_rechecks. Length-bucketed; loss on
    completion tokens only (labels -100 on prompt and padding).
    Drill batches (a ``drill_frac`` share, spread evenly): packed sequences of the single-step
    facts of the train split ("12*4=48" per line), loss on the results only -- dense, cheap
    arithmetic practice -- followed by the same block verbatim, loss on every token (copy practice).
    Returns a list of ``(input_ids, labels)`` tensors.
    """
    rng = random.Random(f"rlspec-embedded-sft-{cfg.seed}")
    n_drill = int(round(cfg.drill_frac * cfg.sft_steps))
    n_sol_steps = cfg.sft_steps - n_drill
    by_level: dict[int, list[tasks.MathProblem]] = defaultdict(list)
    for p in train:
        by_level[p.level].append(p)
    levels = sorted(by_level)
    n = n_sol_steps * cfg.batch_size
    probs = [rng.choice(by_level[rng.choice(levels)]) for _ in range(n)]
    prompts = [prompt_text(tokenizer, p) for p in probs]
    n_plain = int(cfg.plain_frac * n_sol_steps) * cfg.batch_size
    style = cfg.first_pass
    comps, closed, masked = [], [], []
    for j, p in enumerate(probs):
        if j < n_plain:  # steps written out in any style: a glance alone holds no arithmetic to learn
            comps.append(tasks.worked_solution(p, rng, 0))
            closed.append(True)
            masked.append(False)
            continue
        slip = rng.random() < tasks.slip_rate(p.level, cfg.slip_rates)
        masked.append(slip and cfg.mask_slips)
        u = rng.random()
        if u < cfg.spiral_frac:  # an over-thinking spiral, cut by the length cap: no answer, no EOS
            text = tasks.worked_solution(p, rng, 60, slip=slip, close=False, first_pass=style)
            ids = tokenizer(text, add_special_tokens=False)["input_ids"][: rng.randint(*cfg.spiral_tokens)]
            comps.append(tokenizer.decode(ids))
            closed.append(False)
            continue
        u = rng.random()
        if u < cfg.budget_frac:
            i = rng.randrange(len(cfg.budgets))
            prompts[j] += HBPO_TEMPLATES["paper"].format(budget=cfg.budgets[i])
            comps.append(_fit_budget(p, rng, cfg.max_rechecks, cfg.budgets[i], tokenizer, slip=slip, first_pass=style))
        elif u < cfg.budget_frac + cfg.l1_frac:
            text = tasks.worked_solution(p, rng, rng.randint(0, cfg.max_rechecks), slip=slip, first_pass=style)
            n_tokens = len(tokenizer(text, add_special_tokens=False)["input_ids"]) + 1
            at_most = rng.random() < 1 / 3
            target = round(n_tokens * (rng.uniform(1.0, 1.4) if at_most else rng.uniform(0.85, 1.15)))
            prompts[j] = l1_prompt_text(tokenizer, p, target, L1_MAX_TEMPLATE if at_most else L1_TEMPLATE)
            comps.append(text)
        else:
            comps.append(tasks.worked_solution(p, rng, _num_rechecks(rng, cfg), slip=slip, first_pass=style))
        closed.append(True)
    p_ids = tokenizer(prompts, add_special_tokens=False)["input_ids"]
    enc = tokenizer(comps, add_special_tokens=False, return_offsets_mapping=True)
    c_ids = enc["input_ids"]
    c_labels = [list(ids) for ids in c_ids]
    for text, offsets, lab, mask in zip(comps, enc["offset_mapping"], c_labels, masked):
        span = tasks.glance_value_span(text) if mask else None
        if span is not None:  # a slipped glance's value: shown, not taught
            for i, (lo, hi) in enumerate(offsets):
                if lo < span[1] and hi > span[0]:
                    lab[i] = -100
    examples = [(a, b + [eos_id] if c else b, lab + [eos_id] if c else lab)
                for a, b, c, lab in zip(p_ids, c_ids, closed, c_labels)]
    sol_batches = []
    chunk = cfg.batch_size * 16
    for start in range(0, n, chunk):  # bucket by length inside chunks, shuffle batches within a chunk
        part = sorted(examples[start : start + chunk], key=lambda e: len(e[0]) + len(e[1]))
        group = [part[i : i + cfg.batch_size] for i in range(0, len(part), cfg.batch_size)]
        rng.shuffle(group)
        sol_batches += group
    out = []
    for b in sol_batches:
        width = max(len(a) + len(c) for a, c, _ in b)
        ids = torch.full((len(b), width), tokenizer.pad_token_id, dtype=torch.long)
        labels = torch.full((len(b), width), -100, dtype=torch.long)
        for i, (a, c, lab) in enumerate(b):  # right padding: causal attention never sees it
            ids[i, : len(a) + len(c)] = torch.tensor(a + c)
            labels[i, len(a) : len(a) + len(c)] = torch.tensor(lab)
        out.append((ids, labels))
    if not n_drill:
        return out
    op_of = {s.text(): s.op for p in train for s in p.steps}
    facts = sorted(op_of)
    fact_ids = tokenizer([f + "\n" for f in facts], add_special_tokens=False)["input_ids"]
    ops = sorted(set(op_of.values()))
    by_op = {op: [j for j, f in enumerate(facts) if op_of[f] == op] for op in ops}  # indices of its facts
    eq_id = tokenizer.convert_tokens_to_ids("=")
    fact_labels = []
    for ids in fact_ids:  # loss only on the result digits and the newline (operands are random)
        k = len(ids) - 1 - ids[::-1].index(eq_id)
        fact_labels.append([-100] * (k + 1) + ids[k + 1 :])
    drills = []
    half = cfg.drill_seq_len // 2
    for _ in range(n_drill):
        rows, lab_rows = [], []
        for _ in range(cfg.batch_size):
            seq: list[int] = []
            lab: list[int] = []
            while len(seq) < half:
                j = rng.choice(by_op[rng.choice(ops)]) if cfg.drill_by_op else rng.randrange(len(fact_ids))
                seq += fact_ids[j]
                lab += fact_labels[j]
            seq, lab = seq[:half], lab[:half]
            # the block again, verbatim: every token of the repeat is predictable by copying, which
            # trains the induction (copy) circuits the worked solutions and re-checks rely on
            rest = cfg.drill_seq_len - half
            rows.append(seq + seq[:rest])
            lab_rows.append(lab + seq[:rest])
        drills.append((torch.tensor(rows), torch.tensor(lab_rows)))
    merged, d = [], 0
    for j in range(cfg.sft_steps):  # spread the drill batches evenly over the run
        if d < n_drill and (j + 1) * n_drill // cfg.sft_steps > d:
            merged.append(drills[d])
            d += 1
        else:
            merged.append(out.pop(0) if out else drills[d])
    return merged


def _fit_budget(problem: tasks.MathProblem, rng: random.Random, max_rechecks: int, budget: int, tokenizer,
                slip: bool = False, first_pass: str = "steps") -> str:
    """The worked solution with the most re-checks (<= max_rechecks) whose tokens, EOS included,
    fit within ``budget``; zero re-checks when even that does not fit."""
    state = rng.getstate()
    best = None
    for k in range(max_rechecks + 1):
        rng.setstate(state)  # the same opener wording for every candidate
        text = tasks.worked_solution(problem, rng, k, slip=slip, first_pass=first_pass)
        if best is None or len(tokenizer(text, add_special_tokens=False)["input_ids"]) + 1 <= budget:
            best = text
        else:
            break
    return best


def _num_rechecks(rng: random.Random, cfg: EmbeddedModelConfig) -> int:
    if cfg.max_rechecks == 0 or rng.random() < cfg.recheck_p0:
        return 0
    return rng.randint(1, cfg.max_rechecks)


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
