"""Speculative decoding maths (rlspec.rollout.speculative): hand examples + statistical losslessness.

Losslessness is checked with Pearson chi-square tests (fixed seeds, so the outcome is
deterministic): the first emitted token must follow the target ``p``, and the first *two* emitted
tokens must follow the joint ``p(a) p(b | a)``, for chains (sampled and point-mass drafts) and for
point-mass trees, with plain and temperature/top-p/top-k-processed targets. Negative controls run
the same test on deliberately wrong verifiers and require it to fail.

Targets are first-order Markov chains over ``V = 6`` tokens (state ``V`` = start), so the
distribution after any prefix is ``P[last token]`` and the expected joint is a small table.
"""

from __future__ import annotations

import pytest
import torch

from rlspec.rollout.base import SamplingParams
from rlspec.rollout.sampling import sample_from_probs, sample_next_tokens
from rlspec.rollout.speculative.draft_tree import ArmShape, TreeBuilder, chain_parents, tree_attention_mask, tree_positions
from rlspec.rollout.speculative.verification import (
    ChainVerifyResult,
    TreeVerifyResult,
    chain_emitted,
    target_probs,
    tree_emitted,
    verify_chain,
    verify_chain_coupled,
    verify_tree,
)

torch.set_num_threads(1)

V = 6
START = V
ROWS = 20000
ALPHA = 1e-3  # a correct verifier fails a test with probability 1e-3 per seed (seeds are fixed)

# ---------------------------------------------------------------------------------------------
# chi-square machinery


def chi2_sf(stat: float, dof: int) -> float:
    """P(chi2_dof > stat) = Q(dof/2, stat/2), the regularised upper incomplete gamma function."""
    if stat == float("inf"):
        return 0.0
    return float(
        torch.special.gammaincc(torch.tensor(dof / 2, dtype=torch.float64), torch.tensor(stat / 2, dtype=torch.float64))
    )


def chi_square(observed: torch.Tensor, probs: torch.Tensor) -> tuple[float, int, float]:
    """Pearson goodness of fit of counts ``observed [C]`` to ``probs [C]``; cells with expected
    count < 5 are pooled into one cell; any count in a probability-0 cell gives p = 0."""
    observed = observed.double().flatten()
    n = float(observed.sum())
    expected = probs.double().flatten() * n
    if float(observed[expected == 0].sum()) > 0:
        return float("inf"), 0, 0.0
    keep = expected >= 5
    obs = observed[keep].tolist()
    exp = expected[keep].tolist()
    small_e, small_o = float(expected[(~keep) & (expected > 0)].sum()), float(observed[(~keep) & (expected > 0)].sum())
    if small_e > 0:
        obs.append(small_o)
        exp.append(small_e)
    stat = sum((o - e) ** 2 / e for o, e in zip(obs, exp))
    dof = len(obs) - 1
    return stat, dof, chi2_sf(stat, dof)


def test_chi2_sf_matches_tabulated_critical_values():
    # 99.9 % quantiles from standard chi-square tables: dof 5 -> 20.515, dof 35 -> 66.619,
    # 95 % quantile dof 1 -> 3.841
    assert chi2_sf(20.515, 5) == pytest.approx(0.001, rel=2e-3)
    assert chi2_sf(66.619, 35) == pytest.approx(0.001, rel=2e-3)
    assert chi2_sf(3.841, 1) == pytest.approx(0.05, rel=2e-3)


def counts(tokens: torch.Tensor, size: int) -> torch.Tensor:
    return torch.bincount(tokens, minlength=size)


# ---------------------------------------------------------------------------------------------
# Markov target / drafter and decoding rounds


def tables(
    seed: int, temperature: float = 1.0, top_p: float = 1.0, top_k: int = 0
) -> tuple[torch.Tensor, torch.Tensor]:
    """``P [V+1, V]`` processed target table and ``Q [V+1, V]`` drafter table (row = last token)."""
    g = torch.Generator().manual_seed(seed)
    target_logits = torch.randn(V + 1, V, generator=g)
    draft_logits = target_logits + 1.0 * torch.randn(V + 1, V, generator=g)  # a correlated, imperfect drafter
    return target_probs(target_logits, temperature, top_p, top_k), torch.softmax(draft_logits, dim=-1)


