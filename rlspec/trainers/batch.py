"""The data of a policy update: sampled groups, the flattened batch, and its micro-batches.

``B`` = responses in the batch, ``b`` = responses in a micro-batch, ``P`` / ``R`` = the longest
prompt / response of a micro-batch. Prompts are left-padded and responses right-padded, so
position ``P - 1 + j`` predicts response token ``j``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Iterator

import torch


@dataclass
class Group:
    """The n responses sampled for one prompt."""

    row_index: int
    prompt_ids: list[int]
    response_ids: list[list[int]]
    old_logprobs: list[torch.Tensor]
    finish_reasons: list[str]
    texts: list[str]
    rewards: list[float]
    correct: list[bool]
    per_term: dict[str, list[float]] = field(default_factory=dict)
    # budget-conditioned rollouts (HBPO prefill, L1 target): each response's own prompt and budget
    response_prompt_ids: list[list[int]] | None = None
    budgets: list[int] | None = None
    # rollouts packed with extra segments (AnytimeReasoner's summaries): per-token advantages, tree mask
    packed: list[Any] | None = None  # [n] rlspec.trainers.hooks.anytime.PackedRollout
    extras: dict[str, list[Any]] = field(default_factory=dict)  # [n] per-response values a rollout hook logs


@dataclass
class TrainBatch:
    """Flattened groups ready for the policy update. ``B`` = responses."""

    prompt_ids: list[list[int]]
    response_ids: list[list[int]]
    old_logprobs: list[torch.Tensor]
    rewards: torch.Tensor  # [B]
    group_index: torch.Tensor  # [B] long
    advantages: torch.Tensor  # [B]
    budgets: torch.Tensor | None = None  # [B] float, budget-conditioned rollouts only
    group_rows: list[list[int]] = field(default_factory=list)  # rows of each group, for mini-batches
    # AnytimeReasoner's packed rows: per-token advantages, loss mask, tree-attention rule, positions
    token_advantages: list[torch.Tensor] | None = None  # [B] of [R_i]
    loss_masks: list[torch.Tensor] | None = None  # [B] of [R_i]; None = every response token
    seg_start: list[torch.Tensor] | None = None  # [B] of [R_i] (see rlspec.trainers.hooks.anytime.PackedRollout)
    seg_cut: list[torch.Tensor] | None = None
    positions: list[torch.Tensor] | None = None  # [B] of [R_i], offsets from the prompt length
    # PPO with a critic (rlspec.trainers.critic): the critic's targets and its values at scoring time
    returns: list[torch.Tensor] | None = None  # [B] of [R_i]
    values: list[torch.Tensor] | None = None  # [B] of [R_i]

    @property
    def size(self) -> int:
        return len(self.response_ids)


def flatten_groups(groups: list[Group], n: int) -> TrainBatch:
    """One row per response (its own prompt when budget-conditioned); advantages still zero."""
    prompt_ids, response_ids, old_logprobs, rewards, group_index, budgets = [], [], [], [], [], []
    for g, group in enumerate(groups):
        for i in range(len(group.response_ids)):
            prompt_ids.append(group.response_prompt_ids[i] if group.response_prompt_ids else group.prompt_ids)
            if group.budgets is not None:
                budgets.append(float(group.budgets[i]))
            response_ids.append(group.response_ids[i])
            old_logprobs.append(group.old_logprobs[i])
            rewards.append(group.rewards[i])
            group_index.append(g)
    rewards_t = torch.tensor(rewards, dtype=torch.float32)  # [B]
    budgets_t = torch.tensor(budgets, dtype=torch.float32) if len(budgets) == len(response_ids) else None  # [B]
    return TrainBatch(prompt_ids, response_ids, old_logprobs, rewards_t, torch.tensor(group_index, dtype=torch.long),
                      torch.zeros_like(rewards_t), budgets_t,
                      group_rows=[list(range(g * n, (g + 1) * n)) for g in range(len(groups))])


def packed_batch(groups: list[Group], n: int) -> TrainBatch:
    """One packed row per rollout: its own segments (per-token advantages already computed)."""
    rows = [(g, group, p) for g, group in enumerate(groups) for p in group.packed]
    token_adv = [p.advantages for _, _, p in rows]
    advantages = torch.stack([(a * p.loss_mask).sum() / p.loss_mask.sum().clamp(min=1)
                              for a, (_, _, p) in zip(token_adv, rows)])  # [B] mean over trained tokens
    rewards = torch.tensor([r for group in groups for r in group.rewards], dtype=torch.float32)
    return TrainBatch(
        [group.prompt_ids for _, group, _ in rows], [p.ids for _, _, p in rows], [p.logprobs for _, _, p in rows],
        rewards, torch.tensor([g for g, _, _ in rows], dtype=torch.long), advantages, None,
        group_rows=[list(range(g * n, (g + 1) * n)) for g in range(len(groups))], token_advantages=token_adv,
        loss_masks=[p.loss_mask for _, _, p in rows], seg_start=[p.seg_start for _, _, p in rows],
        seg_cut=[p.seg_cut for _, _, p in rows], positions=[p.positions for _, _, p in rows],
    )


def mini_batch_members(batch: TrainBatch, mini_groups: int, epochs: int, generator: torch.Generator) -> Iterator[list[int]]:
    """The rows of each optimizer step: per epoch the groups in a fresh random order, cut into
    mini-batches of ``mini_groups`` groups (a group's responses stay together)."""
    num_groups = len(batch.group_rows)
    for _epoch in range(epochs):
        order = torch.randperm(num_groups, generator=generator).tolist()
        for start in range(0, num_groups, mini_groups):
            yield [i for g in order[start : start + mini_groups] for i in batch.group_rows[g]]


def micro_batches(batch: TrainBatch, members: list[int], size: int, budget: int | None) -> list[list[int]]:
    """Split ``members`` into micro-batches, sorted by total length so each pads little.

    At most ``micro_batch_size`` rows each and, when ``micro_batch_tokens`` is set, at most
    that many padded tokens (rows x (longest prompt + longest response)), as verl's dynamic
    batch size. A single row longer than the budget forms its own micro-batch.
    """
    ordered = sorted(members, key=lambda i: len(batch.prompt_ids[i]) + len(batch.response_ids[i]))
    micros: list[list[int]] = []
    current: list[int] = []
    p_max = r_max = 0
    for i in ordered:
        p, r = max(p_max, len(batch.prompt_ids[i])), max(r_max, len(batch.response_ids[i]))
        if current and (len(current) >= size or (budget and (len(current) + 1) * (p + r) > budget)):
            micros.append(current)
            current = []
            p, r = len(batch.prompt_ids[i]), len(batch.response_ids[i])
        current.append(i)
        p_max, r_max = p, r
    if current:
        micros.append(current)
    return micros


def micro_tensors(batch: TrainBatch, idx: list[int], pad_id: int, device: torch.device) -> dict[str, torch.Tensor]:
    """Left-padded prompts + right-padded responses for the responses ``idx``, on ``device``."""
    p_len = max(len(batch.prompt_ids[i]) for i in idx)
    r_len = max(len(batch.response_ids[i]) for i in idx)
    input_ids = torch.full((len(idx), p_len + r_len), pad_id, dtype=torch.long)  # [b, P+R]
    attention = torch.zeros((len(idx), p_len + r_len), dtype=torch.long)  # [b, P+R]
    response = torch.full((len(idx), r_len), pad_id, dtype=torch.long)  # [b, R]
    mask = torch.zeros((len(idx), r_len), dtype=torch.float32)  # [b, R]
    old = torch.zeros((len(idx), r_len), dtype=torch.float32)  # [b, R]
    for row, i in enumerate(idx):
        prompt, resp = batch.prompt_ids[i], batch.response_ids[i]
        input_ids[row, p_len - len(prompt) : p_len] = torch.tensor(prompt)
        input_ids[row, p_len : p_len + len(resp)] = torch.tensor(resp)
        attention[row, p_len - len(prompt) : p_len + len(resp)] = 1
        response[row, : len(resp)] = torch.tensor(resp)
        mask[row, : len(resp)] = 1.0
        old[row, : len(resp)] = batch.old_logprobs[i].float()
    position_ids = (attention.cumsum(-1) - 1).clamp(min=0)  # [b, P+R]
    attention_mask: torch.Tensor = attention
    if batch.seg_start is not None:  # AnytimeReasoner's packed rows: tree mask, positions, loss mask
        attention_mask, position_ids = packed_attention(batch, idx, p_len, r_len)
        for row, i in enumerate(idx):
            mask[row, : len(batch.response_ids[i])] = batch.loss_masks[i]
    tensors = {
        "input_ids": input_ids,
        "attention_mask": attention_mask,
        "position_ids": position_ids,
        "response": response,
        "mask": mask,
        "old_logprobs": old,
        "advantages": micro_advantages(batch, idx, r_len),
    }
    out = {k: v.to(device, non_blocking=True) for k, v in tensors.items()}  # built on the CPU, used where the policy lives
    out["r_len"] = torch.tensor(r_len)
    return out


def packed_attention(batch: TrainBatch, idx: list[int], p_len: int, r_len: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Additive ``[b, 1, P+R, P+R]`` mask and ``[b, P+R]`` positions for packed rows.

    Prompt queries: causal over the row's prompt. Response query ``j``: the prompt and response
    columns ``k < seg_cut[j]`` or ``seg_start[j] <= k <= j`` (a summary sees the thinking up to
    its cut and itself). Padding queries attend to themselves only (no all-masked rows).
    """
    b, width = len(idx), p_len + r_len
    allowed = torch.zeros(b, width, width, dtype=torch.bool)  # [b, Q, K]
    positions = torch.zeros(b, width, dtype=torch.long)
    k = torch.arange(r_len)
    for row, i in enumerate(idx):
        p = len(batch.prompt_ids[i])
        r = len(batch.response_ids[i])
        ps = p_len - p  # first prompt column (left padding)
        allowed[row, ps:p_len, ps:p_len] = torch.ones(p, p, dtype=torch.bool).tril()
        start, cut = batch.seg_start[i], batch.seg_cut[i]  # [r]
        j = torch.arange(r)[:, None]
        resp = (k[None, :] < cut[:, None]) | ((k[None, :] >= start[:, None]) & (k[None, :] <= j))  # [r, R]
        resp &= k[None, :] < r
        allowed[row, p_len : p_len + r, ps:p_len] = True
        allowed[row, p_len : p_len + r, p_len:] = resp
        positions[row, ps:p_len] = torch.arange(p)
        positions[row, p_len : p_len + r] = p + batch.positions[i]
    diag = torch.arange(width)
    allowed[:, diag, diag] = True
    bias = torch.zeros(b, 1, width, width).masked_fill_(~allowed[:, None], float("-inf"))
    return bias, positions


def micro_advantages(batch: TrainBatch, idx: list[int], r_len: int) -> torch.Tensor:
    """``[b]`` per-response advantages, or ``[b, R]`` when the batch has per-token ones."""
    if batch.token_advantages is None:
        return batch.advantages[idx]
    out = torch.zeros((len(idx), r_len), dtype=torch.float32)  # [b, R]
    for row, i in enumerate(idx):
        out[row, : batch.token_advantages[i].numel()] = batch.token_advantages[i]
    return out
