"""The backend protocol of the native engine, and its generic path for any HF causal LM.

A backend owns the model forward and the KV cache of the engine's active rows ``0 .. n-1``:
``begin / can_admit / prefill / decode / remove / end``. :class:`HFGenericBackend` runs the HF
forward with a ``DynamicCache``; the fast path for Llama-family models is
:class:`rlspec.rollout.fast_backend.LlamaFastBackend`.
"""

from __future__ import annotations

import inspect
from typing import Protocol

import torch


class Backend(Protocol):
    """Model half of the engine. It holds the KV cache of the active rows ``0 .. n-1``."""

    name: str

    def begin(self, num_slots: int, max_len: int) -> None:
        """Start a generate call: at most ``num_slots`` rows of at most ``max_len`` tokens."""

    def can_admit(self, num_active: int) -> bool:
        """Whether new prompts can join a batch that has ``num_active`` rows now."""

    def prefill(self, prompts: list[list[int]], want_hidden: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Append the prompts as new rows; return their next-token logits ``[k, V]`` (and hidden)."""

    def decode(self, tokens: torch.Tensor, want_hidden: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Feed one token per active row (``[n]``); return next-token logits ``[n, V]``."""

    def remove(self, rows: list[int]) -> list[int]:
        """Drop the given rows. Returns ``order``: new row ``i`` is the old row ``order[i]``."""

    def end(self) -> None:
        """Finish the generate call (drop per-call state)."""


# --------------------------------------------------------------------------------- generic path


class HFGenericBackend:
    """Any HF causal LM: its own forward with a ``DynamicCache``, left padding, compaction.

    New prompts join a running batch by left-padding the shorter of the two caches and
    concatenating them (only for caches made of plain full-attention ``DynamicLayer``s; other
    cache kinds admit new prompts only when the batch is empty). Leading columns that no remaining
    row attends to are trimmed after rows are removed.
    """

    name = "generic"

    def __init__(self, model, pad_token_id: int = 0) -> None:
        self.model = model
        self.pad_token_id = pad_token_id
        params = inspect.signature(model.forward).parameters
        self._takes_positions = "position_ids" in params
        self._takes_keep = "logits_to_keep" in params
        self.device = next(model.parameters()).device

    def supports_length(self, max_len: int) -> bool:
        return True

    def begin(self, num_slots: int, max_len: int) -> None:
        self.cache = None
        self.mask: torch.Tensor | None = None  # [n, T] 1 = real token
        self.next_pos = torch.zeros(0, dtype=torch.long, device=self.device)
        self.n = 0
        self._mergeable = True

    def can_admit(self, num_active: int) -> bool:
        return num_active == 0 or self._mergeable

    def _call(self, ids, mask, positions, cache, want_hidden, keep_last):
        from transformers import DynamicCache

        if cache is None:
            cache = DynamicCache(config=self.model.config)
        kwargs = dict(input_ids=ids, attention_mask=mask, past_key_values=cache, use_cache=True)
        if self._takes_positions:
            kwargs["position_ids"] = positions
        if self._takes_keep and keep_last:
            kwargs["logits_to_keep"] = 1
        if want_hidden:
            kwargs["output_hidden_states"] = True
        out = self.model(**kwargs)
        hidden = out.hidden_states[-1][:, -1] if want_hidden else None
        return out.logits[:, -1], hidden, out.past_key_values

    def prefill(self, prompts: list[list[int]], want_hidden: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
        k = len(prompts)
        q_len = max(len(p) for p in prompts)
        ids = torch.full((k, q_len), self.pad_token_id, dtype=torch.long)
        mask = torch.zeros((k, q_len), dtype=torch.long)
        for i, p in enumerate(prompts):
            ids[i, q_len - len(p) :] = torch.tensor(p, dtype=torch.long)
            mask[i, q_len - len(p) :] = 1
        ids, mask = ids.to(self.device), mask.to(self.device)
        positions = (mask.cumsum(-1) - 1).clamp_min(0)
        logits, hidden, cache = self._call(ids, mask, positions, None, want_hidden, keep_last=True)
        lens = torch.tensor([len(p) for p in prompts], dtype=torch.long, device=self.device)
        if self.n == 0:
            self.cache, self.mask, self.next_pos = cache, mask, lens
            self._mergeable = self._plain_layers(cache)
        else:
            self._merge(cache, mask)
            self.next_pos = torch.cat([self.next_pos, lens])
        self.n += k
        return logits, hidden

    @staticmethod
    def _plain_layers(cache) -> bool:
        from transformers.cache_utils import DynamicLayer

        layers = getattr(cache, "layers", None)
        return bool(layers) and all(type(layer) is DynamicLayer for layer in layers)

    def _merge(self, cache, mask: torch.Tensor) -> None:
        old_t, new_t = self.mask.shape[1], mask.shape[1]
        width = max(old_t, new_t)

        def pad_left(x: torch.Tensor, t: int, dim: int) -> torch.Tensor:
            if t == width:
                return x
            shape = list(x.shape)
            shape[dim] = width - t
            return torch.cat([x.new_zeros(shape), x], dim=dim)

        for old, new in zip(self.cache.layers, cache.layers):
            old.keys = torch.cat([pad_left(old.keys, old_t, 2), pad_left(new.keys, new_t, 2)])
            old.values = torch.cat([pad_left(old.values, old_t, 2), pad_left(new.values, new_t, 2)])
        self.mask = torch.cat([pad_left(self.mask, old_t, 1), pad_left(mask, new_t, 1)])

    def decode(self, tokens: torch.Tensor, want_hidden: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
        mask = torch.cat([self.mask, self.mask.new_ones((self.n, 1))], dim=1)
        logits, hidden, self.cache = self._call(
            tokens.view(-1, 1), mask, self.next_pos.view(-1, 1), self.cache, want_hidden, keep_last=False
        )
        self.mask = mask
        self.next_pos = self.next_pos + 1
        return logits, hidden

    def remove(self, rows: list[int]) -> list[int]:
        gone = set(rows)
        order = [i for i in range(self.n) if i not in gone]
        self.n = len(order)
        if not order:
            self.cache, self.mask = None, None
            self.next_pos = self.next_pos[:0]
            return order
        keep = torch.tensor(order, dtype=torch.long, device=self.device)
        self.cache.batch_select_indices(keep)
        self.mask = self.mask[keep]
        self.next_pos = self.next_pos[keep]
        if self._mergeable:  # trim columns that no remaining row attends to
            first = int(self.mask.any(0).nonzero()[0])
            if first > 0:
                self.mask = self.mask[:, first:]
                for layer in self.cache.layers:
                    layer.keys = layer.keys[:, :, first:]
                    layer.values = layer.values[:, :, first:]
        return order

    def end(self) -> None:
        self.cache, self.mask, self.n = None, None, 0