def chain_round(state, P, Q, g, k=3, point_mass=False, greedy_drafter=False, verifier=verify_chain):
    """One SD step per row from ``state [n]``; returns the emitted tokens ``[n, K+1]`` (-1 pad)."""
    drafts, qs, prev = [], [], state
    for _ in range(k):
        q = Q[prev]  # [n, V]
        x = q.argmax(-1) if greedy_drafter else torch.multinomial(q, 1, generator=g).squeeze(-1)
        drafts.append(x)
        qs.append(q)
        prev = x
    draft = torch.stack(drafts, 1)  # [n, K]
    tp = P[torch.cat([state.unsqueeze(1), draft], 1)]  # [n, K+1, V]
    res = verifier(draft, None if point_mass else torch.stack(qs, 1), tp, g)
    return chain_emitted(draft, res.num_accepted, res.next_token)


TREE_PARENTS = torch.tensor([-1, -1, -1, 0, 0, 1, 1, 2, 2])  # 3 root children, 2 children each


def tree_round(state, P, Q, g, duplicates=False, drop=0.0, verifier=verify_tree):
    """Point-mass tree step: 3 drafted children at the root, 2 under each (depth 2, N = 9).
    With ``V = 6`` the target always has mass outside the tree. ``drop`` invalidates nodes."""
    n = state.shape[0]
    c1 = torch.multinomial(Q[state], 3, replacement=duplicates, generator=g)  # [n, 3]
    c2 = torch.multinomial(Q[c1.reshape(-1)], 2, replacement=duplicates, generator=g).reshape(n, 6)  # [n, 6]
    tokens = torch.cat([c1, c2], 1)  # [n, 9]
    tp = torch.cat([P[state].unsqueeze(1), P[tokens]], 1)  # [n, 10, V]
    valid = torch.rand(n, 9, generator=g) >= drop if drop > 0 else None
    res = verifier(tokens, TREE_PARENTS, tp, g, valid)
    return tree_emitted(tokens, res.accepted_path, res.num_accepted, res.next_token)


def first_two(round_fn, n=ROWS):
    """The first two tokens of ``n`` sequences decoded with ``round_fn`` (a second step where needed)."""
    em = round_fn(torch.full((n,), START))
    first, second = em[:, 0], em[:, 1].clone()
    need = second < 0
    if bool(need.any()):
        second[need] = round_fn(first[need])[:, 0]
    return first, second


def check_lossless(round_fn, P, label):
    first, second = first_two(round_fn)
    stat1, dof1, p1 = chi_square(counts(first, V), P[START])
    joint = P[START].unsqueeze(1) * P[:V]  # [V, V]: p(a) p(b | a)
    stat2, dof2, p2 = chi_square(counts(first * V + second, V * V), joint)
    print(
        f"{label}: first token chi2={stat1:.2f} dof={dof1} p={p1:.3f}; first two chi2={stat2:.2f} dof={dof2} p={p2:.3f}"
    )
    return p1, p2


# ---------------------------------------------------------------------------------------------
# target_probs == the plain sampler's distribution


@pytest.mark.parametrize(
    "temperature,top_p,top_k",
    [(1.0, 1.0, 0), (0.7, 1.0, 0), (1.0, 1.0, 3), (0.8, 0.9, 0), (1.3, 0.6, 5), (0.5, 0.95, 20)],
)
def test_target_probs_reproduces_sample_next_tokens_bit_for_bit(temperature, top_p, top_k):
    # sample_next_tokens draws u = rand(B) from the generator and inverts the CDF of its
    # processed probabilities; the same u on target_probs must give the same token for every row.
    logits = torch.randn(256, 40, generator=torch.Generator().manual_seed(3)) * 3
    params = SamplingParams(temperature=temperature, top_p=top_p, top_k=top_k)
    probs = target_probs(logits, temperature, top_p, top_k)
    assert torch.allclose(probs.sum(-1), torch.ones(256))
    for seed in range(3):
        ref, _ = sample_next_tokens(logits, params, torch.Generator().manual_seed(seed))
        u = torch.rand(256, generator=torch.Generator().manual_seed(seed))
        assert torch.equal(sample_from_probs(probs, u), ref)


