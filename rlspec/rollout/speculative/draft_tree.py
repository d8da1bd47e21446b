"""Draft shapes and draft trees: which tokens a speculative step proposes, as tensors.

* :class:`ArmShape` -- a draft shape ``depth_topk_numverify`` (``topk == 1``: a chain);
* :func:`tree_attention_mask` / :func:`tree_positions` -- SpecInfer's tree attention (arXiv
  2305.09781, Sec. 4.2): a node attends to itself and its ancestors;
* :class:`TreeBuilder` -- EAGLE-2's dynamic tree (arXiv 2406.16858, Sec. 4): expand the top-k
  nodes of each level by cumulative draft log-probability, then keep the best ``num_verify``.

Conventions (shared with :mod:`rlspec.rollout.speculative.verification`): ``n`` rows, a tree is
``parents [N]`` with ``parents[j] < j`` (topological order) and ``-1`` for children of the root;
depths count edges from the root. ``num_verify`` counts draft nodes *without* the root, so
SGLang's / TLT's ``speculative_num_draft_tokens`` (``"8_4_48"``) equals ``num_verify + 1``.
"""

from __future__ import annotations

from typing import NamedTuple

import torch

# ----------------------------------------------------------------------------------------------
# draft shapes


class ArmShape(NamedTuple):
    """A draft shape: ``depth`` drafter steps, ``topk`` children per expanded node, ``num_verify``
    draft nodes sent to the target (root excluded). A chain is ``topk == 1, num_verify == depth``.

    >>> a = ArmShape.parse("6_4_16"); a
    ArmShape(depth=6, topk=4, num_verify=16)
    >>> str(a), a.is_chain, a.max_nodes
    ('6_4_16', False, 84)
    >>> ArmShape(5, 1, 5).is_chain
    True
    """

    depth: int
    topk: int
    num_verify: int

    def __str__(self) -> str:
        return f"{self.depth}_{self.topk}_{self.num_verify}"

    @classmethod
    def parse(cls, value: "ArmShape | str | tuple[int, int, int] | list[int]") -> "ArmShape":
        """From ``"depth_topk_numverify"``, a 3-sequence of ints, or an ``ArmShape`` (no checks)."""
        if isinstance(value, ArmShape):
            return value
        if isinstance(value, str):
            parts = value.strip().split("_")
            if len(parts) != 3 or not all(p.strip().lstrip("-").isdigit() for p in parts):
                raise ValueError(f"draft shape {value!r} must look like 'depth_topk_numverify', e.g. '6_4_16'")
            return cls(*(int(p) for p in parts))
        try:
            items = list(value)
        except TypeError:
            raise ValueError(
                f"draft shape {value!r} must be 'depth_topk_numverify' or [depth, topk, num_verify]"
            ) from None
        if len(items) != 3 or not all(isinstance(x, int) and not isinstance(x, bool) for x in items):
            raise ValueError(f"draft shape {value!r} must be three ints [depth, topk, num_verify]")
        return cls(*items)

    @property
    def is_chain(self) -> bool:
        return self.topk == 1

    @property
    def max_nodes(self) -> int:
        """Nodes the EAGLE-2 builder creates: ``topk`` at level 1, ``topk**2`` at each later level."""
        return self.topk + (self.depth - 1) * self.topk * self.topk

    def problems(self) -> list[str]:
        """Why this shape is unusable (empty list when it is fine)."""
        out = []
        for name in ("depth", "topk", "num_verify"):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                out.append(f"{name} must be an int >= 1, got {v!r}")
        if out:
            return out
        if self.num_verify < self.depth:
            out.append(
                f"num_verify ({self.num_verify}) < depth ({self.depth}): the deepest draft levels could never be "
                f"verified; use num_verify >= depth or a smaller depth"
            )
        if self.num_verify > self.max_nodes:
            out.append(
                f"num_verify ({self.num_verify}) > the {self.max_nodes} nodes a depth-{self.depth}, top-{self.topk} "
                f"tree has (topk + (depth-1)*topk^2); lower num_verify or raise topk/depth"
            )
        return out


