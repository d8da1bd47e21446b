"""Model-free drafts: an incremental n-gram index and the draft it proposes (pure Python).

Redundant text is what a lookup drafter predicts for free: a re-check repeats earlier steps, the
responses to one prompt share most of their text, and the same prompt comes back in later epochs
with near-identical answers. Prompt-lookup decoding (Saxena 2023), SuffixDecoding (arXiv
2411.04975) and the RL systems built on them (SPEC-RL arXiv 2509.23232, RhymeRL arXiv 2508.18588,
DAS arXiv 2511.13841) draft the continuation of the longest earlier occurrence of the text's
suffix. :class:`NgramIndex` is that lookup over a set of token documents, updated as tokens are
appended; :func:`vote_draft` turns the occurrences into one draft chain:

* the **longest** suffix of the context (``max_n`` down to ``min_n`` tokens) with an earlier
  occurrence wins (a longer match is a more confident prediction);
* the draft follows the continuation most occurrences agree on, token by token (SuffixDecoding's
  frequency), ties to the most recent occurrence, and stops where no occurrence continues;
* its length is at most ``tokens_per_match_token * match length`` (SuffixDecoding's
  ``max_spec_factor``) and the arm's ``max_len``.

Which occurrences a row may use (its own text, its siblings', earlier steps') is the caller's
choice; the draft is verified losslessly whatever it is, so this module decides speed only.

>>> idx = NgramIndex(2, 3)
>>> a = idx.add_document([1, 2, 3, 4, 1, 2], source="self")
>>> occ, n = idx.lookup([9, 1, 2])
>>> n, [(idx.documents[d].source, end) for d, end in occ]
(2, [('self', 2)])
>>> vote_draft(idx, occ, max_len=3)
([3, 4, 1], 0)
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable, Sequence

Occurrence = tuple[int, int]  # (document id, end): doc[end - n:end] matched, the continuation starts at doc[end]


@dataclass
class Document:
    """A token sequence the index searches (a row's prompt + response, an earlier response)."""

    tokens: list[int]
    source: str  # "self" / "group" / "history": who the draft is attributed to (the caller's label)
    indexed: int = 0  # positions 0 .. indexed-1 have their n-grams (ending there) in the index
    owner: int = -1  # the request that writes it (-1: none)
    # its own n-grams -> their latest end (rows keep one, so that a busy shared table, where the
    # newest occurrences of a common n-gram are the siblings', never hides the row's own text)
    own: dict[tuple[int, ...], int] | None = None


@dataclass
class NgramIndex:
    """n-grams (``min_n .. max_n`` tokens) -> their latest ``max_occurrences`` ends, incrementally.

    An n-gram is indexed when the token after it exists (``extend`` indexes the n-grams ending just
    before each new token), so a lookup of a document's own suffix finds only earlier occurrences,
    each with a continuation of at least one token.
    """

    min_n: int
    max_n: int
    max_occurrences: int = 4
    documents: list[Document] = field(default_factory=list)
    table: dict[tuple[int, ...], list[Occurrence]] = field(default_factory=dict)

    def add_document(self, tokens: Sequence[int], source: str, owner: int = -1, own_table: bool = False) -> int:
        """A new document (indexed now); returns its id. ``tokens`` is copied unless it is a list
        that the caller keeps appending to (then :meth:`catch_up` indexes the new tokens).
        ``own_table``: also keep the document's own n-gram table (see :meth:`lookup`)."""
        doc = Document(tokens if isinstance(tokens, list) else list(tokens), source, owner=owner,
                       own={} if own_table else None)
        self.documents.append(doc)
        doc_id = len(self.documents) - 1
        self.catch_up(doc_id)
        return doc_id

    def catch_up(self, doc_id: int) -> None:
        """Index the n-grams that ended before tokens appended since the last call."""
        doc = self.documents[doc_id]
        tokens, table, cap, own = doc.tokens, self.table, self.max_occurrences, doc.own
        for end in range(max(doc.indexed, 1), len(tokens)):  # the token at `end` continues the n-gram
            for n in range(self.min_n, min(self.max_n, end) + 1):
                key = tuple(tokens[end - n:end])
                if own is not None:
                    own[key] = end
                occ = table.get(key)
                if occ is None:
                    table[key] = [(doc_id, end)]
                else:
                    occ.append((doc_id, end))
                    if len(occ) > cap:
                        del occ[0]
        doc.indexed = max(doc.indexed, len(tokens))

    def lookup(self, context: Sequence[int], allowed: Callable[[Occurrence], bool] | None = None,
               own_doc: int | None = None) -> tuple[list[Occurrence], int]:
        """The occurrences of the longest suffix of ``context`` (``max_n`` .. ``min_n`` tokens) that
        ``allowed`` keeps, newest last, and that suffix's length (0: no match). With ``own_doc`` (a
        document with an own table) its latest occurrence is always among them (last), whatever
        the shared table kept."""
        own = self.documents[own_doc].own if own_doc is not None else None
        for n in range(min(self.max_n, len(context)), self.min_n - 1, -1):
            key = tuple(context[len(context) - n:])
            occ = self.table.get(key, ())
            kept = [o for o in occ if o[0] != own_doc and (allowed is None or allowed(o))]
            if own is not None and key in own and (allowed is None or allowed((own_doc, own[key]))):
                kept.append((own_doc, own[key]))
            if kept:
                return kept, n
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
    the most recent occurrence's token); occurrences that continue differently drop out; the draft
    ends where none continues. Returns the draft and the id of the newest occurrence that agreed
    with all of it (the document the draft is attributed to).

    >>> idx = NgramIndex(1, 1)
    >>> _ = idx.add_document([5, 1, 2, 5, 1, 3, 5, 1, 2], "group")
    >>> occ, n = idx.lookup([5])
    >>> vote_draft(idx, occ, max_len=4)  # after 5: "1 2" twice, "1 3" once
    ([1, 2, 5, 1], 0)
    """
    live = list(occurrences)
    draft: list[int] = []
    docs = index.documents
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
    return draft, (live[-1][0] if live else (occurrences[-1][0] if occurrences else -1))