def test_target_probs_greedy_is_one_hot_argmax_with_sampler_tie_breaking():
    logits = torch.tensor([[0.0, 2.0, 2.0, 1.0], [5.0, 5.0, 5.0, 5.0], [-1.0, -3.0, -1.0, -2.0]])
    ref, _ = sample_next_tokens(logits, SamplingParams(temperature=0.0))
    probs = target_probs(logits, 0.0)
    assert torch.equal(probs, torch.eye(4)[[1, 0, 0]])  # first maximal index
    assert torch.equal(probs.argmax(-1), ref)


def test_target_probs_zeroes_filtered_tokens_and_handles_extra_dims():
    # top-k 2 of softmax([3, 1, 2, 0]) keeps tokens 0 and 2: e^3 / (e^3 + e^2) = 0.7311
    probs = target_probs(torch.tensor([[[3.0, 1.0, 2.0, 0.0]]]), 1.0, top_k=2)  # [1, 1, 4]
    assert probs.shape == (1, 1, 4)
    assert torch.allclose(probs, torch.tensor([[[0.7311, 0.0, 0.2689, 0.0]]]), atol=1e-4)


# ---------------------------------------------------------------------------------------------
# chains: hand examples


def greedy_targets(argmaxes: list[list[int]], vocab: int = 5) -> torch.Tensor:
    return torch.eye(vocab)[torch.tensor(argmaxes)]  # [n, K+1, V]


def test_greedy_chain_accept_lengths_and_bonus():
    draft = torch.tensor([[1, 2, 3], [1, 2, 3], [4, 2, 3], [1, 2, 0]])  # [4, 3]
    tp = greedy_targets([[1, 2, 3, 4], [1, 0, 3, 4], [1, 2, 3, 4], [1, 2, 3, 4]])  # [4, 4, 5]
    res = verify_chain(draft, None, tp, torch.Generator().manual_seed(0))
    # row 0: all 3 accepted + bonus argmax 4; row 1: 1 accepted then argmax 0;
    # row 2: first draft wrong -> emit argmax 1; row 3: 2 accepted, 0 != 3 -> emit 3
    assert res.num_accepted.tolist() == [3, 1, 0, 2]
    assert res.next_token.tolist() == [4, 0, 1, 3]
    em = chain_emitted(draft, res.num_accepted, res.next_token)
    assert em.tolist() == [[1, 2, 3, 4], [1, 0, -1, -1], [1, -1, -1, -1], [1, 2, 3, -1]]
    # with sampled-draft probabilities the greedy result is the same
    q = torch.full((4, 3, 5), 0.2)
    res_q = verify_chain(draft, q, tp, torch.Generator().manual_seed(1))
    assert res_q.num_accepted.tolist() == [3, 1, 0, 2] and res_q.next_token.tolist() == [4, 0, 1, 3]


def test_chain_num_drafts_truncates_rows_and_draws_from_full_p():
    draft = torch.tensor([[1, 2, 3], [1, 2, 3]])
    tp = greedy_targets([[1, 2, 3, 4], [1, 2, 3, 4]])
    res = verify_chain(draft, None, tp, num_drafts=torch.tensor([3, 1]))
    assert res.num_accepted.tolist() == [3, 1]
    assert res.next_token.tolist() == [4, 2]  # row 1 stops after 1 draft: argmax after it is 2


