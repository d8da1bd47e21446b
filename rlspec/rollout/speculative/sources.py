"""Where drafts come from: the interface every draft source implements.

A draft source proposes, for each active row, a tree (or chain) of draft tokens that the target
then verifies in one forward (:class:`~rlspec.rollout.speculative.decoder.SpeculativeDecoder`).
Verification is lossless whatever the source proposes: a point-mass draft token ``x`` is accepted
with probability ``p(x)`` and, when rejected, the token is drawn from ``p`` with ``x`` removed
(:mod:`~rlspec.rollout.speculative.verification`). A source therefore only decides how fast
decoding is, never what it samples. It must not look at the verifier's random numbers.

Sources: the EAGLE drafter (:class:`~rlspec.rollout.speculative.eagle_source.EagleDraftSource`, a
model forward per draft level) and the model-free lookups
(:class:`~rlspec.rollout.speculative.lookup_source.LookupDraftSource`: n-gram matches in the row's
own text, its group's responses and earlier steps' responses, ``needs_hidden_states = False``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ContextManager, Protocol

import torch

from rlspec.rollout.base import SamplingParams
from rlspec.rollout.speculative.draft_tree import ArmShape, DraftTree


@dataclass
class Draft:
    """One step's proposal for ``n`` rows."""

    tree: DraftTree  # tokens / parents / depth ``[n, M]``
    # a sampled chain's draft distributions ``q`` ``[n, K, V]`` (speculative sampling with q);
    # None: point-mass drafts (the tree is verified by recursive rejection sampling)
    chain_q: torch.Tensor | None = None
    # [n, M] bool: False drops a node (and its subtree) from its row, e.g. lookup chains of
    # different lengths padded to one width; None: every node is real
    valid: torch.Tensor | None = None
    is_chain: bool = False  # every row's tree is a chain (node j's parent is j - 1): cheaper mask and verifier


class DraftSource(Protocol):
    """What the decoder asks of a draft source during one ``generate`` call.

    Rows are the decoder's active rows ``0 .. n-1``; when rows finish, :meth:`remove` tells the
    source which ones left and how the rest were reordered (``order[i]`` = old row of new row ``i``).
    """

    needs_hidden_states: bool  # whether :meth:`start` / :meth:`accept` need the target's hidden states

    def holding(self) -> ContextManager[None]:
        """Held around a whole draft + verify step (EAGLE: the drafter's weight lock)."""
        ...

    def start(self, sequences: list[list[int]], states: list[torch.Tensor] | None, num_slots: int,
              max_len: int) -> None:
        """Speculation begins for rows whose tokens so far are ``sequences[i]`` (the last one not yet
        in the target cache); ``states[i]`` are the target's hidden states of the cached ones."""
        ...

    def propose(self, arm: ArmShape, lens: torch.Tensor, params: SamplingParams,
                generator: torch.Generator | None) -> Draft:
        """Draft a tree of shape ``arm`` after every row (``lens[i]`` tokens in the target cache)."""
        ...

    def accept(self, tokens: list[list[int]], hidden: list[torch.Tensor], cached: list[int]) -> None:
        """After verification: row ``i`` gained ``tokens[i]`` (accepted drafts, then the new last
        token) produced by the target states ``hidden[i]`` (an empty list for a source without
        ``needs_hidden_states``); ``cached[i]`` tokens were in the cache before the step."""
        ...

    def observe_plain(self, tokens: torch.Tensor, hidden: torch.Tensor | None) -> None:
        """A plain decode step ran in between: every row sampled ``tokens[i]`` from ``hidden[i]``."""
        ...

    def remove(self, done: list[int], order: list[int]) -> None:
        """Rows ``done`` finished; the survivors were reordered by ``order``."""
        ...

    def end(self) -> None:
        """Speculation stops for this call (drop per-call state)."""
        ...

