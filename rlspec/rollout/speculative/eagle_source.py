"""Drafts from the EAGLE drafter (:class:`~rlspec.rollout.speculative.eagle.EagleDrafter`), as a draft source.

Per row the source keeps the *pending* pairs ``(x_{t+1}, h_t)`` -- tokens the target has
accepted with the target's true hidden states -- that the drafter has not seen yet (EAGLE's index
convention). A proposal first feeds them to the drafter (the last one is the root pair
``(x_L, h_{L-1})``), then grows the tree level by level
(:class:`~rlspec.rollout.speculative.draft_tree.TreeBuilder`), each node fed ``(its token, its
parent's predicted feature)``. Drafter cache columns: prefix pairs ``0 .. L-1`` (the root pair at
column ``L-1``), tree node ``c`` (creation order) at ``L + c``.

**Frequency-ranked draft vocabulary** (FR-Spec, arXiv 2502.14856): on a real vocabulary the
drafter's LM head is most of a draft step's cost (SmolLM2-135M: 49k x 576, ~21% of the target's
weights, read for every drafted token). With ``vocab_subset`` (the most frequent token ids of the
rollouts so far) the drafter scores only those rows of the head; drafts are therefore always in
the subset. Verification is unchanged and stays lossless: point-mass drafts may be any tokens,
and a sampled chain's ``q`` is the subset distribution scattered into the full vocabulary (zero
elsewhere), which speculative sampling accepts as any other ``q``.
"""

from __future__ import annotations

from typing import ContextManager

import torch

from rlspec.rollout.base import SamplingParams
from rlspec.rollout.speculative.draft_tree import ArmShape, TreeBuilder, tree_attention_mask
from rlspec.rollout.speculative.eagle import EagleDrafter
from rlspec.rollout.speculative.sources import Draft
from rlspec.rollout.speculative.verification import target_probs


