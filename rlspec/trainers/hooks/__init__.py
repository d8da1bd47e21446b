"""Method-specific rollout behaviour, one module per method, registered in :data:`rlspec.registry.ROLLOUT_HOOKS`.

======================  ==============================  =========================================
hook                    selected by                     what it does
======================  ==============================  =========================================
``hbpo``                ``rollout.budget.name``         a budget prefill per subgroup (HBPO)
``l1``                  ``rollout.budget.name``         a target length in the prompt (L1)
``difficulty_aware``    ``rollout.truncation.name``     per-prompt limits from accuracy (DA-DLER)
``palu``                ``rollout.truncation.name``     per-question shrinking budgets (PALU)
``anytime``             ``anytime.enable``              thinking cut at budgets, summaries (AnytimeReasoner)
======================  ==============================  =========================================

The interface is :class:`~rlspec.trainers.hooks.base.RolloutHook`.
"""

from __future__ import annotations

from rlspec.registry import ROLLOUT_HOOKS
from rlspec.trainers.hooks import anytime, hbpo, l1, palu, truncation  # noqa: F401 -- register the hooks
from rlspec.trainers.hooks.base import HookContext, RolloutChunk, RolloutHook


def build_hooks(ctx: HookContext) -> list[RolloutHook]:
    """The hooks the config turns on, in the order the trainer calls them."""
    cfg = ctx.cfg
    chosen = [(cfg.rollout.budget.name, cfg.rollout.budget.kwargs),
              (cfg.rollout.truncation.name, cfg.rollout.truncation.kwargs),
              ("anytime" if cfg.anytime.enable else None, {})]
    return [ROLLOUT_HOOKS.get(name)(ctx, dict(kwargs)) for name, kwargs in chosen if name is not None]


__all__ = ["HookContext", "RolloutChunk", "RolloutHook", "build_hooks"]