def test_chain_point_mass_rejection_never_re_emits_the_rejected_token():
    # p = [0.5, 0.5]; draft token 0 is rejected with prob 0.5 and then token 1 must be emitted
    tp = torch.tensor([[0.5, 0.5], [1.0, 0.0]]).expand(4000, 2, 2)
    res = verify_chain(torch.zeros(4000, 1, dtype=torch.long), None, tp, torch.Generator().manual_seed(0))
    rejected = res.num_accepted == 0
    assert torch.all(res.next_token[rejected] == 1)
    assert 0.45 < rejected.float().mean() < 0.55
    assert torch.all(res.next_token[~rejected] == 0)  # bonus after token 0 is one-hot 0


def test_chain_draft_with_zero_target_probability_is_always_rejected():
    tp = torch.tensor([[0.0, 0.3, 0.7], [1.0, 0.0, 0.0]]).expand(500, 2, 3)
    q = torch.tensor([[[0.9, 0.05, 0.05]]]).expand(500, 1, 3)
    res = verify_chain(torch.zeros(500, 1, dtype=torch.long), q, tp, torch.Generator().manual_seed(0))
    assert torch.all(res.num_accepted == 0) and torch.all(res.next_token != 0)


def test_chain_shape_errors():
    with pytest.raises(ValueError, match=r"target_probs must be \[n, K\+1, V\]"):
        verify_chain(torch.zeros(2, 3, dtype=torch.long), None, torch.rand(2, 3, 5))
    with pytest.raises(ValueError, match="draft_probs must be"):
        verify_chain(torch.zeros(2, 3, dtype=torch.long), torch.rand(2, 3, 4), torch.rand(2, 4, 5))


def test_chain_with_no_drafts_is_plain_sampling():
    tp = torch.tensor([[[0.1, 0.2, 0.7]]]).expand(7, 1, 3)
    res = verify_chain(torch.zeros(7, 0, dtype=torch.long), None, tp, torch.Generator().manual_seed(5))
    u = torch.rand(7, generator=torch.Generator().manual_seed(5))  # K = 0: only the final draw
    assert res.num_accepted.tolist() == [0] * 7
    assert torch.equal(res.next_token, sample_from_probs(tp[:, 0], u))


# ---------------------------------------------------------------------------------------------
# chains: statistical losslessness


@pytest.mark.parametrize(
    "label,seed,proc,point_mass,greedy_drafter",
    [
        ("chain sampled-q", 11, (1.0, 1.0, 0), False, False),
        ("chain sampled-q T=0.7 top_p=0.85 top_k=4", 12, (0.7, 0.85, 4), False, False),
        ("chain point-mass sampled drafts", 13, (1.0, 1.0, 0), True, False),
        ("chain point-mass greedy drafter T=1.2 top_k=3", 14, (1.2, 1.0, 3), True, True),
    ],
)
def test_chain_is_lossless(label, seed, proc, point_mass, greedy_drafter):
    P, Q = tables(seed, *proc)
    g = torch.Generator().manual_seed(100 + seed)
    p1, p2 = check_lossless(
        lambda s: chain_round(s, P, Q, g, point_mass=point_mass, greedy_drafter=greedy_drafter), P, label
    )
    assert p1 > ALPHA and p2 > ALPHA


def coupled(draft, q, tp, g):
    """The coupled verifier with fresh uniform numbers per position (the drafts never see them)."""
    n, k = draft.shape
    return verify_chain_coupled(draft, tp, torch.rand(n, k + 1, generator=g, dtype=torch.float64))


@pytest.mark.parametrize("seed,proc,greedy_drafter", [(21, (1.0, 1.0, 0), False), (22, (0.8, 0.9, 4), True)])
def test_coupled_chain_is_lossless_and_accepts_with_the_target_probability(seed, proc, greedy_drafter):
    P, Q = tables(seed, *proc)
    g = torch.Generator().manual_seed(200 + seed)
    p1, p2 = check_lossless(lambda s: chain_round(s, P, Q, g, point_mass=True, greedy_drafter=greedy_drafter,
                                                  verifier=coupled), P, f"coupled {seed}")
    assert p1 > ALPHA and p2 > ALPHA
    # a one-token draft x is accepted with probability p(x), as in verify_chain's point-mass rule
    x = torch.full((ROWS, 1), 2)
    tp = P[torch.cat([torch.full((ROWS, 1), START), x], 1)]
    rate = coupled(x, None, tp, g).num_accepted.double().mean().item()
    assert abs(rate - P[START, 2].item()) < 4 * (P[START, 2].item() / ROWS) ** 0.5 + 1e-3


