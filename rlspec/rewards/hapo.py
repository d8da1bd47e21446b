"""HAPO: history-aware length reward (arXiv 2505.11225; code HCY123902/HAPO)."""

from __future__ import annotations

import math
from typing import Any, Mapping, Sequence

from rlspec.errors import ConfigError
from rlspec.registry import REWARD_TERMS
from rlspec.rewards.terms import RewardBatch
from rlspec.rewards.validation import check_int, check_lengths, check_number, check_same_length, plus_zero


HAPO_CORRECT_FLOOR = -0.7  # keeps every correct answer (1 + r_len >= 0.3) above every wrong one


def hapo_length_reward(length: int, correct: bool, history_min: int | None, w: float = 1.0) -> float:
    r"""HAPO's length reward (arXiv 2505.11225; code ``HCY123902/HAPO``, ``utils.py::compute_len_reward``).

    ``h = history_min`` is the shortest correct response seen so far for this prompt (in earlier
    batches; see :class:`HapoHistory`). With ``L`` the response length::

        c     = cos((L / h) * pi / 2)   if L < 2h   else -1
        r_len = w * max(-0.7, c)        if correct
              = w * min(0, c)           otherwise

    and ``r_len = 0`` while there is no history (``h`` is ``None``; the code also treats
    ``h <= 0`` as no history). A correct answer shorter than the record earns up to ``w``; a wrong
    one is never rewarded for brevity. The total is ``1[correct] + r_len``; HAPO uses ``w = 1``.
    (The code's linear variant with a tolerance ratio, ``compute_len_reward_linear``, is not
    implemented.)

    >>> round(hapo_length_reward(150, True, 100), 4), round(hapo_length_reward(150, False, 100), 4)
    (-0.7, -0.7071)
    """
    length = check_int(length, "length", None, minimum=0)
    w = check_number(w, "w", None)
    if history_min is None:
        return 0.0
    h = check_int(history_min, "history_min", None, minimum=0)
    if h == 0:
        return 0.0
    c = math.cos((length / h) * (math.pi / 2)) if length < 2 * h else -1.0
    r = max(HAPO_CORRECT_FLOOR, c) if correct else min(0.0, c)
    return plus_zero(w * r)


class HapoHistory:
    """HAPO's per-prompt state ``h_q``: the minimum length of all correct responses seen so far,
    keyed by a prompt id string (arXiv 2505.11225; the code keeps a tensor indexed by prompt).

    Use: compute the batch's rewards with :func:`hapo_length_rewards` (which reads the history),
    **then** call :meth:`update` with the same batch, as HAPO updates ``h_q`` after each batch.
    :meth:`state_dict` is plain JSON (``{"version": 1, "min_correct_length": {uid: int}}``), so it
    can go into a checkpoint and back with :meth:`load_state_dict` on resume. Prompt ids must be
    strings: JSON object keys are strings, so an int id would not match after a restore.
    """

    VERSION = 1

    def __init__(self) -> None:
        self._min: dict[str, int] = {}

    def __len__(self) -> int:
        return len(self._min)

    def __contains__(self, uid: object) -> bool:
        return uid in self._min

    def __repr__(self) -> str:
        return f"HapoHistory({len(self._min)} prompts)"

    @staticmethod
    def _check_uid(uid: Any) -> str:
        if not isinstance(uid, str):
            raise ValueError(f"HAPO prompt ids must be strings (they are JSON keys in checkpoints), got {uid!r}")
        return uid

    def get(self, uid: str) -> int | None:
        """The shortest correct length seen for prompt ``uid``, or ``None`` if none yet."""
        return self._min.get(self._check_uid(uid))

    def update(self, uids: Sequence[str], lengths: Sequence[int], correct: Sequence[bool]) -> None:
        """Fold one batch in: ``h[uid] = min(h[uid], L)`` over its correct responses."""
        check_same_length(uids=uids, lengths=lengths, correct=correct)
        lengths = check_lengths(lengths)
        for uid, length, ok in zip(uids, lengths, correct):
            uid = self._check_uid(uid)
            if ok:
                old = self._min.get(uid)
                self._min[uid] = length if old is None else min(old, length)

    def state_dict(self) -> dict[str, Any]:
        return {"version": self.VERSION, "min_correct_length": dict(sorted(self._min.items()))}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Replace the history with a :meth:`state_dict` (e.g. read back from a checkpoint's JSON)."""
        if not isinstance(state, Mapping) or state.get("version") != self.VERSION:
            raise ValueError(
                f"not a HapoHistory state (expected {{'version': {self.VERSION}, 'min_correct_length': {{...}}}}), "
                f"got {state!r:.200}"
            )
        table = state.get("min_correct_length")
        if not isinstance(table, Mapping):
            raise ValueError("HapoHistory state: 'min_correct_length' must be a mapping {prompt id: int}")
        loaded = {}
        for uid, length in table.items():
            loaded[self._check_uid(uid)] = check_int(length, f"min_correct_length[{uid!r}]", None, minimum=0)
        self._min = loaded


def hapo_length_rewards(
    uids: Sequence[str], lengths: Sequence[int], correct: Sequence[bool], history: HapoHistory, w: float = 1.0
) -> list[float]:
    """:func:`hapo_length_reward` for a batch, reading (not updating) ``history``; call
    ``history.update(uids, lengths, correct)`` afterwards."""
    check_same_length(uids=uids, lengths=lengths, correct=correct)
    return [hapo_length_reward(L, bool(c), history.get(u), w) for u, L, c in zip(uids, lengths, correct)]


@REWARD_TERMS.register("hapo")
def hapo_term(batch: RewardBatch, w: float = 1.0) -> list[float]:
    """HAPO's history-aware length reward (arXiv 2505.11225; code HCY123902/HAPO
    ``compute_len_reward``), added to 0/1 correctness.

    Each prompt's history ``h_q`` (shortest correct response so far, keyed by the dataset's
    ``uid`` column, else the question text) is read to score this batch, then updated with it
    (HAPO updates ``h_q`` after each batch). It lives in ``batch.state["hapo"]``, which the
    trainer saves in checkpoints and restores on resume. With dynamic sampling every generation
    chunk counts as a batch.
    """
    if not w > 0:
        raise ConfigError(f"reward.terms.hapo.kwargs.w must be > 0, got {w}")
    history = HapoHistory()
    if "hapo" in batch.state:
        history.load_state_dict(batch.state["hapo"])
    uids = batch.prompt_uids()
    lengths = [len(ids) for ids in batch.completion_ids]
    rewards = hapo_length_rewards(uids, lengths, batch.correct, history, w)
    history.update(uids, lengths, batch.correct)
    batch.state["hapo"] = history.state_dict()
    return rewards
