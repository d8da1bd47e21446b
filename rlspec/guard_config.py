"""Config sections of the run's guards: divergence (``trainer.divergence.*``) and silent
no-learning (``trainer.no_learning.*``), and the group-size rule of the group estimators.

Kept beside :mod:`rlspec.config` (which includes them) so that module stays readable; the same
conventions: every key with its default and help, errors that name the key. The guards
themselves are in :mod:`rlspec.trainers.guards` (training) and :mod:`rlspec.input_guards`
(models, tokenizers and prompts, checked where they are loaded).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal, Optional

from rlspec.errors import ConfigError
from rlspec.schema import require, setting

# estimator -> why it needs rollout.n >= 2. Each normalises a response's reward against the other
# responses to the same prompt; a group of one has no baseline (mean 0, std 1 by verl's convention),
# so it would silently train REINFORCE without a baseline. Not listed, so n=1 is accepted:
# batch_norm / reinforce_plus_plus_baseline (the group mean is 0 for a singleton, then the whole
# batch is whitened: REINFORCE++ with its global baseline, arXiv 2501.03262) and gae (the critic's
# value is the baseline).
GROUP_ESTIMATORS = {
    "grpo": "normalises each reward by its group's mean and std",
    "dr_grpo": "subtracts its group's mean reward",
    "hbpo": "normalises over the group and its budget subgroups",
    "hbpo_code": "normalises over the group and its budget subgroups",
    "brpo": "uses the group's mean return as the baseline (V2)",
}


@dataclass
class DivergenceConfig:
    """Stop a diverging run before it writes a wrecked checkpoint (a too-high ``trainer.lr``)."""

    enable: bool = setting(True, "check every policy update (weight norm, gradient norm) and every checkpoint "
                                 "(finite weights and optimizer state)")
    max_weight_change: float = setting(0.5, "stop when one step changes the policy's weight norm by more than this "
                                            "fraction (normal steps: ~1e-4; trainer.lr=1e6: x1e7)")
    max_grad_norm: Optional[float] = setting(None, "stop when the pre-clip gradient norm exceeds this; null = off")
    grad_norm_spike: float = setting(1000.0, "stop when the pre-clip gradient norm exceeds this multiple of its "
                                             "running median (0 = off)")
    spike_warmup: int = setting(10, "policy updates with a non-zero gradient before grad_norm_spike applies")

    def __post_init__(self) -> None:
        require(self.max_weight_change > 0, "trainer.divergence.max_weight_change",
                f"must be > 0, got {self.max_weight_change}")
        require(self.max_grad_norm is None or self.max_grad_norm > 0, "trainer.divergence.max_grad_norm",
                f"must be > 0 or null, got {self.max_grad_norm}")
        require(self.grad_norm_spike == 0 or self.grad_norm_spike > 1, "trainer.divergence.grad_norm_spike",
                f"must be > 1, or 0 (off), got {self.grad_norm_spike}")
        require(self.spike_warmup >= 1, "trainer.divergence.spike_warmup", "must be >= 1")


@dataclass
class NoLearningConfig:
    """Silent no-learning: steps that keep no group, or whose advantages are all zero."""

    steps: int = setting(5, "this many steps in a row without a policy update (no group kept, or every "
                            "advantage zero) end the run (or warn); 0 = never")
    action: Literal["error", "warn"] = setting("error", "error: stop with the likely cause | warn: say it once "
                                                        "and continue (train/skipped_updates logs every step)")

    def __post_init__(self) -> None:
        require(self.steps >= 0, "trainer.no_learning.steps", f"must be >= 0 (0: never), got {self.steps}")


def check_group_size(cfg: Any) -> None:
    """``rollout.n >= 2`` where the advantage needs a group (:data:`GROUP_ESTIMATORS`) or dynamic
    sampling keeps groups whose responses differ (``trainer.filter_groups``)."""
    n, tc = cfg.rollout.n, cfg.trainer
    if n >= 2:
        return
    if tc.filter_groups.enable:
        raise ConfigError(f"rollout.n={n}: trainer.filter_groups (dynamic sampling) keeps only groups whose "
                          f"responses differ, and a group of one never does (every step would keep 0 groups); "
                          f"set rollout.n=2 or more (the recipes use 8-16)")
    why = GROUP_ESTIMATORS.get(tc.adv_estimator)
    if why is not None:
        raise ConfigError(f"rollout.n={n}: trainer.adv_estimator={tc.adv_estimator} {why}, and a group of one has "
                          f"no baseline (it would silently train REINFORCE without one); set rollout.n=2 or more, "
                          f"or trainer.adv_estimator=reinforce_plus_plus_baseline (a batch baseline) or gae (a critic)")


OverlongPrompts = Literal["error", "drop", "off"]