def test_coupled_chain_emits_the_plain_samples_of_its_positions():
    """Whatever is drafted, the emitted tokens are inverse_cdf(p_i, u_i) of the positions reached."""
    P, _ = tables(23)
    g = torch.Generator().manual_seed(7)
    state = torch.randint(0, V, (500,), generator=g)
    u = torch.rand(500, 4, generator=g, dtype=torch.float64)
    plain, prev = [], state
    for i in range(4):  # plain decoding with the same numbers
        prev = sample_from_probs(P[prev], u[:, i])
        plain.append(prev)
    plain = torch.stack(plain, 1)  # [n, 4]
    wrong = (plain[:, :3] + torch.randint(0, 2, (500, 3), generator=g)) % V  # drafts right about half the time
    tp = P[torch.cat([state[:, None], wrong], 1)]
    res = verify_chain_coupled(wrong, tp, u)
    emitted = chain_emitted(wrong, res.num_accepted, res.next_token)
    for r in range(500):
        a = int(res.num_accepted[r])
        assert emitted[r, : a + 1].tolist() == plain[r, : a + 1].tolist()
    assert 0 < res.num_accepted.double().mean() < 3


def accept_always(draft, q, tp, g):
    n, k = draft.shape
    nxt = sample_from_probs(tp[:, k], torch.rand(n, generator=g))
    return ChainVerifyResult(torch.full((n,), k), nxt)


def resample_from_p_instead_of_residual(draft, q, tp, g):
    res = verify_chain(draft, q, tp, g)  # correct acceptances ...
    n = draft.shape[0]
    nxt = sample_from_probs(tp[torch.arange(n), res.num_accepted], torch.rand(n, generator=g))  # ... wrong resampling
    return ChainVerifyResult(res.num_accepted, nxt)


@pytest.mark.parametrize("wrong", [accept_always, resample_from_p_instead_of_residual])
def test_chi_square_test_detects_wrong_chain_verifiers(wrong):
    P, Q = tables(11)
    g = torch.Generator().manual_seed(111)
    p1, p2 = check_lossless(lambda s: chain_round(s, P, Q, g, verifier=wrong), P, f"NEGATIVE {wrong.__name__}")
    assert min(p1, p2) < 1e-6


# ---------------------------------------------------------------------------------------------
# trees: hand examples


def test_tree_mask_and_positions_by_hand():
    #        root
    #       /    \
    #      0      1
    #     / \      \
    #    2   3      4
    #    |
    #    5
    parents = torch.tensor([-1, -1, 0, 0, 1, 2])
    mask = tree_attention_mask(parents).int()
    assert mask.tolist() == [
        [1, 0, 0, 0, 0, 0],
        [0, 1, 0, 0, 0, 0],
        [1, 0, 1, 0, 0, 0],
        [1, 0, 0, 1, 0, 0],
        [0, 1, 0, 0, 1, 0],
        [1, 0, 1, 0, 0, 1],
    ]
    assert tree_positions(parents).tolist() == [1, 1, 2, 2, 2, 3]
    with_root = tree_attention_mask(parents, include_root=True).int()
    assert with_root.shape == (7, 7)
    assert with_root[:, 0].tolist() == [1] * 7 and with_root[0].tolist() == [1, 0, 0, 0, 0, 0, 0]
    assert torch.equal(with_root[1:, 1:], mask)
    # batched parents, and a chain
    batched = torch.stack([parents, chain_parents(6)])
    assert tree_positions(batched).tolist() == [[1, 1, 2, 2, 2, 3], [1, 2, 3, 4, 5, 6]]
    assert torch.equal(tree_attention_mask(chain_parents(4)), torch.ones(4, 4, dtype=torch.bool).tril())


