"""Does the model think in ``<think>...</think>`` tags? Decided from its prompt and first responses.

Recipes that grade only the text after ``</think>`` (``reward.require_think_close=true``, e.g.
DLER, DeepScaleR) give every response of a model that never writes the tag a reward of 0: every
advantage is zero and a run burns its budget learning nothing. Methods whose mechanics act on the
thinking (HBPO's budget prefill after ``<think>``, AnytimeReasoner's cut at ``</think>``) train on
nonsense without the tags. ``reward.think_tags`` says what to do about a model without them:

* ``require`` (default) -- stop with one line: at start for HBPO / AnytimeReasoner when neither the
  chat template nor the prompt has ``<think>``; at the first responses graded (the start eval, else
  the first step's rollouts, before any update) when ``require_think_close`` is set and none of
  them closes ``</think>``;
* ``auto`` -- say so once and go on: ``reward.require_think_close`` is switched off for the rest of
  the run (rewards, rollout hooks and held-out evals grade the whole response);
* ``off`` -- no check (today's behaviour).

A prompt that opens the thinking itself (the chat template's generation prompt or the ``r1_zero``
template ends with ``<think>``) counts as thinking in tags at start; the responses still decide
whether the tag is ever closed.
"""

from __future__ import annotations

import warnings
from typing import Any, Sequence

from rlspec.config import RLSpecConfig
from rlspec.errors import ConfigError, TrainingError
from rlspec.rollout.base import FINISH_LENGTH

OPEN, CLOSE = "<think>", "</think>"
TAG_METHODS = {"hbpo": "HBPO's budget prefill after <think>", "anytime": "AnytimeReasoner's cut at </think>"}


def prompt_has_think(tokenizer: Any, prompt_text: str | None) -> bool:
    """Whether the chat template or a prompt of the run writes ``<think>``."""
    template = getattr(tokenizer, "chat_template", None)
    return OPEN in (template if isinstance(template, str) else str(template or "")) or OPEN in (prompt_text or "")


def closes_think(texts: Sequence[str]) -> int:
    """How many responses close the thinking with ``</think>``."""
    return sum(CLOSE in t for t in texts)


class ThinkTags:
    """``reward.think_tags`` for one run: the start check of the tag-based methods and the
    decision, on the first graded responses, of whether ``</think>`` is required."""

    def __init__(self, cfg: RLSpecConfig, tokenizer: Any, prompt_text: str | None, hook_names: Sequence[str]) -> None:
        self.cfg, self.mode = cfg, cfg.reward.think_tags
        self.prompt_thinks = prompt_has_think(tokenizer, prompt_text)
        self.decided = self.mode == "off" or not cfg.reward.require_think_close
        self.tag_methods = [TAG_METHODS[n] for n in hook_names if n in TAG_METHODS]

    def check_start(self) -> None:
        """HBPO / AnytimeReasoner on a model whose prompt never opens ``<think>``: stop or warn."""
        if self.mode == "off" or self.prompt_thinks or not self.tag_methods:
            return
        msg = (f"{' and '.join(self.tag_methods)} need a model that thinks in <think>...</think> tags, and neither "
               f"the tokenizer's chat template nor the prompt (data.prompt_template={self.cfg.data.prompt_template}) "
               f"has <think>")
        self._stop_or_warn(ConfigError, msg, "use a reasoning model, data.prompt_template=r1_zero for a base model, "
                           "or reward.think_tags=auto to train anyway", "training anyway (reward.think_tags=auto)")

    def require_close(self, texts: Sequence[str], where: str, finish_reasons: Sequence[str] | None = None) -> bool:
        """The ``require_think_close`` to grade ``texts`` with. The first call with tags required
        and a response that ended on its own decides (responses cut at the length limit say
        nothing: a model that thinks in tags may not reach ``</think>`` within a short eval
        budget): no ``</think>`` in any finished response stops the run (``require``) or switches
        the requirement off for the rest of it (``auto``, said once)."""
        if self.decided or not texts:
            return self.cfg.reward.require_think_close
        if finish_reasons is not None:
            texts = [t for t, reason in zip(texts, finish_reasons) if reason != FINISH_LENGTH]
            if not texts:  # every response was truncated: decide on later ones
                return self.cfg.reward.require_think_close
        self.decided = True
        if closes_think(texts):
            return True
        msg = (f"reward.require_think_close=true grades only the text after </think>, and none of the "
               f"{len(texts)} responses of {where} that ended before the length limit has one (this model "
               f"does not think in tags), so every reward would be 0")
        self._stop_or_warn(TrainingError, msg, "set reward.require_think_close=false (grade the whole response), or "
                           "reward.think_tags=auto to switch it off when this happens",
                           "reward.require_think_close is switched off for this run (reward.think_tags=auto)")
        self.cfg.reward.require_think_close = False  # rewards, hooks and evals read it from here
        return False

    def _stop_or_warn(self, error: type[Exception], msg: str, fix: str, going_on: str) -> None:
        """``require``: raise ``error`` naming the fix; ``auto``: warn once, saying what happens instead."""
        if self.mode == "require":
            raise error(f"{msg}; {fix}")
        warnings.warn(f"{msg}; {going_on}", stacklevel=4)

    def state_dict(self) -> dict[str, bool]:
        """The decision, so a resumed run grades as the run before it (``auto`` may have switched)."""
        return {"decided": self.decided, "require_think_close": bool(self.cfg.reward.require_think_close)}

    def load_state_dict(self, state: dict[str, bool]) -> None:
        if state:  # checkpoints from before reward.think_tags decide again
            self.decided = bool(state["decided"])
            self.cfg.reward.require_think_close = bool(state["require_think_close"])
