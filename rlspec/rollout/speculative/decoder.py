"""One speculative step for the native engine's active rows: draft, verify, commit (TLT, arXiv 2511.16665).

Infrastructure only: this module moves tokens, hidden states and cache columns between the
target's :class:`~rlspec.rollout.fast_backend.LlamaFastBackend`, a draft source
(:mod:`~rlspec.rollout.speculative.sources`) and the pure functions of
:mod:`~rlspec.rollout.speculative.verification` (lossless verification) and
:mod:`~rlspec.rollout.speculative.bandit` (draft shape per batch size). It owns no maths.

One step for the ``n`` active rows (row ``i`` has ``L_i`` tokens in the target cache and its last
sampled token ``x_{L_i}`` not yet in it -- the engine's ``cur``):

1. **draft** -- the source proposes a tree (or chain) of shape ``arm`` after every row;
2. **verify** -- one target forward over ``[x_{L_i}, node_0 .. node_{M-1}]`` at positions
   ``L_i + depth`` and cache columns ``L_i + 1 + j`` with the tree attention mask; the target's
   processed next-token distributions go to :func:`~rlspec.rollout.speculative.verification.verify_tree`
   (point-mass drafts) or, for a sampled chain, :func:`~rlspec.rollout.speculative.verification.verify_chain`
   with the drafter's distributions. Both are exactly distribution-preserving.
3. **commit** -- the accepted path's cache columns are moved next to the root (``L_i + 1 + k``),
   the row's length becomes ``L_i + 1 + a_i``, and the source learns the accepted tokens with their
   true hidden states. Log-probs and hidden states returned for the emitted tokens are the
   target's (the query whose output predicted each token).

When to speculate is decided by :class:`~rlspec.rollout.speculative.controller.LongTailController`.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any, Callable

import torch

from rlspec.rollout.base import SamplingParams
from rlspec.rollout.sampling import token_logprobs
from rlspec.rollout.speculative.bandit import DraftShapeBandit, step_reward
from rlspec.rollout.speculative.draft_tree import ArmShape, tree_attention_mask
from rlspec.rollout.speculative.sources import Draft, DraftSource
from rlspec.rollout.speculative.verification import target_probs, verify_chain, verify_chain_coupled, verify_tree

Emitted = tuple[list[int], list[float], torch.Tensor, torch.Tensor]


@dataclass
class SpecStats:
    """Per-call counters (merged into the engine's ``RolloutResult.stats``)."""

    sd_steps: int = 0
    plain_steps: int = 0
    sd_tokens: int = 0  # tokens emitted by speculative steps
    sd_row_steps: int = 0  # sum over SD steps of active rows (for the mean acceptance length)
    sd_seconds: float = 0.0
    plain_seconds: float = 0.0
    plain_tokens: int = 0
    switch_seconds: float = 0.0  # building the drafter state at the switch (and at re-entries)
    arms: dict[str, int] = field(default_factory=dict)
    reverted: int = 0  # 1 when the adaptive engine found SD slower and went back to plain decoding
    reentered: int = 0  # times SD was probed again after a revert, in a smaller batch-size bucket
    draft_seconds: float = 0.0  # proposing drafts (lookups, drafter forwards)
    verify_seconds: float = 0.0  # the target's verify forward, rejection sampling and commit
    # per draft source: [rows that got a draft, drafted tokens, accepted tokens]
    sources: dict[str, list[int]] = field(default_factory=dict)

    def count_source(self, source: str, drafted: int, accepted: int) -> None:
        c = self.sources.setdefault(source, [0, 0, 0])
        c[0] += 1
        c[1] += drafted
        c[2] += accepted

    def as_stats(self) -> dict[str, float]:
        steps = self.sd_steps + self.plain_steps
        out = {
            "spec/sd_steps": float(self.sd_steps),
            "spec/frac_steps_sd": self.sd_steps / steps if steps else 0.0,
            "spec/accept_length": self.sd_tokens / self.sd_row_steps if self.sd_row_steps else 0.0,
            "spec/tokens_per_s_sd": self.sd_tokens / self.sd_seconds if self.sd_seconds > 0 else 0.0,
            "spec/tokens_per_s_plain": self.plain_tokens / self.plain_seconds if self.plain_seconds > 0 else 0.0,
            "spec/switch_seconds": self.switch_seconds,
            "spec/reverted": float(self.reverted),
            "spec/reentered": float(self.reentered),
        }
        out["spec/draft_seconds"] = self.draft_seconds
        out["spec/verify_seconds"] = self.verify_seconds
        for arm, count in self.arms.items():
            out[f"spec/arm/{arm}"] = float(count)
        for source, (rows, drafted, accepted) in self.sources.items():
            out[f"spec/{source}/drafted"] = float(drafted)
            out[f"spec/{source}/accepted"] = float(accepted)
            out[f"spec/{source}/rows"] = float(rows)
            # tokens per target step of the rows this source drafted for (accepted drafts + the target's token)
            out[f"spec/{source}/accept_length"] = (accepted + rows) / rows if rows else 0.0
        return out


class SpeculativeDecoder:
    """Drives speculative steps for the active rows of one ``generate`` call (see module doc)."""

    def __init__(self, backend: Any, source: DraftSource, params: SamplingParams, bandit: DraftShapeBandit,
                 generator: torch.Generator | None,
                 uniforms: Callable[[int], torch.Tensor] | None = None) -> None:
        self.backend, self.source, self.params, self.bandit, self.generator = backend, source, params, bandit, generator
        self.device = backend.device
        # point-mass chains (lookups) are verified coupled with plain sampling when the call draws
        # per-position numbers: uniforms(width) gives the active rows' [n, width] numbers at their
        # next `width` positions, and the step emits what plain decoding would
        self.uniforms = uniforms

    @staticmethod
    def cache_slack(bandit: DraftShapeBandit) -> int:
        """Extra cache columns a speculative step may write past a row's length (the largest tree)."""
        return max(arm.max_nodes for arm in bandit.all_arms()) + 2

    # ------------------------------------------------------------------ switch
    def start(self, sequences: list[list[int]], states: list[torch.Tensor] | None = None) -> None:
        """Begin speculating for rows whose tokens so far are ``sequences[i]`` (prompt + response,
        the last of which is the engine's ``cur[i]``, not yet in the target cache).

        ``states[i]`` (``[L_i, H]``), when the engine kept them, are the target's hidden states
        ``h_0 .. h_{L_i-1}`` of the cached tokens; a source that needs them and got none makes the
        target re-run the prefixes once (TLT's way).
        """
        cached = [s[:-1] for s in sequences]  # what the target cache holds: L_i tokens
        if self.source.needs_hidden_states and states is None:
            n, width = len(cached), max(len(c) for c in cached)
            ids = torch.full((n, width), int(self.backend.pad_token_id), dtype=torch.long)
            for i, c in enumerate(cached):
                ids[i, : len(c)] = torch.tensor(c, dtype=torch.long)
            # the target re-runs the prefixes (rewriting the same cache columns) for h_0 .. h_{L_i-1}
            hidden = self.backend.forward(ids.to(self.device), None, slice(0, n), None, width)  # [n, W, H]
            states = [hidden[i, : len(c)] for i, c in enumerate(cached)]
        if states is not None:
            bad = [i for i, (c, h) in enumerate(zip(cached, states)) if h.shape[0] != len(c)]
            if bad:
                raise RuntimeError(f"speculative switch: row {bad[0]} has {states[bad[0]].shape[0]} hidden states "
                                   f"for {len(cached[bad[0]])} cached tokens")
        self.source.start(sequences, states, self.backend.num_slots, self.backend.max_len)

    def abandon(self) -> None:
        """Stop speculating (the engine decodes plainly from here): the target cache is already
        consistent after :meth:`commit`; only the source's state is dropped."""
        self.source.end()

    def observe_plain_step(self, tokens: torch.Tensor, hidden: torch.Tensor | None) -> None:
        """A plain decode step ran between speculative steps (the adaptive engine's probe)."""
        self.source.observe_plain(tokens, hidden)

    def remove(self, done: list[int], order: list[int]) -> None:
        self.source.remove(done, order)

    # ------------------------------------------------------------------ one step
    def step(self, cur: torch.Tensor, stats: SpecStats, arm: ArmShape | None = None, draft: Draft | None = None,
             row_sources: list[str | None] | None = None) -> list[Emitted]:
        """One draft + verify step. Returns, per row, ``(emitted tokens, their log-probs (k floats),
        the target hidden states that produced them [k, H], the row's last hidden state [H])``.

        ``arm`` None: the bandit picks the draft shape and learns from the step; else the caller
        chose it (and may pass the ``draft`` it already proposed, with the source of each row's
        draft for the per-source counters; default: the source's name for every row).
        The caller appends the tokens (stopping at EOS / stop strings / the length cap) and then
        calls :meth:`commit` with how many it kept per row.
        """
        with self.source.holding():
            return self._step(cur, stats, arm, draft, row_sources)

    def _step(self, cur: torch.Tensor, stats: SpecStats, arm: ArmShape | None, draft: Draft | None,
              row_sources: list[str | None] | None) -> list[Emitted]:
        t0 = time.perf_counter()
        n = cur.shape[0]
        learn = arm is None
        if arm is None:
            arm = self.bandit.select(n)
        lens = list(self.backend.lens)  # L_i
        lens_t = torch.tensor(lens, dtype=torch.long, device=self.device)
        if draft is None:
            draft = self.source.propose(arm, lens_t, self.params, self.generator)
        t_drafted = time.perf_counter()
        tree = draft.tree
        tokens, parents = tree.tokens, tree.parents  # [n, M]
        m = tokens.shape[1]
        # verify: target forward over [cur, node_0 .. node_{M-1}]
        q_ids = torch.cat([cur.view(n, 1), tokens], dim=1)  # [n, M+1]
        depth = torch.cat([torch.zeros(n, 1, dtype=torch.long, device=self.device), tree.depth], dim=1)  # [n, M+1]
        positions = lens_t[:, None] + depth  # [n, M+1]
        cols = lens_t[:, None] + torch.arange(m + 1, device=self.device)  # [n, M+1]
        kv_len = int(max(lens)) + m + 1
        col_ids = torch.arange(kv_len, device=self.device)
        mask = (col_ids[None, None, :] < lens_t[:, None, None]).expand(n, m + 1, kv_len).clone()  # prefix
        if draft.is_chain:  # a chain: each node sees the root and the nodes before it
            anc = torch.ones(m + 1, m + 1, dtype=torch.bool, device=self.device).tril().expand(n, m + 1, m + 1)
        else:
            anc = tree_attention_mask(parents, include_root=True)  # [n, M+1, M+1]
        mask.scatter_(2, cols[:, None, :].expand(n, m + 1, m + 1), anc)
        hidden = self.backend.forward(q_ids, positions, slice(0, n), mask.view(n, 1, m + 1, kv_len), kv_len,
                                      cache_cols=cols)  # [n, M+1, H]
        logits = self.backend.logits(hidden).float()  # [n, M+1, V]
        p = self.params
        probs = target_probs(logits, p.temperature, p.top_p, p.top_k)  # [n, M+1, V]
        if draft.chain_q is not None:  # sampled chain: textbook speculative sampling with the drafter's q
            res = verify_chain(tokens, draft.chain_q, probs, self.generator)
            num = res.num_accepted
            path = torch.arange(m, device=self.device).expand(n, m)
        elif draft.is_chain:  # point-mass chains (lookups): the chain verifier is the tree one for a chain
            limit = draft.valid.sum(dim=1) if draft.valid is not None else None
            if self.uniforms is not None:
                res = verify_chain_coupled(tokens, probs, self.uniforms(m + 1), num_drafts=limit)
            else:
                res = verify_chain(tokens, None, probs, self.generator, num_drafts=limit)
            num = res.num_accepted
            path = torch.arange(m, device=self.device).expand(n, m)
        else:
            res = verify_tree(tokens, parents, probs, self.generator, valid=draft.valid)
            num, path = res.num_accepted, res.accepted_path
        num_l = num.tolist()
        # the emitted tokens of every row at once: accepted drafts along the path, then the
        # correction/bonus token; emitted token j was predicted by query 0 (j = 0) or 1 + path[j-1]
        depth = path.shape[1]
        node = path.clamp(min=0)  # [n, D]
        emitted_t = torch.cat([tokens.gather(1, node), res.next_token.view(n, 1)], dim=1)  # [n, D+1]
        emitted_t.scatter_(1, num.view(n, 1), res.next_token.view(n, 1))  # the last emitted token of each row
        queries = torch.cat([torch.zeros(n, 1, dtype=torch.long, device=self.device), 1 + node], dim=1)  # [n, D+1]
        picked = logits.gather(1, queries[:, :, None].expand(n, depth + 1, logits.shape[-1]))  # [n, D+1, V]
        lps_all = token_logprobs(picked.view(n * (depth + 1), -1), emitted_t.view(-1), p.temperature).view(n, depth + 1)
        hid_all = hidden.gather(1, queries[:, :, None].expand(n, depth + 1, hidden.shape[-1]))  # [n, D+1, H]
        tok_rows, lp_rows = emitted_t.tolist(), lps_all.tolist()
        self._last = (tokens, path, num_l, hid_all, tok_rows, lens)
        out = []
        for i in range(n):
            a = num_l[i]
            out.append((tok_rows[i][: a + 1], lp_rows[i][: a + 1], hid_all[i, : a + 1], hid_all[i, a]))
        stats.sd_steps += 1
        stats.sd_row_steps += n
        name = str(arm)
        stats.arms[name] = stats.arms.get(name, 0) + 1
        now = time.perf_counter()
        elapsed = now - t0
        stats.sd_seconds += elapsed
        stats.draft_seconds += t_drafted - t0
        stats.verify_seconds += now - t_drafted
        drafted = draft.valid.sum(dim=1).tolist() if draft.valid is not None else [m] * n
        names = row_sources if row_sources is not None else [getattr(self.source, "name", "draft")] * n
        for i, name in enumerate(names):
            if name is not None:
                stats.count_source(name, int(drafted[i]), num_l[i])
        emitted_total = sum(a + 1 for a in num_l)
        stats.sd_tokens += emitted_total
        if learn:
            self.bandit.update(n, arm, step_reward(emitted_total / n, n, elapsed))
        return out

    def commit(self, kept: list[int]) -> None:
        """Move the accepted path into place and hand the source its new pairs (``kept[i]``
        emitted tokens of row ``i`` were appended; rows that finished are removed afterwards)."""
        tokens, path, num_l, hid_all, tok_rows, lens = self._last
        src_rows, src_cols, dst_cols = [], [], []
        new_lens, new_tokens, new_hidden = [], [], []
        keep_pairs = self.source.needs_hidden_states
        chain = bool(path.shape[1]) and bool((path == torch.arange(path.shape[1], device=path.device)).logical_or(
            path < 0).all())  # chains (and lookups) accept in place: no cache column moves
        path_rows = None if chain else path.tolist()
        for i in range(len(kept)):
            a = min(num_l[i], max(kept[i] - 1, 0))  # accepted drafts that were kept (the last kept is `cur`)
            if path_rows is not None:
                for k, j in enumerate(path_rows[i][:a]):
                    if j != k:
                        src_rows.append(i)
                        src_cols.append(lens[i] + 1 + j)
                        dst_cols.append(lens[i] + 1 + k)
            new_lens.append(lens[i] + 1 + a)
            # x_{L_i+1} .. x_{L_i+a} (accepted drafts), then x_{L_i+a+1} (the new root token), with
            # the target states h_{L_i} .. h_{L_i+a} that predicted them (only for sources that train)
            new_tokens.append(tok_rows[i][:a] + [tok_rows[i][num_l[i]]])
            if keep_pairs:
                new_hidden.append(hid_all[i, : a + 1])  # [a+1, H]
        self.source.accept(new_tokens, new_hidden, lens)
        if src_rows:
            self.backend.move_cache_columns(src_rows, src_cols, dst_cols)
        self.backend.set_lengths(new_lens)