def test_tree_parents_must_be_topological():
    with pytest.raises(ValueError, match="topological"):
        tree_attention_mask(torch.tensor([-1, 2, 0]))
    with pytest.raises(ValueError, match="topological"):
        tree_positions(torch.tensor([-2, 0]))


def test_greedy_tree_path_choice():
    # tree: root -> {0: tok 3, 1: tok 2, 2: tok 2}; 1 -> {3: tok 4, 4: tok 1}; 2 -> {5: tok 0}
    parents = torch.tensor([-1, -1, -1, 1, 1, 2])
    tokens = torch.tensor([[3, 2, 2, 4, 1, 0], [3, 2, 2, 4, 1, 0], [3, 2, 2, 4, 1, 0]])
    # greedy target argmax after: root, node0..node5
    argmax = [
        [
            2,
            0,
            1,
            0,
            4,
            4,
            4,
        ],  # root->2: first child with token 2 is node 1; after node1 argmax 1 -> node 4; leaf, bonus 4
        [4, 0, 3, 0, 0, 0, 0],  # root->4: no child has token 4 -> emit 4, nothing accepted
        [2, 0, 0, 0, 0, 0, 0],  # root->2 -> node 1; after node 1 argmax 0: children tokens 4, 1 -> rejected, emit 0
    ]
    tp = torch.eye(5)[torch.tensor(argmax)]  # [3, 7, 5]
    res = verify_tree(tokens, parents, tp, torch.Generator().manual_seed(0))
    assert res.num_accepted.tolist() == [2, 0, 1]
    assert res.accepted_path.tolist() == [[1, 4], [-1, -1], [1, -1]]
    assert res.next_token.tolist() == [4, 4, 0]
    assert tree_emitted(tokens, res.accepted_path, res.num_accepted, res.next_token).tolist() == [
        [2, 1, 4],
        [4, -1, -1],
        [2, 0, -1],
    ]
    # valid mask: dropping node 1 in row 0 removes its subtree, node 2 (also token 2) is taken instead
    valid = torch.ones(3, 6, dtype=torch.bool)
    valid[0, 1] = False
    res_v = verify_tree(tokens, parents, tp, torch.Generator().manual_seed(0), valid)
    # after node 2 the argmax is 0 = token of its child node 5 (accepted); node 5 is a leaf: bonus argmax 4
    assert res_v.accepted_path[0].tolist() == [2, 5] and res_v.num_accepted[0].item() == 2
    assert res_v.next_token[0].item() == 4


def test_tree_with_chain_parents_matches_greedy_chain():
    draft = torch.tensor([[1, 2, 3], [1, 0, 3], [4, 2, 3]])
    tp = greedy_targets([[1, 2, 3, 4], [1, 2, 3, 4], [1, 2, 3, 4]])
    chain = verify_chain(draft, None, tp)
    tree = verify_tree(draft, chain_parents(3), tp)
    assert torch.equal(chain.num_accepted, tree.num_accepted) and torch.equal(chain.next_token, tree.next_token)
    assert tree.accepted_path.tolist() == [[0, 1, 2], [0, -1, -1], [-1, -1, -1]]


def test_tree_with_no_valid_nodes_is_plain_sampling():
    tp = torch.rand(5, 4, 6)
    res = verify_tree(
        torch.zeros(5, 3, dtype=torch.long),
        torch.tensor([-1, 0, 0]),
        tp,
        torch.Generator().manual_seed(2),
        torch.zeros(5, 3, dtype=torch.bool),
    )
    assert res.num_accepted.tolist() == [0] * 5 and res.accepted_path.shape == (5, 0)
    assert torch.equal(
        res.next_token, sample_from_probs(tp[:, 0], torch.rand(5, generator=torch.Generator().manual_seed(2)))
    )


