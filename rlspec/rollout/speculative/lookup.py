"""Model-free drafts: an incremental n-gram index and the draft it proposes (pure Python + numpy).

Redundant text is what a lookup drafter predicts for free: a re-check repeats earlier steps, the
responses to one prompt share most of their text, and the same prompt comes back in later epochs
with near-identical answers. Prompt-lookup decoding (Saxena 2023), SuffixDecoding (arXiv
2411.04975) and the RL systems built on them (SPEC-RL arXiv 2509.23232, RhymeRL arXiv 2508.18588,
DAS arXiv 2511.13841) draft the continuation of the longest earlier occurrence of the text's
suffix. :class:`NgramIndex` is that lookup over a set of token documents, updated as tokens are
appended; :func:`vote_draft` turns the occurrences into one draft chain:

* the **longest** suffix of the context (``max_n`` down to ``min_n`` tokens) with an earlier
  occurrence in the searched documents wins (a longer match is a more confident prediction);
* each document contributes its latest occurrence; the draft follows the continuation most of
  them agree on, token by token (SuffixDecoding's frequency), ties to the last document listed,
  and stops where none continues;
* its length is at most ``tokens_per_match_token * match length`` (SuffixDecoding's
  ``max_spec_factor``) and the arm's ``max_len``.

Each document keeps one table per ``n``: n-gram hash -> the latest end of that n-gram (the
position of the token after it). Hashes are ``sum_i token_i * M_i mod 2**64`` with fixed odd
multipliers, computed by numpy over long stretches (a finished sibling's response) and in Python
for a few new tokens; a collision only makes a bad draft, which verification rejects. Which
documents a row searches (its own text, its siblings', earlier steps') is the caller's choice; the
draft is verified losslessly whatever it is, so this module decides speed only.

>>> idx = NgramIndex(2, 3)
>>> a = idx.add_document([1, 2, 3, 4, 1, 2], source="self")
>>> occ, n = idx.lookup([9, 1, 2], [a])
>>> n, occ
(2, [(0, 2)])
>>> vote_draft(idx, occ, max_len=3)
([3, 4, 1], 0)
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Sequence

import numpy as np

Occurrence = tuple[int, int]  # (document id, end): doc[end - n:end] matched, the continuation starts at doc[end]
_MULTIPLIERS = [0x9E3779B97F4A7C15, 0xC2B2AE3D27D4EB4F, 0x165667B19E3779F9, 0xD6E8FEB86659FD93,
                0xFF51AFD7ED558CCD, 0xC4CEB9FE1A85EC53, 0x2545F4914F6CDD1D, 0x94D049BB133111EB]
_MASK = (1 << 64) - 1
_M_NP = np.array([m - (1 << 64) if m >= 1 << 63 else m for m in _MULTIPLIERS], dtype=np.int64)
_NUMPY_FROM = 24  # new tokens from which numpy hashes faster than Python


def ngram_hash(tokens: Sequence[int]) -> int:
    """The signed 64-bit hash of an n-gram (``n <= 8``), equal to the numpy path's.

    >>> ngram_hash([1, 2]) == int(np.array([1, 2], dtype=np.int64) @ _M_NP[:2])
    True
    """
    h = 0
    for t, m in zip(tokens, _MULTIPLIERS):
        h += t * m
    h &= _MASK
    return h - (1 << 64) if h >> 63 else h


@dataclass
class Document:
    """A token sequence the index searches (a row's prompt + response, an earlier response)."""

    tokens: list[int]
    source: str  # "row" / "prompt" / "history": who the draft is attributed to (the caller's label)
    owner: int = -1  # the request that writes it (-1: none)
    indexed: int = 0  # n-grams ending before position `indexed` are in the tables
    tables: list[dict[int, int]] = field(default_factory=list)  # per n: hash -> latest end


@dataclass
class NgramIndex:
    """Documents with per-``n`` tables of their n-grams (``min_n .. max_n`` tokens), updated
    incrementally. An n-gram is indexed once the token after it exists, so a lookup of a
    document's own suffix finds only earlier occurrences, each with a continuation."""

    min_n: int
    max_n: int
    documents: list[Document] = field(default_factory=list)

    def __post_init__(self) -> None:
        if not 1 <= self.min_n <= self.max_n <= len(_MULTIPLIERS):
            raise ValueError(f"need 1 <= min_n <= max_n <= {len(_MULTIPLIERS)}, got {self.min_n}, {self.max_n}")

    def add_document(self, tokens: Sequence[int], source: str, owner: int = -1) -> int:
        """A new document (indexed now); returns its id. ``tokens`` is copied unless it is a list
        that the caller keeps appending to (then :meth:`catch_up` indexes the new tokens)."""
        doc = Document(tokens if isinstance(tokens, list) else list(tokens), source, owner,
                       tables=[{} for _ in range(self.min_n, self.max_n + 1)])
        self.documents.append(doc)
        self.catch_up(len(self.documents) - 1)
        return len(self.documents) - 1

    def catch_up(self, doc_id: int) -> None:
        """Index the n-grams that ended before tokens appended since the last call (a few new
        tokens hashed in Python, a long stretch by :meth:`catch_up_many`'s numpy pass)."""
        doc = self.documents[doc_id]
        tokens, size = doc.tokens, len(doc.tokens)
        first = max(doc.indexed, 1)  # ends first .. size-1 (the token at `end` continues the n-gram)
        if size - first >= _NUMPY_FROM:
            self.catch_up_many([doc_id])
            return
        for end in range(first, size):
            for n, table in zip(range(self.min_n, min(self.max_n, end) + 1), doc.tables):
                table[ngram_hash(tokens[end - n:end])] = end
        doc.indexed = max(doc.indexed, size)

    def catch_up_many(self, doc_ids: Sequence[int]) -> None:
        """:meth:`catch_up` for several documents, the long stretches hashed by one numpy pass over
        their concatenation (a lookup step after many plain steps indexes a whole group at once)."""
        long_docs, stretches, offsets, total = [], [], [], 0
        for d in doc_ids:
            doc = self.documents[d]
            first, size = max(doc.indexed, 1), len(doc.tokens)
            if size - first >= _NUMPY_FROM:
                lo = max(0, first - self.max_n)
                long_docs.append((d, first, lo, size))
                stretches.append(doc.tokens[lo:size])
                offsets.append(total)
                total += size - lo
            elif first < size:
                self.catch_up(d)
        if not long_docs:
            return
        arr = np.fromiter((t for part in stretches for t in part), dtype=np.int64, count=total)
        for n, slot in zip(range(self.min_n, self.max_n + 1), range(self.max_n)):
            if total < n:
                continue
            h = np.zeros(total - n + 1, dtype=np.int64)  # h[j]: the n-gram starting at j
            for i in range(n):
                h += arr[i:total - n + 1 + i] * _M_NP[i]
            for (d, first, lo, size), off in zip(long_docs, offsets):
                e0 = max(first, n)
                if e0 < size:  # n-grams ending at e0 .. size-1 start at e0-n .. size-1-n
                    start = off + e0 - n - lo
                    self.documents[d].tables[slot].update(zip(h[start:start + size - e0].tolist(), range(e0, size)))
        for d, _, _, size in long_docs:
            self.documents[d].indexed = size

    def lookup(self, context: Sequence[int], doc_ids: Sequence[int]) -> tuple[list[Occurrence], int]:
        """The latest occurrence in each of ``doc_ids`` of the longest suffix of ``context``
        (``max_n`` .. ``min_n`` tokens) found in any of them, and that suffix's length (0: none)."""
        docs = self.documents
        for n in range(min(self.max_n, len(context)), self.min_n - 1, -1):
            key = ngram_hash(context[len(context) - n:])
            slot = n - self.min_n
            found = [(d, end) for d in doc_ids if (end := docs[d].tables[slot].get(key)) is not None]
            if found:
                return found, n
        return [], 0


def draft_cap(match_len: int, max_len: int, tokens_per_match_token: float) -> int:
    """How many tokens a match of ``match_len`` tokens may draft (SuffixDecoding's draft length
    grows with the match length).

    >>> draft_cap(2, 8, 2.0), draft_cap(3, 4, 2.0), draft_cap(0, 8, 2.0), draft_cap(1, 8, 0.5)
    (4, 4, 0, 1)
    """
    if match_len <= 0:
        return 0
    return max(1, min(max_len, math.floor(tokens_per_match_token * match_len)))


def vote_draft(index: NgramIndex, occurrences: Sequence[Occurrence], max_len: int) -> tuple[list[int], int]:
    """The continuation most ``occurrences`` agree on, up to ``max_len`` tokens.

    At each position the token continuing most of the still-agreeing occurrences is taken (ties:
    the one listed last); occurrences that continue differently drop out; the draft ends where
    none continues. Returns the draft and the document of the last occurrence that agreed with
    all of it (the document the draft is attributed to).

    >>> idx = NgramIndex(1, 1)
    >>> docs = [idx.add_document(d, "row") for d in ([5, 1, 2], [5, 1, 3], [5, 1, 2, 7])]
    >>> occ, n = idx.lookup([5], docs)
    >>> vote_draft(idx, occ, max_len=4)  # after 5: "1 2" twice, "1 3" once
    ([1, 2, 7], 2)
    """
    docs = index.documents
    if len(occurrences) == 1:  # nothing to vote on: the one continuation
        d, end = occurrences[0]
        return list(docs[d].tokens[end:end + max_len]), d
    live = list(occurrences)
    draft: list[int] = []
    while live and len(draft) < max_len:
        depth = len(draft)
        votes: dict[int, int] = {}
        newest: dict[int, int] = {}
        for k, (d, end) in enumerate(live):
            toks = docs[d].tokens
            if end + depth < len(toks):
                t = toks[end + depth]
                votes[t] = votes.get(t, 0) + 1
                newest[t] = k
        if not votes:
            break
        best = max(votes, key=lambda t: (votes[t], newest[t]))
        draft.append(best)
        live = [(d, end) for d, end in live if end + depth < len(docs[d].tokens) and docs[d].tokens[end + depth] == best]
    return draft, (live[-1][0] if live else occurrences[-1][0])
