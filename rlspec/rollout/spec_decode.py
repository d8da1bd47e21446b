"""Lossless speculative decoding inside the native engine (TLT's long-tail switch, arXiv 2511.16665).

Infrastructure only: this module moves tokens, hidden states and cache columns between the
target's :class:`~rlspec.rollout.native.LlamaFastBackend`, the :class:`~rlspec.rollout.drafter.EagleDrafter`
and the pure functions of :mod:`rlspec.rollout.speculative` (draft tree construction and lossless
verification) and :mod:`rlspec.rollout.bandit` (draft shape per batch size). It owns no maths.

One speculative step for the ``n`` active rows (row ``i`` has ``L_i`` tokens in the target cache
and its last sampled token ``x_{L_i}`` not yet in it -- the engine's ``cur``):

1. **draft** -- the drafter first takes the row's *pending* pairs ``(x_{t+1}, h_t)`` with the
   target's true hidden states (the tokens accepted last step, then the root pair
   ``(x_{L_i}, h_{L_i-1})``), EAGLE's index convention; then the tree grows level by level
   (:class:`~rlspec.rollout.speculative.TreeBuilder`), each node fed ``(its token, its parent's
   predicted feature)``. Drafter cache columns: prefix pairs ``0 .. L_i-1`` (the root pair sits at
   column ``L_i-1``), tree node ``c`` (creation order) at ``L_i + c``.
2. **verify** -- one target forward over ``[x_{L_i}, node_0 .. node_{M-1}]`` at positions
   ``L_i + depth`` and cache columns ``L_i + 1 + j`` with the tree attention mask; the target's
   processed next-token distributions go to :func:`~rlspec.rollout.speculative.verify_tree`
   (point-mass drafts) or, for a sampled chain, :func:`~rlspec.rollout.speculative.verify_chain`
   with the drafter's distributions. Both are exactly distribution-preserving.
3. **commit** -- the accepted path's cache columns are moved next to the root (``L_i + 1 + k``),
   the row's length becomes ``L_i + 1 + a_i``, and the accepted tokens with their true hidden
   states become the drafter's next pending pairs. Log-probs and hidden states returned for the
   emitted tokens are the target's (the query whose output predicted each token).

The switch into this mode is the engine's (:class:`~rlspec.rollout.native.NativeEngine`): when
the number of unfinished rows has stayed at or below ``threshold`` for ``warmup_checks``
consecutive decode steps with no prompt waiting, the drafter's state for the tokens generated so
far is built from the target's hidden states of those tokens (kept from the rollout's own prefill
and decode steps on CPU or when the caller wants them; otherwise the target re-runs the rows'
prefixes once, as TLT's engine does) and every later step of that call is speculative. The
adaptive mode adds a probe: right after the switch SD and plain steps alternate
(:meth:`SpeculativeDecoder.observe_plain_step` keeps the drafter's pairs complete) until each has
``probe_steps`` throughput samples at the same batch size, and SD is dropped when it measured
slower; it is probed again once the batch has shrunk into a smaller batch-size bucket of the
bandit, where a draft step costs less relative to a plain one.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any, Mapping

import torch

from rlspec.errors import ConfigError
from rlspec.rollout.bandit import DraftShapeBandit, step_reward
from rlspec.rollout.base import SamplingParams
from rlspec.rollout.sampling import token_logprobs
from rlspec.rollout.speculative import ArmShape, TreeBuilder, target_probs, tree_attention_mask, verify_chain, verify_tree

SPEC_MODES = ("adaptive", "always")


@dataclass
class SpeculativeSettings:
    """``rollout.speculative.*`` as the engine uses them (validated by :mod:`rlspec.config`)."""

    mode: str = "adaptive"  # adaptive: long-tail switch; always: from the first decode step
    threshold: int = 32  # TLT bs_threshold: SD once unfinished rows <= threshold ...
    warmup_checks: int = 10  # ... for this many consecutive decode steps (hysteresis)
    # adaptive only: after the switch SD and plain steps alternate until each has this many
    # tokens/s samples (both measured at the same, shrinking batch size); if SD's median is lower it
    # is turned off and skipped in that batch-size bucket for 1, 2, 4, ... calls (so SD is never a
    # loss for long); once the batch shrinks into a smaller bucket later in the call, it is probed again
    probe_steps: int = 8
    bandit: Mapping[str, Any] = field(default_factory=dict)  # rlspec.rollout.bandit.BanditConfig keys

    def __post_init__(self) -> None:
        if self.mode not in SPEC_MODES:
            raise ConfigError(f"rollout.speculative.mode={self.mode!r} is not valid; choose one of: {', '.join(SPEC_MODES)}")
        if self.probe_steps < 1:
            raise ConfigError(f"rollout.speculative.probe_steps must be >= 1, got {self.probe_steps}")
        if self.threshold < 1 or self.warmup_checks < 0:
            raise ConfigError("rollout.speculative.threshold must be >= 1 and rollout.speculative.warmup_checks >= 0, "
                              f"got {self.threshold} and {self.warmup_checks}")


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
        for arm, count in self.arms.items():
            out[f"spec/arm/{arm}"] = float(count)
        return out


class SpeculativeDecoder:
    """Drives speculative steps for the active rows of one ``generate`` call (see module doc)."""

    def __init__(self, backend: Any, drafter: Any, params: SamplingParams, bandit: DraftShapeBandit,
                 generator: torch.Generator | None) -> None:
        self.backend, self.drafter, self.params, self.bandit, self.generator = backend, drafter, params, bandit, generator
        self.device = backend.device
        self.greedy = params.greedy
        self.pending_tokens: list[list[int]] = []  # per row: x_{t+1} of the pairs not yet in the drafter cache
        self.pending_hidden: list[torch.Tensor] = []  # per row: [len, H] the matching h_t
        self.drafter_len: list[int] = []  # per row: drafter cache columns holding final pairs

    @staticmethod
    def cache_slack(bandit: DraftShapeBandit) -> int:
        """Extra cache columns a speculative step may write past a row's length (the largest tree)."""
        arms = [arm for bucket in bandit.config.arms for arm in bucket] + list(bandit.config.fixed_arms or ())
        return max(ArmShape(*a).max_nodes for a in arms) + 2

    # ------------------------------------------------------------------ switch
    def start(self, sequences: list[list[int]], cur: torch.Tensor, states: list[torch.Tensor] | None = None) -> None:
        """Build the drafter's state for rows whose tokens so far are ``sequences[i]`` (prompt +
        response, the last of which is ``cur[i]``, not yet in the target cache).

        ``states[i]`` (``[L_i, H]``), when the engine kept them, are the target's hidden states
        ``h_0 .. h_{L_i-1}`` of the cached tokens; otherwise the target re-runs the prefixes.
        """
        n = len(sequences)
        cached = [s[:-1] for s in sequences]  # what the target cache holds: L_i tokens
        if states is None:
            width = max(len(c) for c in cached)
            ids = torch.full((n, width), int(self.backend.pad_token_id), dtype=torch.long)
            for i, c in enumerate(cached):
                ids[i, : len(c)] = torch.tensor(c, dtype=torch.long)
            # the target re-runs the prefixes (rewriting the same cache columns) for h_0 .. h_{L_i-1}
            hidden = self.backend.forward(ids.to(self.device), None, slice(0, n), None, width)  # [n, W, H]
            states = [hidden[i, : len(c)] for i, c in enumerate(cached)]
        bad = [i for i, (c, h) in enumerate(zip(cached, states)) if h.shape[0] != len(c)]
        if bad:
            raise RuntimeError(f"speculative switch: row {bad[0]} has {states[bad[0]].shape[0]} hidden states "
                               f"for {len(cached[bad[0]])} cached tokens")
        self.pending_tokens = [s[1:] for s in sequences]  # x_1 .. x_{L_i}
        self.pending_hidden = list(states)  # h_0 .. h_{L_i-1}
        self.drafter_len = [0] * n
        self.drafter.begin(self.backend.num_slots, self.backend.max_len)

    def abandon(self) -> None:
        """Stop speculating (the engine decodes plainly from here): the target cache is already
        consistent after :meth:`commit`; only the drafter's state is dropped."""
        self.drafter.end()

    def observe_plain_step(self, tokens: torch.Tensor, hidden: torch.Tensor) -> None:
        """A plain decode step ran between speculative steps (the adaptive engine's probe): every
        row fed its ``cur`` = ``x_L`` (hidden state ``h_L``) and sampled ``tokens[i]`` = ``x_{L+1}``;
        queue the pair ``(x_{L+1}, h_L)`` for the drafter (the target cache already holds ``x_L``)."""
        new = tokens.tolist()
        for i, token in enumerate(new):
            self.pending_tokens[i] = list(self.pending_tokens[i]) + [int(token)]
            self.pending_hidden[i] = torch.cat([self.pending_hidden[i], hidden[i : i + 1].to(self.pending_hidden[i].dtype)])

    def remove(self, done: list[int], order: list[int]) -> None:
        self.drafter.remove(done)
        self.pending_tokens = [self.pending_tokens[i] for i in order]
        self.pending_hidden = [self.pending_hidden[i] for i in order]
        self.drafter_len = [self.drafter_len[i] for i in order]

    # ------------------------------------------------------------------ one step
    def step(self, cur: torch.Tensor, stats: SpecStats) -> list[tuple[list[int], torch.Tensor, torch.Tensor, torch.Tensor]]:
        """One draft + verify step. Returns, per row, ``(emitted tokens, their log-probs [k],
        the target hidden states that produced them [k, H], the row's last hidden state [H])``.

        The caller appends the tokens (stopping at EOS / stop strings / the length cap) and then
        calls :meth:`commit` with how many it kept per row.
        """
        with self.drafter.lock:  # a background drafter trainer publishes whole weight sets only
            return self._step(cur, stats)

    def _step(self, cur: torch.Tensor, stats: SpecStats) -> list[tuple[list[int], torch.Tensor, torch.Tensor, torch.Tensor]]:
        t0 = time.perf_counter()
        n = cur.shape[0]
        arm = self.bandit.select(n)
        lens = list(self.backend.lens)  # L_i
        lens_t = torch.tensor(lens, dtype=torch.long, device=self.device)
        root_feat = self._extend_pending()  # [n, H] drafter output at the root pair
        tree, chain_q = self._draft(arm, lens_t, root_feat)
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
        anc = tree_attention_mask(parents, include_root=True)  # [n, M+1, M+1]
        mask.scatter_(2, cols[:, None, :].expand(n, m + 1, m + 1), anc)
        hidden = self.backend.forward(q_ids, positions, slice(0, n), mask.view(n, 1, m + 1, kv_len), kv_len,
                                      cache_cols=cols)  # [n, M+1, H]
        logits = self.backend.logits(hidden).float()  # [n, M+1, V]
        p = self.params
        probs = target_probs(logits, p.temperature, p.top_p, p.top_k)  # [n, M+1, V]
        if chain_q is not None:  # sampled chain: textbook speculative sampling with the drafter's q
            res = verify_chain(tokens, chain_q, probs, self.generator)
            num = res.num_accepted
            path = torch.arange(m, device=self.device).expand(n, m)
        else:
            res = verify_tree(tokens, parents, probs, self.generator)
            num, path = res.num_accepted, res.accepted_path
        num_l = num.tolist()
        out = []
        self._last = (tokens, path, num_l, hidden, lens, res.next_token.tolist())
        for i in range(n):
            a = num_l[i]
            nodes = path[i, :a].tolist()
            emitted = [int(tokens[i, j]) for j in nodes] + [int(res.next_token[i])]
            queries = [0] + [1 + j for j in nodes]  # the query whose output predicted each emitted token
            q_idx = torch.tensor(queries, device=self.device)
            lps = token_logprobs(logits[i, q_idx], torch.tensor(emitted, device=self.device), p.temperature)
            out.append((emitted, lps, hidden[i, q_idx], hidden[i, queries[-1]]))
        stats.sd_steps += 1
        stats.sd_row_steps += n
        name = f"{arm.depth}_{arm.topk}_{arm.num_verify}"
        stats.arms[name] = stats.arms.get(name, 0) + 1
        elapsed = time.perf_counter() - t0
        stats.sd_seconds += elapsed
        emitted_total = sum(a + 1 for a in num_l)
        stats.sd_tokens += emitted_total
        self.bandit.update(n, arm, step_reward(emitted_total / n, n, elapsed))
        return out

    def commit(self, kept: list[int]) -> None:
        """Move the accepted path into place and queue the drafter's next pairs (``kept[i]``
        emitted tokens of row ``i`` were appended; rows that finished are removed afterwards)."""
        tokens, path, num_l, hidden, lens, next_tokens = self._last
        n = len(kept)
        src_rows, src_cols, dst_cols = [], [], []
        new_lens = []
        for i in range(n):
            a = min(num_l[i], max(kept[i] - 1, 0))  # accepted drafts that were kept (the last kept is `cur`)
            nodes = path[i, :a].tolist()
            for k, j in enumerate(nodes):
                if j != k:
                    src_rows.append(i)
                    src_cols.append(lens[i] + 1 + j)
                    dst_cols.append(lens[i] + 1 + k)
            new_lens.append(lens[i] + 1 + a)
            # drafter pairs to add next step: (x_{t+1}, h_t) for the accepted drafts and the new root
            queries = [0] + [1 + j for j in nodes]
            # x_{L_i+1} .. x_{L_i+a} (accepted drafts), then x_{L_i+a+1} (the new root token)
            self.pending_tokens[i] = [int(tokens[i, j]) for j in nodes] + [int(next_tokens[i])]
            self.pending_hidden[i] = hidden[i, queries]  # [a+1, H]: h_{L_i} .. h_{L_i+a}
            self.drafter_len[i] = lens[i]  # columns 0 .. L_i-1 hold final pairs (root pair at L_i-1)
        if src_rows:
            self.backend.move_cache_columns(src_rows, src_cols, dst_cols)
        self.backend.set_lengths(new_lens)

    # ------------------------------------------------------------------ drafting
    def _extend_pending(self) -> torch.Tensor:
        """Feed every row's pending pairs to the drafter; return its output at each row's last pair."""
        n = len(self.pending_tokens)
        counts = [len(t) for t in self.pending_tokens]
        q = max(counts)
        hsz = self.pending_hidden[0].shape[-1]
        ids = torch.zeros(n, q, dtype=torch.long, device=self.device)
        feats = torch.zeros(n, q, hsz, dtype=self.pending_hidden[0].dtype, device=self.device)
        for i, (t, h) in enumerate(zip(self.pending_tokens, self.pending_hidden)):
            ids[i, : len(t)] = torch.tensor(t, dtype=torch.long, device=self.device)
            feats[i, : len(t)] = h
        start = torch.tensor(self.drafter_len, dtype=torch.long, device=self.device)  # [n]
        pos = start[:, None] + torch.arange(q, device=self.device)  # [n, Q]; pads land past the live region
        kv_len = int(pos.max()) + 1
        mask = torch.arange(kv_len, device=self.device)[None, None, :] <= pos[:, :, None]  # [n, Q, kv] causal
        out = self.drafter.step(ids, feats.to(self.drafter_dtype), pos, mask.view(n, 1, q, kv_len), kv_len)
        last = torch.tensor([c - 1 for c in counts], device=self.device)
        self.drafter_len = [s + c for s, c in zip(self.drafter_len, counts)]
        return out[torch.arange(n, device=self.device), last]  # [n, H]

    @property
    def drafter_dtype(self) -> torch.dtype:
        return self.drafter.fc.weight.dtype

    def _draft(self, arm: ArmShape, lens_t: torch.Tensor, root_feat: torch.Tensor):
        """Grow the draft tree; returns ``(DraftTree, q [n, K, V] for a sampled chain or None)``."""
        n = lens_t.shape[0]
        p = self.params
        builder = TreeBuilder.from_arm(arm, n, self.device)
        sampled_chain = arm.topk == 1 and not self.greedy
        # predicted features: index 0 = root, 1 + c = tree node c (creation order)
        table = root_feat.new_zeros(n, arm.max_nodes + 1, root_feat.shape[-1])  # [n, 1 + C_max, H]
        table[:, 0] = root_feat
        qs: list[torch.Tensor] = []
        feats = root_feat.unsqueeze(1)  # [n, 1, H]: features whose logits expand the frontier
        rows = torch.arange(n, device=self.device)[:, None]
        while True:
            logits = self.drafter.logits(feats).float()  # [n, F, V]
            if sampled_chain:
                q = target_probs(logits[:, 0], p.temperature, p.top_p, p.top_k)  # [n, V]
                tok = torch.multinomial(q, 1, generator=self.generator)  # [n, 1]
                qs.append(q)
                logp = q.gather(-1, tok).clamp(min=1e-30).log().clamp(max=0.0)
                builder.expand(tok.view(n, 1, 1), logp.view(n, 1, 1))
            else:
                top = torch.log_softmax(logits, dim=-1).topk(arm.topk, dim=-1)
                builder.expand(top.indices, top.values.clamp(max=0.0))
            if builder.done:
                break
            front = builder.frontier()  # [n, F] the new nodes to run the drafter on
            c_total = builder.tokens.shape[1]
            parent = builder.parents.gather(1, front.nodes)  # [n, F] (-1 = root)
            parent_feat = table[rows, parent + 1]  # [n, F, H]
            f = front.nodes.shape[1]
            positions = (lens_t - 1)[:, None] + front.depth  # [n, F]
            cols = lens_t[:, None] + front.nodes  # [n, F]
            kv_len = int(lens_t.max()) + c_total
            col_ids = torch.arange(kv_len, device=self.device)
            mask = (col_ids[None, None, :] < lens_t[:, None, None]).expand(n, f, kv_len).clone()  # prefix + root
            anc = tree_attention_mask(builder.parents)  # [n, C, C]
            anc_f = anc.gather(1, front.nodes[:, :, None].expand(n, f, c_total))  # [n, F, C]
            tree_cols = lens_t[:, None, None] + torch.arange(c_total, device=self.device)[None, None, :]
            mask.scatter_(2, tree_cols.expand(n, f, c_total), anc_f)
            feats = self.drafter.step(front.tokens, parent_feat, positions, mask.view(n, 1, f, kv_len), kv_len,
                                      cache_cols=cols)  # [n, F, H]
            table[rows, front.nodes + 1] = feats
        tree = builder.finalize()
        chain_q = torch.stack(qs, dim=1) if sampled_chain else None  # [n, K, V]
        return tree, chain_q