class EagleDraftSource:
    """:class:`~rlspec.rollout.speculative.sources.DraftSource` backed by an EAGLE drafter."""

    needs_hidden_states = True
    name = "eagle"

    def __init__(self, drafter: EagleDrafter, device: torch.device, vocab_subset: torch.Tensor | None = None) -> None:
        self.drafter = drafter
        self.device = device
        self.subset = vocab_subset.to(device) if vocab_subset is not None else None  # [K] token ids
        self._subset_head: tuple[int, torch.Tensor] | None = None  # (drafter version, lm_head rows [K, H])
        self._subset_bias: torch.Tensor | None = None
        self.pending_tokens: list[list[int]] = []  # per row: x_{t+1} of the pairs not yet in the drafter cache
        self.pending_hidden: list[torch.Tensor] = []  # per row: [len, H] the matching h_t
        self.drafter_len: list[int] = []  # per row: drafter cache columns holding final pairs

    def holding(self) -> ContextManager:
        return self.drafter.lock  # a background drafter trainer publishes whole weight sets only

    def start(self, sequences: list[list[int]], states: list[torch.Tensor] | None, num_slots: int,
              max_len: int) -> None:
        assert states is not None
        self.pending_tokens = [s[1:] for s in sequences]  # x_1 .. x_{L_i}
        self.pending_hidden = list(states)  # h_0 .. h_{L_i-1}
        self.drafter_len = [0] * len(sequences)
        self.drafter.begin(num_slots, max_len)

    def accept(self, tokens: list[list[int]], hidden: list[torch.Tensor], cached: list[int]) -> None:
        self.pending_tokens = [list(t) for t in tokens]  # x_{L_i+1} .. x_{L_i+a+1}
        self.pending_hidden = list(hidden)  # h_{L_i} .. h_{L_i+a}
        self.drafter_len = list(cached)  # columns 0 .. L_i-1 hold final pairs (root pair at L_i-1)

    def observe_plain(self, tokens: torch.Tensor, hidden: torch.Tensor | None) -> None:
        """Every row fed its last token ``x_L`` (state ``h_L``) and sampled ``tokens[i]`` =
        ``x_{L+1}``: queue the pair ``(x_{L+1}, h_L)``."""
        assert hidden is not None
        for i, token in enumerate(tokens.tolist()):
            self.pending_tokens[i] = list(self.pending_tokens[i]) + [int(token)]
            self.pending_hidden[i] = torch.cat([self.pending_hidden[i], hidden[i : i + 1].to(self.pending_hidden[i].dtype)])

    def remove(self, done: list[int], order: list[int]) -> None:
        self.drafter.remove(done)
        self.pending_tokens = [self.pending_tokens[i] for i in order]
        self.pending_hidden = [self.pending_hidden[i] for i in order]
        self.drafter_len = [self.drafter_len[i] for i in order]

    def end(self) -> None:
        self.drafter.end()

    # ------------------------------------------------------------------ drafting
    def propose(self, arm: ArmShape, lens: torch.Tensor, params: SamplingParams,
                generator: torch.Generator | None) -> Draft:
        root_feat = self._extend_pending()  # [n, H] drafter output at the root pair
        return self._draft(arm, lens, root_feat, params, generator)

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
        dtype = self.drafter.fc.weight.dtype
        out = self.drafter.step(ids, feats.to(dtype), pos, mask.view(n, 1, q, kv_len), kv_len)
        last = torch.tensor([c - 1 for c in counts], device=self.device)
        self.drafter_len = [s + c for s, c in zip(self.drafter_len, counts)]
        return out[torch.arange(n, device=self.device), last]  # [n, H]

    def _draft(self, arm: ArmShape, lens_t: torch.Tensor, root_feat: torch.Tensor, p: SamplingParams,
               generator: torch.Generator | None) -> Draft:
        """Grow the draft tree (a sampled chain keeps the drafter's distributions ``q``)."""
        n = lens_t.shape[0]
        builder = TreeBuilder.from_arm(arm, n, self.device)
        sampled_chain = arm.topk == 1 and not p.greedy
        # predicted features: index 0 = root, 1 + c = tree node c (creation order)
        table = root_feat.new_zeros(n, arm.max_nodes + 1, root_feat.shape[-1])  # [n, 1 + C_max, H]
        table[:, 0] = root_feat
        qs: list[torch.Tensor] = []
        feats = root_feat.unsqueeze(1)  # [n, 1, H]: features whose logits expand the frontier
        rows = torch.arange(n, device=self.device)[:, None]
        while True:
            logits = self._logits(feats)  # [n, F, V] (or [n, F, K] over the subset)
            if sampled_chain:
                q = target_probs(logits[:, 0], p.temperature, p.top_p, p.top_k)  # [n, V or K]
                tok = torch.multinomial(q, 1, generator=generator)  # [n, 1]
                logp = q.gather(-1, tok).clamp(min=1e-30).log().clamp(max=0.0)
                if self.subset is not None:  # back to vocabulary ids; q is zero outside the subset
                    q = q.new_zeros(n, self.drafter.lm_head.weight.shape[0]).index_copy_(1, self.subset, q)
                    tok = self.subset[tok]
                qs.append(q)
                builder.expand(tok.view(n, 1, 1), logp.view(n, 1, 1))
            else:
                top = torch.log_softmax(logits, dim=-1).topk(arm.topk, dim=-1)
                ids = self.subset[top.indices] if self.subset is not None else top.indices
                builder.expand(ids, top.values.clamp(max=0.0))
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
        chain_q = torch.stack(qs, dim=1) if sampled_chain else None  # [n, K, V]
        return Draft(builder.finalize(), chain_q)

    def _logits(self, feats: torch.Tensor) -> torch.Tensor:
        """The drafter's logits over the whole vocabulary, or over ``subset`` only (FR-Spec)."""
        if self.subset is None:
            return self.drafter.logits(feats).float()
        version = getattr(self.drafter, "version", 0)
        if self._subset_head is None or self._subset_head[0] != version:
            self._subset_head = (version, self.drafter.lm_head.weight.detach()[self.subset].contiguous())
            bias = getattr(self.drafter.lm_head, "bias", None)
            self._subset_bias = None if bias is None else bias.detach()[self.subset]
        head = self._subset_head[1]
        return torch.nn.functional.linear(feats.to(head.dtype), head, self._subset_bias).float()  # [n, F, K]
