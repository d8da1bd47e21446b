"""Earlier steps' responses, by prompt, in a bounded memory: the *history* draft source's store.

SPEC-RL (arXiv 2509.23232) and RhymeRL's HistoSpec (arXiv 2508.18588) draft a prompt's response
from the responses it got in earlier epochs: once training has removed the redundancy inside an
answer, the answers to the same prompt still predict it almost entirely (``docs/decisions.md``).
rlspec stays lossless: a stale history only costs acceptance, never correctness.

:class:`DraftHistory` keeps the newest ``per_prompt`` responses of each prompt (each stored with the
prompt's last ``context`` tokens in front, so a response's first tokens can match too), evicts the
least recently used prompts beyond ``max_bytes`` (4 bytes per stored token), and round-trips
through :meth:`state_dict` (newest prompts first, up to a byte budget) for checkpoints.

>>> h = DraftHistory(max_bytes=1000, per_prompt=2, context=2)
>>> h.add([7, 8, 9], [1, 2, 3]); h.add([7, 8, 9], [1, 2, 4]); h.add([7, 8, 9], [5])
>>> [list(r) for r in h.responses([7, 8, 9])], h.nbytes
([[8, 9, 1, 2, 4], [8, 9, 5]], 32)
"""

from __future__ import annotations

from array import array
from collections import OrderedDict
from pathlib import Path
from typing import Any, Sequence

import torch

TOKEN_BYTES = 4  # stored as array("i")


class DraftHistory:
    def __init__(self, max_bytes: int, per_prompt: int = 4, context: int = 4) -> None:
        if max_bytes < 0 or per_prompt < 1 or context < 0:
            raise ValueError(f"DraftHistory needs max_bytes >= 0, per_prompt >= 1, context >= 0; got "
                             f"{max_bytes}, {per_prompt}, {context}")
        self.max_bytes, self.per_prompt, self.context = int(max_bytes), per_prompt, context
        self._by_prompt: OrderedDict[tuple[int, ...], list[array]] = OrderedDict()  # oldest used first
        self.nbytes = 0
        self.version = 0  # bumped by every change (cached indices compare it)

    def __len__(self) -> int:
        return len(self._by_prompt)

    def responses(self, prompt: Sequence[int]) -> list[array]:
        """The stored responses of ``prompt`` (oldest first); marks the prompt recently used."""
        key = tuple(prompt)
        found = self._by_prompt.get(key)
        if found is None:
            return []
        self._by_prompt.move_to_end(key)
        return found

    def add(self, prompt: Sequence[int], response: Sequence[int]) -> None:
        """Remember ``response`` to ``prompt`` (dropping its oldest beyond ``per_prompt`` and the least
        recently used prompts beyond ``max_bytes``)."""
        if not response or self.max_bytes == 0:
            return
        key = tuple(prompt)
        doc = array("i", key[len(key) - self.context:] if self.context else ())
        doc.extend(response)
        size = len(doc) * TOKEN_BYTES
        if size > self.max_bytes:
            return
        kept = self._by_prompt.setdefault(key, [])
        self._by_prompt.move_to_end(key)
        kept.append(doc)
        self.nbytes += size
        while len(kept) > self.per_prompt:
            self.nbytes -= len(kept.pop(0)) * TOKEN_BYTES
        while self.nbytes > self.max_bytes:
            old_key, old = next(iter(self._by_prompt.items()))
            self.nbytes -= len(old.pop(0)) * TOKEN_BYTES
            if not old:
                del self._by_prompt[old_key]
        self.version += 1

    # ------------------------------------------------------------------ checkpoints
    def state_dict(self, max_bytes: int | None = None) -> dict[str, Any]:
        """The stored responses, most recently used prompts first, up to ``max_bytes`` (None: all),
        as flat tensors (fast to save): ``tokens`` (prompts and responses back to back), ``lengths``
        and ``counts`` (responses per prompt)."""
        budget = self.nbytes if max_bytes is None else int(max_bytes)
        parts: list[array] = []
        lengths: list[int] = []
        counts: list[int] = []
        used = 0
        for key, docs in reversed(self._by_prompt.items()):
            size = sum(len(d) for d in docs) * TOKEN_BYTES
            if used + size > budget:
                break
            parts.append(array("i", key))
            lengths.append(len(key))
            parts.extend(docs)
            lengths.extend(len(d) for d in docs)
            counts.append(len(docs))
            used += size
        flat = array("i")
        for part in parts:
            flat.extend(part)
        return {"version": 2, "context": self.context, "tokens": torch.frombuffer(flat, dtype=torch.int32).clone()
                if flat else torch.zeros(0, dtype=torch.int32), "lengths": torch.tensor(lengths, dtype=torch.long),
                "counts": torch.tensor(counts, dtype=torch.long)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore :meth:`state_dict`'s output (replacing what is stored; the bounds stay this object's)."""
        if state.get("version") != 2 or "tokens" not in state:
            raise ValueError("not a DraftHistory state (expected version 2 with 'tokens', 'lengths', 'counts')")
        flat = state["tokens"].tolist()
        pieces, offset = [], 0
        for n in state["lengths"].tolist():
            pieces.append(flat[offset:offset + n])
            offset += n
        prompts, k = [], 0
        for count in state["counts"].tolist():
            prompts.append((pieces[k], pieces[k + 1:k + 1 + count]))
            k += 1 + count
        self._by_prompt.clear()
        self.nbytes = 0
        for prompt, docs in reversed(prompts):  # oldest first, so LRU order is kept
            kept = self._by_prompt.setdefault(tuple(prompt), [])
            for d in docs[-self.per_prompt:]:
                kept.append(array("i", d))
                self.nbytes += len(d) * TOKEN_BYTES
        while self.nbytes > self.max_bytes and self._by_prompt:
            _, old = self._by_prompt.popitem(last=False)
            self.nbytes -= sum(len(d) for d in old) * TOKEN_BYTES
        self.version += 1

    def prompts_newest_first(self) -> list[tuple[int, ...]]:
        """The stored prompts, most recently used first."""
        return list(reversed(self._by_prompt))


class HistoryCheckpoint:
    """The history as a checkpoint part (``draft_history.pt``): a resumed run drafts from the same
    earlier responses, so its acceptance length continues where it was. At most ``max_bytes`` of
    it (the most recently used prompts) are saved."""

    FILE = "draft_history.pt"

    def __init__(self, history: DraftHistory, max_bytes: int) -> None:
        self.history, self.max_bytes = history, int(max_bytes)

    def save(self, checkpoint: Path) -> None:
        torch.save(self.history.state_dict(self.max_bytes), checkpoint / self.FILE)

    def load(self, checkpoint: Path) -> None:
        path = checkpoint / self.FILE
        if path.is_file():  # a checkpoint from before the history existed has none: start empty
            self.history.load_state_dict(torch.load(path, map_location="cpu", weights_only=True))