# ----------------------------------------------------------------------------------------------
# trees


def _check_parents(parents: torch.Tensor) -> None:
    if parents.dtype in (torch.float16, torch.bfloat16, torch.float32, torch.float64, torch.bool):
        raise ValueError(f"parents must be an integer tensor, got {parents.dtype}")
    n_nodes = parents.shape[-1]
    idx = torch.arange(n_nodes, device=parents.device)
    if bool(((parents < -1) | (parents >= idx)).any()):
        raise ValueError(
            "parents must be in topological order: -1 <= parents[..., j] < j (a node's parent comes "
            f"before it; -1 = child of the root), got {parents.tolist()}"
        )


def tree_attention_mask(parents: torch.Tensor, include_root: bool = False) -> torch.Tensor:
    """Tree attention mask (SpecInfer arXiv 2305.09781, Section 4.2 "tree-based parallel decoding"):
    node ``i`` attends to itself and to its ancestors.

    Args:
        parents: ``[..., N]`` parent indices (``-1`` = child of the root), topological order.
        include_root: prepend the root as position 0, attended to by every node.

    Returns:
        ``[..., N, N]`` bool (``[..., N+1, N+1]`` with the root); ``mask[..., i, j]`` = ``i`` may
        attend to ``j``. Combine with a causal prefix mask for the verify forward.

    >>> tree_attention_mask(torch.tensor([-1, -1, 0])).int()
    tensor([[1, 0, 0],
            [0, 1, 0],
            [1, 0, 1]], dtype=torch.int32)
    """
    parents = parents.long()
    _check_parents(parents)
    n_nodes = parents.shape[-1]
    mask = torch.eye(n_nodes, dtype=torch.bool, device=parents.device).expand(*parents.shape, n_nodes).clone()
    cur = parents.clone()  # [..., N]: the ancestor reached so far (-1 = root)
    for _ in range(n_nodes):
        has = cur >= 0  # [..., N]
        if not bool(has.any()):
            break
        hit = torch.nn.functional.one_hot(cur.clamp(min=0), n_nodes).bool() & has.unsqueeze(-1)  # [..., N, N]
        mask |= hit
        cur = torch.where(has, parents.gather(-1, cur.clamp(min=0)), cur)
    if include_root:
        full = torch.ones(*parents.shape[:-1], n_nodes + 1, n_nodes + 1, dtype=torch.bool, device=parents.device)
        full[..., 0, 1:] = False  # the root sees only itself
        full[..., 1:, 1:] = mask
        return full
    return mask


def tree_positions(parents: torch.Tensor) -> torch.Tensor:
    """Depth of every node (root children = 1): the position offset from the root.

    Node ``j`` sits at absolute position ``root_position + depth[j]``.

    >>> tree_positions(torch.tensor([-1, -1, 0, 2, 1]))
    tensor([1, 1, 2, 3, 2])
    """
    return tree_attention_mask(parents).sum(dim=-1)  # self + ancestors


def chain_parents(k: int, device: torch.device | str | None = None) -> torch.Tensor:
    """``parents`` of a chain of ``k`` drafts: ``[-1, 0, 1, ..., k-2]`` (``[K]``).

    >>> chain_parents(4)
    tensor([-1,  0,  1,  2])
    """
    return torch.arange(-1, k - 1, device=device)


# ----------------------------------------------------------------------------------------------
# EAGLE-2 dynamic tree construction


class Frontier(NamedTuple):
    nodes: torch.Tensor  # [n, F] long node ids to expand next (-1 = the root)
    tokens: torch.Tensor  # [n, F] long their tokens (-1 for the root: the caller knows it)
    depth: torch.Tensor  # [n, F] long (0 = root); position = root_position + depth
    scores: torch.Tensor  # [n, F] float64 cumulative draft log-probabilities (0 at the root)


