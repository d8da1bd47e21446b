"""The embedded default's build recipe: :class:`EmbeddedModelConfig` (every knob of the task
data, the model and the SFT run; all of it goes into the model cache's key) and
:data:`BUILD_VERSION`. How the knobs are used is :mod:`rlspec.embedded_build`'s and
:mod:`rlspec.embedded_sft`'s; why they have their values is docs/decisions.md.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass
from typing import Any

from rlspec import tasks
from rlspec.errors import ConfigError

BUILD_VERSION = "7"  # bump when the build recipe changes in a way the config does not capture


@dataclass
class EmbeddedModelConfig:
    """Everything that determines the built model (all of it goes into the cache hash)."""

    seed: int = 0
    # tasks
    levels: tuple[int, ...] = tasks.ALL_LEVELS
    n_train: int = 4000
    n_test: int = 256
    # 6 (4 before version 6): the start over-thinks enough (~175 tokens at T=0.6 on version 7) for
    # DLER's 128 to bind
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
    # over-thinking strong. 0.05 since version 7 (0.15 before): with 0.15 and a reliable glance the
    # start closed after the glance in 41% of its answers at T=0.6 and `dler` cut only 37%
    # (build 6g, docs/decisions.md)
    recheck_p0: float = 0.05
    # per level 1..5 instead of ``recheck_p0`` (empty: ``recheck_p0`` at every level): a start whose
    # propensity to close after the first pass already differs by level, as a real model's
    # confidence does, so RL sharpens a difference instead of creating one. In the cache key only
    # when set
    recheck_p0_by_level: tuple[float, ...] = ()
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
    # the levels whose right glances are taught; a glance of another level is shown, not taught
    # (masked like a slip): a multi-step result the model cannot compute in one token is a guess.
    # Tried against the idea that taught guesses blur level 1's one-step glances; they barely do
    # (build 5n, docs/decisions.md). Needs mask_slips; in the cache key only when not every level
    taught_glance_levels: tuple[int, ...] = tasks.ALL_LEVELS
    # share of the later solutions that are over-thinking spirals: re-check after re-check, cut off
    # without an answer or EOS at a length drawn from ``spiral_tokens`` -- R1-style loops to the
    # length cap, the long tail of a rollout
    spiral_frac: float = 0.12  # 0.1 before version 7 (build 6g: 1.6% at the cap, under the 2% asked)
    spiral_tokens: tuple[int, int] = (500, 600)
    # interleaved arithmetic-fact drill batches (share of all steps, tokens per drill sequence)
    drill_frac: float = 0.3
    drill_seq_len: int = 96
    # draw the drilled facts operation first, then a fact of it (True), instead of uniformly over
    # all facts (False): the ~70 division facts of the linear equations are otherwise ~7% of the
    # drills, and a model that cannot divide copies a glance instead of working it out. Left out
    # of the cache key while False
    drill_by_op: bool = True
    # how the drill lines phrase a fact, one drawn per line: "=" ("12*4=48") and/or " is " ("12*4
    # is 48", the phrasing of the glance and the re-checks: a model drilled only on "=" computes a
    # level-1 glance right about half the time at T=1; build 5o in docs/decisions.md). In the cache
    # key unless ("=",)
    drill_phrasings: tuple[str, ...] = ("=",)
    # how a glance of levels 1-4 phrases its value: "=" ("At a glance, 3+5=8.", the drilled facts'
    # and worked steps' phrasing: a level-1 glance is then a drilled fact token for token; the
    # default since version 7) or " is " ("At a glance, 3+5 is 8.", the re-check lines' phrasing,
    # version 6: its level-1 glance was right about half the time, docs/decisions.md). In the cache
    # key unless " is "
    glance_phrasing: str = "="
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
        self.taught_glance_levels = tuple(sorted(int(x) for x in self.taught_glance_levels))
        self.drill_phrasings = tuple(str(x) for x in self.drill_phrasings)
        if not self.drill_phrasings or not set(self.drill_phrasings) <= set(tasks.FACT_PHRASINGS):
            raise ConfigError(f"drill_phrasings must be a non-empty subset of {list(tasks.FACT_PHRASINGS)}, got "
                              f"{list(self.drill_phrasings)}")
        if self.glance_phrasing not in tasks.FACT_PHRASINGS:
            raise ConfigError(f"glance_phrasing must be one of {list(tasks.FACT_PHRASINGS)}, "
                              f"got {self.glance_phrasing!r}")
        self.recheck_p0_by_level = tuple(float(x) for x in self.recheck_p0_by_level)
        if self.recheck_p0_by_level and (len(self.recheck_p0_by_level) != len(tasks.ALL_LEVELS)
                                         or not all(0 <= x <= 1 for x in self.recheck_p0_by_level)):
            raise ConfigError(f"recheck_p0_by_level must be empty or {len(tasks.ALL_LEVELS)} probabilities (levels "
                              f"1..5), got {list(self.recheck_p0_by_level)}")
        if not set(self.taught_glance_levels) <= set(tasks.ALL_LEVELS):
            raise ConfigError(f"taught_glance_levels must be levels in {list(tasks.ALL_LEVELS)}, got "
                              f"{list(self.taught_glance_levels)}")
        if self.taught_glance_levels != tasks.ALL_LEVELS and not self.mask_slips:
            raise ConfigError("taught_glance_levels masks the other levels' glances: set mask_slips=True too")
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
                    n_probe=8, spiral_tokens=(150, 260), recheck_p0=0.15, spiral_frac=0.1)
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
        if tuple(fields["taught_glance_levels"]) == tasks.ALL_LEVELS:
            del fields["taught_glance_levels"]
        if tuple(fields["drill_phrasings"]) == ("=",):
            del fields["drill_phrasings"]
        if fields["glance_phrasing"] == " is ":
            del fields["glance_phrasing"]
        if not fields["recheck_p0_by_level"]:
            del fields["recheck_p0_by_level"]
        payload = json.dumps({"build_version": BUILD_VERSION, **fields}, sort_keys=True)
        return hashlib.sha256(payload.encode()).hexdigest()[:12]
