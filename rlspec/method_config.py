"""Config sections of method-specific constants: HBPO (``hbpo.*``) and AnytimeReasoner (``anytime.*``).

Kept beside :mod:`rlspec.config` (which includes them) so that module stays readable; the same
conventions: every key with its default and help, errors that name the key.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import List, Literal, Optional

from rlspec.schema import require, setting


@dataclass
class HbpoConfig:
    """HBPO (arXiv 2507.15844): constants shared by its prefill, reward and advantage.

    paper: prefill "within", piecewise f1/f2 reward, 0 for wrong answers, intra advantage added
    once. code (ZJU-REAL/HBPO): prefill "with", min(f1, f2) for every correct answer, -1 for
    format errors, intra advantage added twice.
    """

    variant: Literal["paper", "code"] = setting("paper", "paper | code (the released code's behaviour)")
    l_max: int = setting(4096, "L_max of the cosine (the training context)")
    beta: float = setting(4.0, "reward scale")
    alpha: Optional[float] = setting(None, "deviation weight; null = 1 / l_max (the released code)")

    def __post_init__(self) -> None:
        require(self.l_max >= 1, "hbpo.l_max", "must be >= 1")
        require(self.beta > 0, "hbpo.beta", f"must be > 0, got {self.beta}")
        require(self.alpha is None or self.alpha >= 0, "hbpo.alpha", f"must be >= 0 or null (= 1/l_max), got {self.alpha}")


@dataclass
class AnytimeConfig:
    """AnytimeReasoner (arXiv 2505.13438): thinking cut at budgets, summaries scored per cut, BRPO.

    Defaults are the released code's; a recipe for another model family sets the text that model
    writes after </think>. trainer.adv_estimator must be brpo.
    """

    enable: bool = setting(False, "cut the thinking at budgets and train on per-cut summaries")
    budgets: Optional[List[int]] = setting(None, "null: n_budgets equal steps up to rollout.max_response_length")
    n_budgets: int = setting(4, "number of budgets")
    n_summary: int = setting(4, "summaries per cut")
    summary_max_tokens: int = setting(118, "tokens per summary")
    prior: Literal["uniform", "linear", "base"] = setting("linear", "prior over budgets")
    summary_method: Literal["brpo", "grpo"] = setting("brpo", "grpo: only the last budget's summaries are trained")
    variance_reduction: Literal["brpo", "v1only", "v2only", "none"] = setting("brpo", "baseline of the thinking "
                                                                                       "advantages")
    cut_text: str = setting("...\n\n...\n\n</think>\n\n**Final Answer**\n", "closes a cut thinking")
    finished_text: str = setting("\n\n**Final Answer**\n", "follows a thinking that closed itself")

    def __post_init__(self) -> None:
        require(self.n_budgets >= 1, "anytime.n_budgets", "must be >= 1")
        require(self.n_summary >= 1, "anytime.n_summary", "must be >= 1")
        require(self.summary_max_tokens >= 1, "anytime.summary_max_tokens", "must be >= 1")
        if self.budgets is not None:
            require(len(self.budgets) >= 1 and all(b > 0 for b in self.budgets)
                    and list(self.budgets) == sorted(set(self.budgets)), "anytime.budgets",
                    f"must be strictly increasing positive token counts, got {list(self.budgets)}")
        require("</think>" in self.cut_text, "anytime.cut_text",
                f"must close the thinking with </think>, got {self.cut_text!r}")