class DraftTree(NamedTuple):
    tokens: torch.Tensor  # [n, M] long
    parents: torch.Tensor  # [n, M] long, -1 = child of the root, topological
    depth: torch.Tensor  # [n, M] long, root children = 1
    scores: torch.Tensor  # [n, M] float64 cumulative draft log-probabilities


class TreeBuilder:
    """EAGLE-2 dynamic draft tree (Li et al. arXiv 2406.16858, Section 4.1 "expansion" and 4.2
    "reranking"), batched over ``n`` rows, driven level by level by the decoding loop::

        b = TreeBuilder(topk=4, depth=6, num_verify=16, batch_size=n)
        while not b.done:
            f = b.frontier()                       # nodes to run the drafter on
            logp = drafter(f.tokens, f.depth, ...)  # [n, F, V] draft log-probs after each node
            top = logp.topk(b.topk, dim=-1)
            b.expand(top.indices, top.values)      # [n, F, topk] each
        tree = b.finalize()                        # tokens / parents [n, num_verify]

    Expansion: level 0 is the root; each ``expand`` creates ``topk`` children per frontier node
    with score ``parent score + log q(child)``; the next frontier is the ``topk`` best new nodes
    (cumulative score, ties by creation order). Reranking: ``finalize`` keeps the ``num_verify``
    nodes with the highest cumulative score over all levels. Because a child's score never
    exceeds its parent's (log-probs are <= 0) and ties go to the earlier-created parent, the kept
    set always contains every kept node's ancestors; it is returned in creation (topological)
    order, siblings in the drafter's top-k order. Use :func:`tree_attention_mask` on
    :attr:`parents` for the drafter's attention over the nodes built so far.

    >>> b = TreeBuilder(topk=2, depth=2, num_verify=3)
    >>> b.frontier().nodes
    tensor([[-1]])
    >>> b.expand(torch.tensor([[[5, 6]]]), torch.log(torch.tensor([[[0.6, 0.3]]])))
    >>> b.frontier().tokens
    tensor([[5, 6]])
    >>> b.expand(torch.tensor([[[7, 8], [9, 10]]]), torch.log(torch.tensor([[[0.9, 0.1], [0.5, 0.5]]])))
    >>> t = b.finalize(); t.tokens, t.parents   # scores: 5:.6 6:.3 7:.54 8:.06 9:.15 10:.15
    (tensor([[5, 6, 7]]), tensor([[-1, -1,  0]]))
    """

    def __init__(
        self, topk: int, depth: int, num_verify: int, batch_size: int = 1, device: torch.device | str | None = None
    ):
        problems = ArmShape(depth, topk, num_verify).problems()
        if problems:
            raise ValueError(f"bad draft shape {depth}_{topk}_{num_verify}: {'; '.join(problems)}")
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.topk, self.depth, self.num_verify, self.batch_size = topk, depth, num_verify, batch_size
        self.device = torch.device(device) if device is not None else torch.device("cpu")
        n = batch_size
        self.tokens = torch.empty(n, 0, dtype=torch.long, device=self.device)  # [n, C]
        self.parents = torch.empty(n, 0, dtype=torch.long, device=self.device)  # [n, C]
        self.node_depth = torch.empty(n, 0, dtype=torch.long, device=self.device)  # [n, C]
        self.scores = torch.empty(n, 0, dtype=torch.float64, device=self.device)  # [n, C]
        self._frontier = torch.full((n, 1), -1, dtype=torch.long, device=self.device)  # [n, F]
        self.level = 0

    @classmethod
    def from_arm(cls, arm: ArmShape, batch_size: int = 1, device: torch.device | str | None = None) -> "TreeBuilder":
        return cls(arm.topk, arm.depth, arm.num_verify, batch_size, device)

    @property
    def done(self) -> bool:
        return self.level >= self.depth

    def _gather(self, table: torch.Tensor, nodes: torch.Tensor, root_value: float | int) -> torch.Tensor:
        if table.shape[1] == 0:
            return torch.full(nodes.shape, root_value, dtype=table.dtype, device=self.device)
        got = table.gather(1, nodes.clamp(min=0))
        return torch.where(nodes >= 0, got, torch.full_like(got, root_value))

    def frontier(self) -> Frontier:
        """The nodes the drafter must expand next (``[n, F]``; ``F = 1`` (root) then ``topk``)."""
        f = self._frontier
        return Frontier(
            f, self._gather(self.tokens, f, -1), self._gather(self.node_depth, f, 0), self._gather(self.scores, f, 0.0)
        )

    def expand(self, children_tokens: torch.Tensor, children_logprobs: torch.Tensor) -> None:
        """Add ``topk`` children under each frontier node.

        Args:
            children_tokens: ``[n, F, topk]`` long, the drafter's top-k tokens after each frontier node.
            children_logprobs: ``[n, F, topk]`` their draft log-probabilities (``<= 0``).
        """
        if self.done:
            raise RuntimeError(f"the tree already has its {self.depth} levels; call finalize()")
        n, f_size = self._frontier.shape
        shape = (n, f_size, self.topk)
        if tuple(children_tokens.shape) != shape or tuple(children_logprobs.shape) != shape:
            raise ValueError(
                f"expand() wants [n, F, topk] = {list(shape)} tokens and log-probs, got "
                f"{list(children_tokens.shape)} and {list(children_logprobs.shape)}"
            )
        logp = children_logprobs.to(device=self.device, dtype=torch.float64)
        if bool(torch.isnan(logp).any()) or bool((logp > 0).any()):
            raise ValueError("children_logprobs must be log-probabilities (<= 0, not NaN)")
        front = self.frontier()
        start = self.tokens.shape[1]
        new_scores = (front.scores.unsqueeze(-1) + logp).reshape(n, f_size * self.topk)  # [n, F*topk]
        new_parents = front.nodes.unsqueeze(-1).expand(shape).reshape(n, -1)  # [n, F*topk]
        new_depth = (front.depth + 1).unsqueeze(-1).expand(shape).reshape(n, -1)  # [n, F*topk]
        self.tokens = torch.cat([self.tokens, children_tokens.to(self.device).long().reshape(n, -1)], dim=1)
        self.parents = torch.cat([self.parents, new_parents], dim=1)
        self.node_depth = torch.cat([self.node_depth, new_depth], dim=1)
        self.scores = torch.cat([self.scores, new_scores], dim=1)
        # next frontier: the topk best new nodes, best first (stable sort: ties by creation order)
        order = torch.sort(new_scores, dim=1, descending=True, stable=True).indices[:, : self.topk]  # [n, topk]
        self._frontier = start + order
        self.level += 1

    def finalize(self) -> DraftTree:
        """The ``num_verify`` best nodes (``[n, M]``, ``M = min(num_verify, nodes built)``),
        topologically ordered, parents renumbered into the kept set."""
        n, c = self.tokens.shape
        m = min(self.num_verify, c)
        order = torch.sort(self.scores, dim=1, descending=True, stable=True).indices[:, :m]  # [n, M]
        keep = order.sort(dim=1).values  # [n, M] creation order = topological
        new_index = torch.full((n, c), -1, dtype=torch.long, device=self.device)  # [n, C]
        new_index.scatter_(1, keep, torch.arange(m, device=self.device).expand(n, m))
        old_parents = self.parents.gather(1, keep)  # [n, M]
        parents = torch.where(old_parents >= 0, new_index.gather(1, old_parents.clamp(min=0)), old_parents)
        if bool(((old_parents >= 0) & (parents < 0)).any()):  # cannot happen with log-probs <= 0
            raise RuntimeError("EAGLE-2 reranking dropped an ancestor of a kept node")
        return DraftTree(
            self.tokens.gather(1, keep), parents, self.node_depth.gather(1, keep), self.scores.gather(1, keep)
        )


__all__ = [
    "ArmShape",
    "DraftTree",
    "Frontier",
    "TreeBuilder",
    "chain_parents",
    "tree_attention_mask",
    "tree_positions",
]
