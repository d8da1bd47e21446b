"""Model-free drafts for the native engine's rows: *self*, *group* and *history* lookups.

One :class:`~rlspec.rollout.speculative.lookup.NgramIndex` per distinct prompt of a ``generate``
call holds three kinds of documents:

* *self* -- the row's own prompt + response so far (prompt-lookup decoding);
* *group* -- the other responses to the same prompt in this call (Seer's grouped speculation,
  arXiv 2511.14617): siblings that ran ahead, or finished, predict the ones still running;
* *history* -- the responses this prompt got in earlier calls (earlier RL steps or epochs), from a
  bounded :class:`~rlspec.rollout.speculative.history.DraftHistory` (SPEC-RL, RhymeRL).

A row drafts the voted continuation of its longest matching suffix over the documents of the
enabled sources; rows without a match send no draft (``Draft.valid``). The source reads the
call's prompts and responses live (``responses[r]`` grows as the engine appends), and indexes the
new tokens only when a lookup step runs, so plain steps pay nothing for it.

A row whose drafts keep being rejected whole (its text left the documents it matches: a sibling's
or an earlier epoch's answer that the vote prefers) backs off: after ``m >= 2`` such drafts in a
row it sends none for the next ``min(2**(m-1), MAX_BACKOFF) - 1`` lookups (SuffixDecoding's and
SmartSpec's point: draft where the match has been paying), so its verify width is not paid for
nothing. Which rows draft never changes the tokens (each draft is verified losslessly).
"""

from __future__ import annotations

import contextlib
import time
from typing import Callable, ContextManager, Sequence

import torch

from rlspec.config import LookupConfig
from rlspec.rollout.base import SamplingParams
from rlspec.rollout.speculative.draft_tree import ArmShape, DraftTree
from rlspec.rollout.speculative.history import DraftHistory
from rlspec.rollout.speculative.lookup import NgramIndex, draft_cap, vote_draft
from rlspec.rollout.speculative.sources import Draft

LOOKUP_SOURCES = ("self", "group", "history")
MAX_BACKOFF = 32  # at most 31 lookups without a draft after whole rejections in a row


