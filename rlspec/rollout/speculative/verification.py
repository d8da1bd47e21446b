"""Lossless verification of drafts: the tensor maths of speculative sampling, no model.

Speculative decoding (SD) drafts several tokens cheaply and lets the target model check all of
them in one forward pass. *Speculative sampling* accepts or rejects the drafts so that the
emitted tokens are distributed **exactly** as if the target had sampled them one by one:

* Leviathan, Kalman, Matias, "Fast Inference from Transformers via Speculative Decoding",
  arXiv 2211.17192, Algorithm 1 / Theorem 3.5 (accept ``x ~ q`` with ``min(1, p(x)/q(x))``, on
  rejection resample from ``norm(max(p - q, 0))``);
* Chen et al., "Accelerating Large Language Model Decoding with Speculative Sampling",
  arXiv 2302.01318, Algorithm 2 (the same rule, bonus token after ``K`` acceptances);
* Miao et al., "SpecInfer", arXiv 2305.09781, Section 4 / Algorithm 2 ("multi-step speculative
  sampling": token *trees*, siblings tried in turn against a residual that shrinks after each
  rejection);
* Li et al., "EAGLE-2: Faster Inference of Language Models with Dynamic Draft Trees",
  arXiv 2406.16858, Section 4 (dynamic tree: expand the top-k nodes of each level by cumulative
  draft log-probability, then rerank and keep the best ``num_verify`` nodes).

Conventions (``n`` rows = sequences in the batch, ``V`` vocabulary, ``K`` chain length, ``N``
tree nodes, ``D`` tree depth):

* The *root* is the last verified token of a row. The target's verify forward runs on
  ``[root, node_0, ..., node_{N-1}]`` (``N + 1`` tokens), so ``target_probs[:, 0]`` is the
  distribution after the root and ``target_probs[:, j + 1]`` the one after node ``j``.
* A tree is ``parents [N]`` with ``parents[j] < j`` (topological order), ``-1`` for children of
  the root. Depths count edges from the root (root children have depth 1).
* A step emits ``num_accepted + 1`` tokens per row: the accepted drafts then ``next_token``
  (the correction token after a rejection, or the bonus token when every draft was accepted).
* All probabilities must come from :func:`target_probs` (the exact distribution of
  :func:`rlspec.rollout.sampling.sample_next_tokens`) so that SD reproduces plain sampling.

Draft shapes and tree construction live in :mod:`rlspec.rollout.speculative.draft_tree`.
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from rlspec.rollout.speculative.draft_tree import tree_attention_mask
from rlspec.rollout.sampling import apply_temperature, apply_top_k, apply_top_p, sample_from_probs

# ----------------------------------------------------------------------------------------------
# the target distribution


def target_probs(logits: torch.Tensor, temperature: float, top_p: float = 1.0, top_k: int = 0) -> torch.Tensor:
    """The exact distribution :func:`rlspec.rollout.sampling.sample_next_tokens` draws from.

    Same code path as the plain sampler: float32 logits, ``/ temperature``, then top-k then top-p
    (:func:`~rlspec.rollout.sampling.apply_top_k`, :func:`~rlspec.rollout.sampling.apply_top_p`),
    then softmax; without filtering ``exp(log_softmax(logits / T))`` as the sampler does. Feeding
    the result to :func:`~rlspec.rollout.sampling.sample_from_probs` with the sampler's uniform
    number returns the sampler's token bit for bit. Greedy (``temperature == 0``) is the one-hot
    of ``argmax`` (first maximal index on ties, like ``torch.argmax`` in the sampler).

    Args:
        logits: ``[..., V]`` raw logits (any float dtype).
        temperature, top_p, top_k: as in :class:`rlspec.rollout.base.SamplingParams`.

    Returns:
        ``[..., V]`` float32 probabilities (zeros outside the top-k / top-p set).

    >>> target_probs(torch.tensor([[1.0, 3.0, 3.0]]), 0.0)
    tensor([[0., 1., 0.]])
    >>> target_probs(torch.log(torch.tensor([[0.5, 0.3, 0.2]])), 1.0, top_p=0.7)
    tensor([[0.6250, 0.3750, 0.0000]])
    """
    logits = logits.float()
    if temperature < 0:
        raise ValueError(f"temperature must be >= 0, got {temperature}")
    if temperature == 0:
        idx = logits.argmax(dim=-1, keepdim=True)  # [..., 1]
        return torch.zeros_like(logits).scatter_(-1, idx, 1.0)
    scaled = apply_temperature(logits, temperature)
    if top_k == 0 and top_p >= 1:
        return torch.log_softmax(scaled, dim=-1).exp()  # the sampler's unfiltered path
    return apply_top_p(apply_top_k(scaled, top_k), top_p).float().softmax(dim=-1)


# ----------------------------------------------------------------------------------------------
# chains


class ChainVerifyResult(NamedTuple):
    num_accepted: torch.Tensor  # [n] long, 0..K
    next_token: torch.Tensor  # [n] long, correction or bonus token


def verify_chain(
    draft_tokens: torch.Tensor,
    draft_probs: torch.Tensor | None,
    target_probs: torch.Tensor,
    generator: torch.Generator | None = None,
    num_drafts: torch.Tensor | None = None,
) -> ChainVerifyResult:
    """Speculative sampling of a draft chain (Leviathan et al. arXiv 2211.17192, Algorithm 1;
    Chen et al. arXiv 2302.01318, Algorithm 2), batched over rows accepting different lengths.

    Draft ``i`` (token ``x_i``) is accepted with probability ``min(1, p_i(x_i) / q_i(x_i))``
    (implemented as ``u * q < p`` with ``u ~ U[0, 1)``); at the first rejection the next token is
    drawn from ``norm(max(p_i - q_i, 0))``; if all drafts are accepted the bonus token is drawn
    from ``p_K``. Every emitted token then has exactly the target's distribution (Theorem 3.5 of
    2211.17192: ``P(emit x) = min(p, q)(x) + (1 - sum min(p, q)) * norm(max(p - q, 0))(x) = p(x)``).

    ``draft_probs=None`` means point-mass drafts (``q_i = one_hot(x_i)``): accept with probability
    ``p_i(x_i)``, on rejection sample from ``p_i`` with ``x_i`` removed. This is lossless for *any*
    way of choosing the drafts (greedy drafter, n-gram lookup...), as long as the choice does not
    look at this function's random numbers. With a greedy (one-hot) target it reduces to "accept
    while draft == argmax, then emit the argmax".

    Args:
        draft_tokens: ``[n, K]`` long drafted tokens.
        draft_probs: ``[n, K, V]`` the distributions the drafts were *sampled from* (``q``), or
            ``None`` for point-mass drafts.
        target_probs: ``[n, K + 1, V]`` target distributions from :func:`target_probs`; row ``i``
            is the distribution after drafts ``< i`` (index 0 = after the root, ``K`` = bonus).
        generator: private RNG (uses ``n * K + n`` uniforms); ``None`` = global RNG.
        num_drafts: optional ``[n]`` long, drafts beyond ``num_drafts[r]`` are ignored for row
            ``r`` (as if its chain were shorter; the token after its last draft is then drawn
            from the full ``p``).

    Returns:
        ``(num_accepted [n], next_token [n])``; the row emits
        ``draft_tokens[r, :num_accepted[r]]`` then ``next_token[r]``.

    >>> one_hot = torch.eye(4)
    >>> p = one_hot[[1, 2, 0]].unsqueeze(0)           # greedy target: argmax 1, then 2, then 0
    >>> verify_chain(torch.tensor([[1, 3]]), None, p)  # draft 1 ok, draft 3 != 2
    ChainVerifyResult(num_accepted=tensor([1]), next_token=tensor([2]))
    """
    n, k = draft_tokens.shape  # [n, K]
    if target_probs.dim() != 3 or target_probs.shape[:2] != (n, k + 1):
        raise ValueError(f"target_probs must be [n, K+1, V] = [{n}, {k + 1}, V], got {tuple(target_probs.shape)}")
    vocab = target_probs.shape[-1]
    if draft_probs is not None and tuple(draft_probs.shape) != (n, k, vocab):
        raise ValueError(f"draft_probs must be [n, K, V] = [{n}, {k}, {vocab}], got {tuple(draft_probs.shape)}")
    device = target_probs.device
    rows = torch.arange(n, device=device)  # [n]
    draft_tokens = draft_tokens.long()
    limit = (
        torch.full((n,), k, dtype=torch.long, device=device) if num_drafts is None else num_drafts.long().clamp(0, k)
    )

    u = torch.rand(n, k, generator=generator, device=device, dtype=torch.float64)  # [n, K]
    p_x = target_probs[:, :k].gather(-1, draft_tokens.unsqueeze(-1)).squeeze(-1).double()  # [n, K]
    if draft_probs is None:
        q_x = torch.ones_like(p_x)  # point mass
    else:
        q_x = draft_probs.gather(-1, draft_tokens.unsqueeze(-1)).squeeze(-1).double()  # [n, K]
    accept = (u * q_x < p_x) & (torch.arange(k, device=device) < limit.unsqueeze(-1))  # [n, K]
    num_accepted = accept.long().cumprod(dim=-1).sum(dim=-1)  # [n], leading run of acceptances

    dist = target_probs[rows, num_accepted].clone()  # [n, V]: p at the stopping position
    rejected = num_accepted < limit  # [n]: stopped by a rejection (not by running out of drafts)
    if bool(rejected.any()):
        j = num_accepted.clamp(max=max(k - 1, 0))  # [n]
        if draft_probs is None:
            residual = dist.scatter(-1, draft_tokens[rows, j].unsqueeze(-1), 0.0)  # p without x_j
        else:
            residual = (dist - draft_probs[rows, j].to(dist.dtype)).clamp_min(0.0)  # max(p - q, 0)
        # a residual can only be all-zero through rounding when p == q; fall back to p then
        usable = rejected & (residual.double().sum(-1) > 0)
        dist = torch.where(usable.unsqueeze(-1), residual, dist)
    next_token = sample_from_probs(dist, torch.rand(n, generator=generator, device=device))
    return ChainVerifyResult(num_accepted, next_token)


def verify_chain_coupled(
    draft_tokens: torch.Tensor,
    target_probs: torch.Tensor,
    uniforms: torch.Tensor,
    num_drafts: torch.Tensor | None = None,
) -> ChainVerifyResult:
    """Point-mass drafts verified by *coupling* with plain sampling: the emitted tokens are the
    ones plain decoding draws with the same per-position uniform numbers.

    At each position ``i`` the plain sample ``y_i = inverse_cdf(p_i, u_i)`` is drawn; draft ``x_i``
    is accepted when ``y_i == x_i``, and at the first mismatch (or after the last draft) ``y_i``
    is the next token. ``P(accept x_i) = p_i(x_i)`` and a rejection emits ``y_i ~ p_i`` given
    ``y_i != x_i``, i.e. ``norm(p_i`` without ``x_i)`` -- exactly :func:`verify_chain`'s rule for
    point-mass drafts (its acceptance rate and distribution), with the randomness tied to the
    position. With ``u_i`` from :func:`rlspec.rollout.sampling.position_uniforms` a run gives the
    same tokens with speculation on or off (up to float rounding between a verify forward and a
    plain one). Lossless for drafts chosen without looking at ``uniforms``.

    Args:
        draft_tokens: ``[n, K]`` long drafted tokens.
        target_probs: ``[n, K + 1, V]`` from :func:`target_probs` (index 0 = after the root).
        uniforms: ``[n, K + 1]`` numbers in ``[0, 1)``: position ``i`` of row ``r`` draws with
            ``uniforms[r, i]``.
        num_drafts: optional ``[n]`` long, drafts beyond ``num_drafts[r]`` are ignored for row ``r``.

    >>> p = torch.tensor([[[0.5, 0.5, 0.0], [0.1, 0.1, 0.8], [1.0, 0.0, 0.0]]])
    >>> verify_chain_coupled(torch.tensor([[1, 2]]), p, torch.tensor([[0.7, 0.9, 0.3]]))  # y = 1, 2, 0
    ChainVerifyResult(num_accepted=tensor([2]), next_token=tensor([0]))
    >>> verify_chain_coupled(torch.tensor([[0, 2]]), p, torch.tensor([[0.7, 0.9, 0.3]]))  # y_0 = 1 != 0
    ChainVerifyResult(num_accepted=tensor([0]), next_token=tensor([1]))
    """
    n, k = draft_tokens.shape  # [n, K]
    if target_probs.dim() != 3 or target_probs.shape[:2] != (n, k + 1):
        raise ValueError(f"target_probs must be [n, K+1, V] = [{n}, {k + 1}, V], got {tuple(target_probs.shape)}")
    if tuple(uniforms.shape) != (n, k + 1):
        raise ValueError(f"uniforms must be [n, K+1] = [{n}, {k + 1}], got {tuple(uniforms.shape)}")
    device = target_probs.device
    limit = (torch.full((n,), k, dtype=torch.long, device=device) if num_drafts is None
             else num_drafts.long().clamp(0, k))
    plain = sample_from_probs(target_probs.reshape(n * (k + 1), -1), uniforms.reshape(-1)).view(n, k + 1)  # y
    match = (plain[:, :k] == draft_tokens.long()) & (torch.arange(k, device=device) < limit.unsqueeze(-1))
    num_accepted = match.long().cumprod(dim=-1).sum(dim=-1)  # [n], leading run of matches
    next_token = plain.gather(1, num_accepted.unsqueeze(-1)).squeeze(-1)
    return ChainVerifyResult(num_accepted, next_token)


def chain_emitted(
    draft_tokens: torch.Tensor, num_accepted: torch.Tensor, next_token: torch.Tensor, pad_id: int = -1
) -> torch.Tensor:
    """The tokens a chain step emits, left-aligned: ``[n, K + 1]``, padded with ``pad_id``.

    >>> chain_emitted(torch.tensor([[5, 6], [7, 8]]), torch.tensor([1, 2]), torch.tensor([9, 4]))
    tensor([[ 5,  9, -1],
            [ 7,  8,  4]])
    """
    n, k = draft_tokens.shape  # [n, K]
    out = torch.full((n, k + 1), pad_id, dtype=torch.long, device=draft_tokens.device)  # [n, K+1]
    col = torch.arange(k + 1, device=draft_tokens.device)  # [K+1]
    out[:, :k] = torch.where(col[:k] < num_accepted.unsqueeze(-1), draft_tokens.long(), out[:, :k])
    out.scatter_(1, num_accepted.long().unsqueeze(-1), next_token.long().unsqueeze(-1))
    return out


class TreeVerifyResult(NamedTuple):
    accepted_path: torch.Tensor  # [n, D] long node indices along the accepted path, -1 padded
    num_accepted: torch.Tensor  # [n] long, accepted draft nodes (= path length)
    next_token: torch.Tensor  # [n] long, correction or bonus token


def verify_tree(
    tokens: torch.Tensor,
    parents: torch.Tensor,
    target_probs: torch.Tensor,
    generator: torch.Generator | None = None,
    valid: torch.Tensor | None = None,
) -> TreeVerifyResult:
    """Lossless verification of a point-mass draft tree by recursive rejection sampling
    (SpecInfer arXiv 2305.09781, Algorithm 2 "multi-step speculative sampling", with point-mass
    drafts = SGLang's ``tree_speculative_sampling_target_only`` at threshold 1.0; EAGLE
    arXiv 2401.15077 / EAGLE-2 arXiv 2406.16858 verify the same way).

    Per row, starting at the root with residual ``r = p_root``: visit the current node's children
    ``c_1..c_k`` in index order; accept ``c_i`` with probability ``r(t_i) / sum(r)``; if rejected
    set ``r(t_i) = 0`` and try the next child. On acceptance descend into ``c_i`` with
    ``r = p_{c_i}`` (the target's distribution after ``c_i``). When no child is accepted (or at a
    leaf) the next token is drawn from ``norm(r)``. Greedy (one-hot) targets therefore descend
    into the first child equal to the argmax and emit the argmax.

    Why it is exact (point-mass SpecInfer). Fix a node with target ``p`` and children tokens
    ``t_1..t_k``. Write ``r_0 = p`` and ``r_i = r_{i-1}`` with ``t_i`` zeroed. Sampling
    ``X ~ norm(r_{i-1})`` can be split by the chain rule into: ``X = t_i`` with probability
    ``r_{i-1}(t_i) / |r_{i-1}|``, otherwise ``X ~ norm(r_i)`` (``r_{i-1}`` conditioned on
    ``X != t_i``). Unrolling ``i = 1..k``: the procedure emits ``t_i`` or, after ``k``
    rejections, a draw from ``norm(r_k)`` -- in total exactly one draw from ``norm(r_0) = p``.
    (Repeated sibling tokens are harmless: once zeroed, ``t`` is rejected with probability 1.)
    Accepting ``t_i`` emits token ``t_i`` and continues at that child with its target
    distribution, so by induction over depth every emitted token ``y_m`` is distributed as
    ``p(. | prefix, y_1..y_{m-1})`` -- the sequence law of plain sampling. The tree may be chosen
    by any rule that does not look at this function's random numbers (e.g. EAGLE-2's top-k).

    Args:
        tokens: ``[n, N]`` long draft tokens of the nodes.
        parents: ``[N]`` or ``[n, N]`` parent indices, ``-1`` = child of the root, ``parents[j] < j``.
        target_probs: ``[n, N + 1, V]`` from :func:`target_probs`; index 0 = after the root,
            ``j + 1`` = after node ``j``.
        generator: private RNG; ``None`` = global RNG.
        valid: optional ``[n, N]`` bool, ``False`` drops a node (and its subtree) from that row.

    Returns:
        ``(accepted_path [n, D], num_accepted [n], next_token [n])``: ``D`` = the deepest level
        present; the row emits ``tokens[r, accepted_path[r, :num_accepted[r]]]`` then
        ``next_token[r]``.

    >>> p = torch.eye(5)[[2, 4, 1, 3]].unsqueeze(0)  # greedy target: root->2, node0->4, node1->1, node2->3
    >>> verify_tree(torch.tensor([[3, 2, 1]]), torch.tensor([-1, -1, 1]), p)  # node 1 (tok 2), node 2 (tok 1), then 3
    TreeVerifyResult(accepted_path=tensor([[1, 2]]), num_accepted=tensor([2]), next_token=tensor([3]))
    """
    n, n_nodes = tokens.shape  # [n, N]
    if target_probs.dim() != 3 or target_probs.shape[:2] != (n, n_nodes + 1):
        raise ValueError(f"target_probs must be [n, N+1, V] = [{n}, {n_nodes + 1}, V], got {tuple(target_probs.shape)}")
    device = target_probs.device
    parents = parents.long().to(device)
    if parents.dim() == 1 and parents.shape[0] == n_nodes:
        parents = parents.unsqueeze(0).expand(n, n_nodes)  # [n, N]
    if tuple(parents.shape) != (n, n_nodes):
        raise ValueError(f"parents must be [N] or [n, N] = [{n}, {n_nodes}], got {tuple(parents.shape)}")
    tokens = tokens.long().to(device)
    rows = torch.arange(n, device=device)  # [n]
    idx = torch.arange(n_nodes, device=device)  # [N]

    anc = tree_attention_mask(parents)  # [n, N, N]
    if valid is None:
        live_nodes = torch.ones(n, n_nodes, dtype=torch.bool, device=device)
    else:
        valid = valid.to(device=device, dtype=torch.bool)  # [n, N]
        live_nodes = ~(anc & ~valid.unsqueeze(1)).any(dim=-1)  # [n, N]: node and all its ancestors valid
    depth = anc.sum(-1)  # [n, N]
    max_depth = int((depth * live_nodes).max()) if n_nodes and n else 0

    path = torch.full((n, max_depth), -1, dtype=torch.long, device=device)  # [n, D]
    num_accepted = torch.zeros(n, dtype=torch.long, device=device)  # [n]
    cur = torch.full((n,), -1, dtype=torch.long, device=device)  # [n] current node, -1 = root
    active = torch.ones(n, dtype=torch.bool, device=device)  # [n] still descending
    r = target_probs[:, 0].clone()  # [n, V] residual at the current node
    for level in range(max_depth):
        children = live_nodes & (parents == cur.unsqueeze(-1)) & active.unsqueeze(-1)  # [n, N]
        kmax = int(children.sum(-1).max())
        if kmax == 0:
            break
        order = torch.where(children, idx, n_nodes).sort(dim=-1).values[:, :kmax]  # [n, kmax], N = none
        chosen = torch.full((n,), -1, dtype=torch.long, device=device)  # [n]
        mass = r.double().sum(-1)  # [n] sum of the residual, kept up to date below
        for i in range(kmax):
            c = order[:, i]  # [n]
            testing = (c < n_nodes) & (chosen < 0)  # [n]
            tok = tokens[rows, c.clamp(max=n_nodes - 1)]  # [n]
            r_tok = r[rows, tok].double()  # [n]
            u = torch.rand(n, generator=generator, device=device, dtype=torch.float64)  # [n]
            acc = testing & (u * mass < r_tok)  # [n]: accept with probability r(t) / sum(r)
            rej = testing & ~acc
            r[rows[rej], tok[rej]] = 0.0
            mass = torch.where(rej, mass - r_tok, mass)
            chosen = torch.where(acc, c, chosen)
        moved = chosen >= 0  # [n]
        path[:, level] = torch.where(moved, chosen, path[:, level])
        num_accepted += moved.long()
        if bool(moved.any()):
            r[moved] = target_probs[rows[moved], chosen[moved] + 1]
        cur = torch.where(moved, chosen, cur)
        active = moved
    # a residual can only be all-zero through rounding; fall back to the node's p then
    empty = r.double().sum(-1) <= 0  # [n]
    if bool(empty.any()):
        r[empty] = target_probs[rows[empty], cur[empty] + 1]
    next_token = sample_from_probs(r, torch.rand(n, generator=generator, device=device))
    return TreeVerifyResult(path, num_accepted, next_token)


def tree_emitted(
    tokens: torch.Tensor,
    accepted_path: torch.Tensor,
    num_accepted: torch.Tensor,
    next_token: torch.Tensor,
    pad_id: int = -1,
) -> torch.Tensor:
    """The tokens a tree step emits, left-aligned: ``[n, D + 1]``, padded with ``pad_id``.

    >>> tree_emitted(torch.tensor([[3, 2, 1]]), torch.tensor([[1, -1]]), torch.tensor([1]), torch.tensor([7]))
    tensor([[ 2,  7, -1]])
    """
    n, d = accepted_path.shape  # [n, D]
    out = torch.full((n, d + 1), pad_id, dtype=torch.long, device=tokens.device)  # [n, D+1]
    on_path = torch.arange(d, device=tokens.device) < num_accepted.unsqueeze(-1)  # [n, D]
    path_tokens = tokens.long().gather(1, accepted_path.clamp(min=0))  # [n, D]
    out[:, :d] = torch.where(on_path, path_tokens, out[:, :d])
    out.scatter_(1, num_accepted.long().unsqueeze(-1), next_token.long().unsqueeze(-1))
    return out


def expected_chain_length(accept_rate: float, k: int) -> float:
    """Expected tokens per chain step with i.i.d. acceptance ``a``: ``(1 - a^(K+1)) / (1 - a)``
    (Leviathan et al. arXiv 2211.17192, Eq. 1). Useful to sanity-check measured accept lengths.

    >>> round(expected_chain_length(0.5, 3), 4)
    1.875
    """
    if not 0 <= accept_rate <= 1:
        raise ValueError(f"accept_rate must be in [0, 1], got {accept_rate}")
    if accept_rate == 1:
        return float(k + 1)
    return (1 - accept_rate ** (k + 1)) / (1 - accept_rate)


__all__ = [
    "ChainVerifyResult",
    "TreeVerifyResult",
    "chain_emitted",
    "expected_chain_length",
    "target_probs",
    "tree_emitted",
    "verify_chain",
    "verify_tree",
]
