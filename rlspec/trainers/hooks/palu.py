"""PALU (arXiv 2510.10168): a generation budget per question, shrunk while the question is solved.

On a question's next visit, with ``R`` the pass rate of its previous rollouts: if ``R >= C`` its
budget shrinks by the gap between the top quantiles of its correct lengths, else it resets to the
rollout cap (:func:`rlspec.rewards.palu.palu_update_budget`). The rollouts are cut at the budget
(:class:`~rlspec.trainers.hooks.truncation.TruncationHook`). The budgets are run-long state, kept in
checkpoints.
"""

from __future__ import annotations

from typing import Any

from rlspec.registry import ROLLOUT_HOOKS
from rlspec.rewards.palu import palu_update_budget
from rlspec.trainers.hooks.base import RolloutChunk
from rlspec.trainers.hooks.truncation import TruncationHook


@ROLLOUT_HOOKS.register("palu", group="truncation")
class PaluBudgets(TruncationHook):
    name = "palu"
    kwargs_keys = frozenset({"C", "tau", "min_budget"})

    def __init__(self, ctx, kwargs: dict[str, Any]) -> None:
        super().__init__(ctx, kwargs)
        self.records: dict[str, dict[str, Any]] = {}  # question uid -> budget, pass rate, correct lengths

    def _palu_kwargs(self) -> dict[str, Any]:
        """``C``, ``tau``, ``min_budget`` with the paper's defaults."""
        return {"C": self.kwargs.get("C", 0.8), "tau": self.kwargs.get("tau", 0.5),
                "min_budget": self.kwargs.get("min_budget", 1)}

    def check(self) -> None:
        cap = self.ctx.max_length_at(0)
        palu_update_budget(cap, cap, 1.0, [1, 2], **self._palu_kwargs())

    def limits(self, chunk: RolloutChunk) -> list[int]:
        cap, palu = chunk.max_length, self._palu_kwargs()
        out = []
        for uid in chunk.batch.prompt_uids():
            rec = self.records.get(uid)
            if rec is None:
                out.append(cap)
            else:
                out.append(palu_update_budget(min(rec["budget"], cap), cap, rec["pass_rate"], rec["correct_lengths"],
                                              **palu))
        return out

    def after_scoring(self, chunk: RolloutChunk) -> None:
        """Remember each question's budget, pass rate and correct lengths for its next visit."""
        batch = chunk.batch
        per_uid: dict[str, dict[str, Any]] = {}
        for uid, limit, ids, c in zip(batch.prompt_uids(), batch.columns["truncation_limit"], batch.completion_ids,
                                      chunk.correct):
            rec = per_uid.setdefault(uid, {"budget": int(limit), "n": 0, "correct": 0, "correct_lengths": []})
            rec["n"] += 1
            if c:
                rec["correct"] += 1
                rec["correct_lengths"].append(len(ids))
        for uid, rec in per_uid.items():
            self.records[uid] = {"budget": rec["budget"], "pass_rate": rec["correct"] / rec["n"],
                                 "correct_lengths": rec["correct_lengths"]}

    def state_dict(self) -> dict[str, Any]:
        return {"records": self.records}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.records = dict(state.get("records", {}))