def test_tree_shape_errors():
    with pytest.raises(ValueError, match=r"target_probs must be \[n, N\+1, V\]"):
        verify_tree(torch.zeros(2, 3, dtype=torch.long), torch.tensor([-1, 0, 0]), torch.rand(2, 3, 5))
    with pytest.raises(ValueError, match="parents must be"):
        verify_tree(torch.zeros(2, 3, dtype=torch.long), torch.tensor([-1, 0]), torch.rand(2, 4, 5))


# ---------------------------------------------------------------------------------------------
# trees: statistical losslessness


@pytest.mark.parametrize(
    "label,seed,proc,duplicates,drop",
    [
        ("tree point-mass", 21, (1.0, 1.0, 0), False, 0.0),
        ("tree point-mass T=0.7 top_p=0.85 top_k=4", 22, (0.7, 0.85, 4), False, 0.0),
        ("tree duplicate siblings + dropped nodes", 23, (1.0, 1.0, 0), True, 0.3),
        ("tree T=1.5 top_p=0.7", 24, (1.5, 0.7, 0), False, 0.2),
    ],
)
def test_tree_is_lossless(label, seed, proc, duplicates, drop):
    P, Q = tables(seed, *proc)
    g = torch.Generator().manual_seed(200 + seed)
    p1, p2 = check_lossless(lambda s: tree_round(s, P, Q, g, duplicates=duplicates, drop=drop), P, label)
    assert p1 > ALPHA and p2 > ALPHA


def accept_first_child(tokens, parents, tp, g, valid):
    """Wrong: always descend into the first child (a 'trust the drafter' verifier)."""
    n = tokens.shape[0]
    path = torch.tensor([[0, 3]]).expand(n, 2)
    nxt = sample_from_probs(tp[:, 4], torch.rand(n, generator=g))
    return TreeVerifyResult(path, torch.full((n,), 2), nxt)


def accept_if_token_is_argmax(tokens, parents, tp, g, valid):
    """Wrong under sampling: greedy verification (SGLang's fallback without the tree kernel)."""
    return verify_tree(tokens, parents, target_probs(tp.log(), 0.0), g, valid)


@pytest.mark.parametrize("wrong", [accept_first_child, accept_if_token_is_argmax])
def test_chi_square_test_detects_wrong_tree_verifiers(wrong):
    P, Q = tables(21)
    g = torch.Generator().manual_seed(221)
    p1, p2 = check_lossless(lambda s: tree_round(s, P, Q, g, verifier=wrong), P, f"NEGATIVE {wrong.__name__}")
    assert min(p1, p2) < 1e-6


# ---------------------------------------------------------------------------------------------
# EAGLE-2 tree builder


def test_tree_builder_hand_example():
    b = TreeBuilder(topk=2, depth=3, num_verify=4)
    assert b.frontier().nodes.tolist() == [[-1]] and b.frontier().depth.tolist() == [[0]]
    lg = lambda *p: torch.log(torch.tensor(p, dtype=torch.float64))  # noqa: E731
    b.expand(torch.tensor([[[10, 11]]]), lg(0.5, 0.4).view(1, 1, 2))
    f = b.frontier()
    assert f.tokens.tolist() == [[10, 11]] and f.depth.tolist() == [[1, 1]]
    # level 2: under 10 (0.5): 12 (x0.9=.45), 13 (x0.1=.05); under 11 (0.4): 14 (x0.6=.24), 15 (x0.4=.16)
    b.expand(torch.tensor([[[12, 13], [14, 15]]]), lg(0.9, 0.1, 0.6, 0.4).view(1, 2, 2))
    f = b.frontier()
    assert f.tokens.tolist() == [[12, 14]]  # top-2 of level 2 by cumulative prob (.45, .24)
    assert f.depth.tolist() == [[2, 2]]
    assert torch.allclose(f.scores.exp(), torch.tensor([[0.45, 0.24]], dtype=torch.float64))
    # level 3: under 12 (.45): 16 (x0.8=.36), 17 (x0.2=.09); under 14 (.24): 18 (x1.0=.24), 19 (x0=0)
    b.expand(
        torch.tensor([[[16, 17], [18, 19]]]), torch.log(torch.tensor([[[0.8, 0.2], [1.0, 0.0]]], dtype=torch.float64))
    )
    assert b.done
    with pytest.raises(RuntimeError, match="finalize"):
        b.expand(torch.zeros(1, 2, 2, dtype=torch.long), torch.zeros(1, 2, 2))
    # all scores: 10 .5, 11 .4, 12 .45, 13 .05, 14 .24, 15 .16, 16 .36, 17 .09, 18 .24, 19 0
    # top-4: 10 (.5), 12 (.45), 11 (.4), 16 (.36) -> creation order 10, 11, 12, 16
    t = b.finalize()
    assert t.tokens.tolist() == [[10, 11, 12, 16]]
    assert t.parents.tolist() == [[-1, -1, 0, 2]]
    assert t.depth.tolist() == [[1, 1, 2, 3]]
    assert torch.equal(tree_positions(t.parents[0]), t.depth[0])