class LookupDraftSource:
    """:class:`~rlspec.rollout.speculative.sources.DraftSource` over n-gram lookups (see module doc).

    Args:
        prompts / responses: the call's per-request token lists (``responses[r]`` is appended to).
        active_rows: returns the request of each active row, in the engine's row order.
        sources: the enabled lookup sources (a subset of :data:`LOOKUP_SOURCES`).
        settings: ``rollout.speculative.lookup``.
        history: the engine's store of earlier responses (None: no history source).
    """

    needs_hidden_states = False
    name = "lookup"

    def __init__(self, prompts: Sequence[list[int]], responses: Sequence[list[int]],
                 active_rows: Callable[[], list[int]], sources: Sequence[str], settings: LookupConfig,
                 history: DraftHistory | None, device: torch.device) -> None:
        self.prompts, self.responses, self.active_rows = prompts, responses, active_rows
        self.sources = frozenset(sources) & frozenset(LOOKUP_SOURCES)
        self.settings, self.history, self.device = settings, history, device
        self._group_of: dict[tuple[int, ...], int] = {}  # prompt -> group
        self._members: list[list[int]] = []  # group -> its requests seen so far
        self._indices: list[NgramIndex] = []  # group -> its index
        self._tail_len: list[int] = []  # group -> prompt tokens in front of each response document
        self._prompt_doc: list[int] = []  # group -> its prompt's document
        self._history_docs: list[list[int]] = []  # group -> earlier responses' documents
        self._doc_of: dict[int, int] = {}  # request -> its document in its group's index
        self._by_prompt: dict[tuple[int, ...], list[int]] | None = None  # prompt -> its requests (built once)
        self.last_sources: list[str | None] = []  # per row of the last proposal: the source its draft came from
        self.lookup_seconds = 0.0
        self._proposed: list[tuple[int, int]] = []  # (request, draft length) per row of the last proposal
        self._misses: dict[int, int] = {}  # request -> drafts rejected whole in a row
        self._skip: dict[int, int] = {}  # request -> lookups left without a draft (backoff)

    # -- DraftSource lifecycle: the state is read live from the call, so these are no-ops --------
    def holding(self) -> ContextManager[None]:
        return contextlib.nullcontext()

    def start(self, sequences, states, num_slots, max_len) -> None:  # noqa: D102
        pass

    def accept(self, tokens, hidden, cached) -> None:
        """Row ``i`` of the last proposal kept ``len(tokens[i]) - 1`` drafted tokens: count whole
        rejections (the backoff in the module doc)."""
        for (request, drafted), gained in zip(self._proposed, tokens):
            if not drafted:
                continue
            if len(gained) > 1:
                self._misses.pop(request, None)
                continue
            m = self._misses[request] = self._misses.get(request, 0) + 1
            if m >= 2:
                self._skip[request] = min(2 ** (m - 1), MAX_BACKOFF) - 1

    def observe_plain(self, tokens, hidden) -> None:  # noqa: D102
        pass

    def remove(self, done, order) -> None:  # noqa: D102
        pass

    def end(self) -> None:  # noqa: D102
        pass

    # ------------------------------------------------------------------ indexing
    def _group(self, request: int) -> int:
        """The group of ``request`` (created with its index, its prompt's and history's documents
        and one document per request of the prompt, on first sight)."""
        key = tuple(self.prompts[request])
        g = self._group_of.get(key)
        if g is None:
            g = len(self._indices)
            self._group_of[key] = g
            s = self.settings
            index = NgramIndex(s.min_ngram, s.max_ngram)
            self._prompt_doc.append(index.add_document(list(key), "prompt"))  # once for all rows: prompt lookup
            history = []
            if self.history is not None and "history" in self.sources:
                history = [index.add_document(doc.tolist(), "history") for doc in self.history.responses(key)]
            self._history_docs.append(history)
            self._indices.append(index)
            self._members.append([])
            if self._by_prompt is None:
                self._by_prompt = {}
                for other, prompt in enumerate(self.prompts):
                    self._by_prompt.setdefault(tuple(prompt), []).append(other)
            tail = list(key[max(0, len(key) - s.max_ngram):])  # so a response's first tokens match too
            for member in self._by_prompt[key]:  # siblings that finished (or wait) are documents too
                self._doc_of[member] = index.add_document(list(tail), "row", owner=member)
                self._members[g].append(member)
            self._tail_len.append(len(tail))
        return g

    def _sync(self, group: int) -> None:
        """Copy and index the tokens the group's requests gained since the last lookup."""
        index = self._indices[group]
        grown = []
        for r in self._members[group]:
            doc_id = self._doc_of[r]
            doc = index.documents[doc_id]
            have = len(doc.tokens) - self._tail_len[group]
            resp = self.responses[r]
            if have < len(resp):
                doc.tokens.extend(resp[have:])
                grown.append(doc_id)
        index.catch_up_many(grown)

    # ------------------------------------------------------------------ drafting
    def propose(self, arm: ArmShape, lens: torch.Tensor, params: SamplingParams,
                generator: torch.Generator | None) -> Draft | None:
        """A chain of at most ``arm.depth`` tokens per row; None when no row found a match."""
        t0 = time.perf_counter()
        rows = self.active_rows()
        groups = [self._group(r) for r in rows]
        for g in set(groups):
            self._sync(g)
        drafts: list[list[int]] = []
        self.last_sources = []
        for r, g in zip(rows, groups):
            if self._skip.get(r):
                self._skip[r] -= 1
                draft, source = [], None
            else:
                draft, source = self._draft_row(r, g, arm.depth)
            drafts.append(draft)
            self.last_sources.append(source)
        self._proposed = [(r, len(d)) for r, d in zip(rows, drafts)]
        self.lookup_seconds += time.perf_counter() - t0
        return chain_draft(drafts, self.device)

    def _draft_row(self, r: int, g: int, max_len: int) -> tuple[list[int], str | None]:
        """The row's draft and its source: the documents it may search, the row's own text last
        (ties in the vote go to it)."""
        index, own = self._indices[g], self._doc_of[r]
        searched = list(self._history_docs[g]) if "history" in self.sources else []
        if "group" in self.sources:
            searched += [self._doc_of[m] for m in self._members[g] if m != r]
        if "self" in self.sources:
            searched += [self._prompt_doc[g], own]
        occurrences, n = index.lookup(index.documents[own].tokens, searched)
        if not n:
            return [], None
        draft, doc_id = vote_draft(index, occurrences, draft_cap(n, max_len, self.settings.tokens_per_match_token))
        if not draft:
            return [], None
        source = index.documents[doc_id].source
        return draft, ("self" if doc_id == own or source == "prompt" else "history" if source == "history" else "group")


def chain_draft(drafts: Sequence[Sequence[int]], device: torch.device) -> Draft | None:
    """Per-row chains of different lengths as one padded :class:`Draft` (``valid`` marks real
    nodes); None when every chain is empty.

    >>> d = chain_draft([[5, 6], [], [7]], torch.device("cpu"))
    >>> d.tree.tokens.tolist(), d.tree.parents.tolist()[0], d.valid.tolist()
    ([[5, 6], [0, 0], [7, 0]], [-1, 0], [[True, True], [False, False], [True, False]])
    >>> chain_draft([[], []], torch.device("cpu")) is None
    True
    """
    width = max((len(d) for d in drafts), default=0)
    if width == 0:
        return None
    n = len(drafts)
    tokens = torch.tensor([list(d) + [0] * (width - len(d)) for d in drafts], dtype=torch.long)
    valid = torch.arange(width)[None, :] < torch.tensor([len(d) for d in drafts])[:, None]
    parents = (torch.arange(width) - 1).expand(n, width)
    depth = (torch.arange(width) + 1).expand(n, width)
    tree = DraftTree(tokens.to(device), parents.to(device), depth.to(device),
                     torch.zeros(n, width, dtype=torch.float64, device=device))
    return Draft(tree, None, valid=valid.to(device), is_chain=True)
