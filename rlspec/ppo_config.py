"""Config sections of PPO with a critic: GAE (``trainer.gae.*``) and the critic (``critic.*``).

Kept beside :mod:`rlspec.config` (which includes them) so that module stays readable; the same
conventions: every key with its default and help, errors that name the key.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from rlspec.schema import require, setting


@dataclass
class GaeConfig:
    """``trainer.adv_estimator=gae``: per-token advantages from a critic (GAE, arXiv 1506.02438),
    with VAPO's decoupled and length-adaptive lambdas (arXiv 2504.05118) as options."""

    gamma: float = setting(1.0, "discount (verl algorithm.gamma; 1.0 for reasoning)")
    lam: float = setting(1.0, "GAE lambda of the policy's advantages (verl algorithm.lam)")
    critic_lam: Optional[float] = setting(None, "VAPO decoupled GAE: lambda of the critic's targets (VAPO 1.0); "
                                                "null = lam")
    adaptive_alpha: Optional[float] = setting(None, "VAPO length-adaptive policy lambda 1 - 1/(alpha * length) "
                                                    "(VAPO 0.05), replacing lam; null = off")
    whiten: bool = setting(True, "normalise the advantages over the batch's tokens (verl masked_whiten)")

    def __post_init__(self) -> None:
        require(0 < self.gamma <= 1, "trainer.gae.gamma", f"must be in (0, 1], got {self.gamma}")
        require(0 <= self.lam <= 1, "trainer.gae.lam", f"must be in [0, 1], got {self.lam}")
        require(self.critic_lam is None or 0 <= self.critic_lam <= 1, "trainer.gae.critic_lam",
                f"must be in [0, 1] or null, got {self.critic_lam}")
        require(self.adaptive_alpha is None or self.adaptive_alpha > 0, "trainer.gae.adaptive_alpha",
                f"must be > 0 (VAPO uses 0.05) or null, got {self.adaptive_alpha}")


@dataclass
class CriticConfig:
    """The value model of ``trainer.adv_estimator=gae``: a scalar head on a transformer backbone,
    trained on the GAE returns with PPO's clipped value loss (verl ``critic.*``)."""

    path: Optional[str] = setting(None, "null = the policy's start weights; or an HF causal-LM dir (its backbone, "
                                        "a fresh value head); or the critic/ dir of an rlspec checkpoint")
    lr: float = setting(1e-4, "critic learning rate (verl's examples: 10x the actor's)")
    weight_decay: float = setting(0.0, "AdamW weight decay")
    grad_clip: float = setting(1.0, "gradient-norm clip")
    cliprange_value: Optional[float] = setting(0.5, "value clip around the scoring-time values (verl 0.5); "
                                                    "null = unclipped squared error")
    ppo_epochs: Optional[int] = setting(None, "passes over each batch; null = trainer.ppo_epochs")
    warmup_steps: int = setting(0, "steps that train only the critic, the policy frozen (verl trainer.critic_warmup; "
                                   "with trainer.gae.critic_lam=1 this is VAPO's value pretraining)")

    def __post_init__(self) -> None:
        require(self.lr > 0, "critic.lr", f"must be > 0, got {self.lr}")
        require(self.grad_clip > 0, "critic.grad_clip", "must be > 0")
        require(self.cliprange_value is None or self.cliprange_value > 0, "critic.cliprange_value",
                "must be > 0 or null")
        require(self.ppo_epochs is None or self.ppo_epochs >= 1, "critic.ppo_epochs", "must be >= 1 or null")
        require(self.warmup_steps >= 0, "critic.warmup_steps", "must be >= 0")