def test_tree_builder_keeps_ancestors_and_the_best_nodes_on_random_batches():
    g = torch.Generator().manual_seed(0)
    arm = ArmShape(5, 3, 12)
    b = TreeBuilder.from_arm(arm, batch_size=16)
    while not b.done:
        f = b.frontier()
        logp = torch.log_softmax(torch.randn(16, f.nodes.shape[1], 20, generator=g) * 2, -1)
        top = logp.topk(arm.topk, dim=-1)
        b.expand(top.indices, top.values)
    assert b.tokens.shape == (16, arm.max_nodes)  # 3 + 4 * 9 = 39 nodes built
    t = b.finalize()
    assert t.tokens.shape == (16, 12)
    for r in range(16):
        par = t.parents[r]
        assert torch.all(par < torch.arange(12))  # topological, ancestors kept
        assert torch.equal(tree_positions(par), t.depth[r])
        # the kept scores are the 12 best of all built nodes
        assert torch.allclose(t.scores[r].sort(descending=True).values, b.scores[r].sort(descending=True).values[:12])
        # a child's cumulative score = parent's + its own log-prob <= parent's
        has = par >= 0
        assert torch.all(t.scores[r][has] <= t.scores[r][par[has]])


def test_tree_builder_chain_arm_gives_a_chain_and_validates_inputs():
    b = TreeBuilder(topk=1, depth=3, num_verify=3, batch_size=2)
    for step in range(3):
        b.expand(torch.tensor([[[step]], [[step + 10]]]), torch.full((2, 1, 1), -0.5))
    t = b.finalize()
    assert t.parents.tolist() == [[-1, 0, 1], [-1, 0, 1]] and t.tokens.tolist() == [[0, 1, 2], [10, 11, 12]]
    b2 = TreeBuilder(topk=2, depth=2, num_verify=3)
    with pytest.raises(ValueError, match=r"\[n, F, topk\]"):
        b2.expand(torch.zeros(1, 1, 3, dtype=torch.long), torch.zeros(1, 1, 3))
    with pytest.raises(ValueError, match="<= 0"):
        b2.expand(torch.zeros(1, 1, 2, dtype=torch.long), torch.tensor([[[0.1, -1.0]]]))
    with pytest.raises(ValueError, match="num_verify"):
        TreeBuilder(topk=2, depth=2, num_verify=7)  # only 2 + 4 = 6 nodes exist


def test_arm_shape_parse_and_problems():
    assert ArmShape.parse("8_4_48") == ArmShape(8, 4, 48) and str(ArmShape(8, 4, 48)) == "8_4_48"
    assert ArmShape.parse([3, 1, 3]).is_chain
    with pytest.raises(ValueError, match="depth_topk_numverify"):
        ArmShape.parse("8-4-48")
    assert ArmShape(4, 1, 4).problems() == []
    assert any("num_verify (5) >" in s for s in ArmShape(4, 1, 5).problems())
    assert any("num_verify (2) < depth (4)" in s for s in ArmShape(4, 2, 2).problems())
    assert any("topk must be" in s for s in ArmShape(4, 0, 4).problems())
