"""HBPO (arXiv 2507.15844) and BRPO (arXiv 2505.13438) advantages, the extra-input dispatch and the
REINFORCE++-baseline aliases, against hand computations and loop ports of the released code."""

import math

import pytest
import torch

from rlspec.errors import ConfigError
from rlspec.trainers.advantages import (
    ADVANTAGE_ESTIMATORS,
    batch_normalized_advantages,
    brpo_returns_and_baseline,
    compute_advantages,
    estimator_inputs,
    grpo_advantages,
    hbpo_advantages,
)


def _f2(b: float) -> float:  # HBPO code: beta = 4, L_max = 4096, pi hard-coded as 3.1416
    return 4 * math.cos(3.1416 * b / 8192)


# ----------------------------------------------------------------------------- HBPO
def test_hbpo_hand_computed():
    # one prompt, budgets 512 (rewards 3, 1) and 2048 (rewards 2, 0); f2 = 3 and 0.5 (simple numbers)
    # group mean 1.5; deviations 1.5, -.5, .5, -1.5; unbiased var = 5/3; std = 1.290994
    # inter = [1.161895, -0.387298, 0.387298, -1.161895]
    # intra: budget 512: mean 2 - 3 = -1; budget 2048: mean 1 - 0.5 = 0.5
    rewards = torch.tensor([3.0, 1.0, 2.0, 0.0])
    groups = torch.tensor([0, 0, 0, 0])
    budgets = torch.tensor([512.0, 512.0, 2048.0, 2048.0])
    f2 = torch.tensor([3.0, 3.0, 0.5, 0.5])
    inter = torch.tensor([1.161895, -0.387298, 0.387298, -1.161895])
    intra = torch.tensor([-1.0, -1.0, 0.5, 0.5])
    paper = hbpo_advantages(rewards, groups, budgets, f2)
    torch.testing.assert_close(paper, intra + inter, atol=1e-5, rtol=0)
    code = hbpo_advantages(rewards, groups, budgets, f2, variant="code")
    torch.testing.assert_close(code, 2 * intra + inter, atol=1e-5, rtol=0)
    no_std = hbpo_advantages(rewards, groups, budgets, f2, norm_by_std=False)
    torch.testing.assert_close(no_std, intra + torch.tensor([1.5, -0.5, 0.5, -1.5]), atol=1e-6, rtol=0)


def test_hbpo_subgroups_do_not_mix_prompts_and_singleton_group_has_no_intra():
    # prompt 7: budget 512 rewards (2, 4) f2 = 1 -> intra 2; prompt 3: same budget, rewards (0, 0) -> intra -1
    # prompt 9: a single response -> intra 0 (released code), inter = R (mean 0, std 1) -> 5 / (1 + eps)
    rewards = torch.tensor([2.0, 4.0, 0.0, 0.0, 5.0])
    groups = torch.tensor([7, 7, 3, 3, 9])
    budgets = torch.full((5,), 512.0)
    f2 = torch.ones(5)
    adv = hbpo_advantages(rewards, groups, budgets, f2)
    # prompt 7 inter: (2-3)/sqrt(2), (4-3)/sqrt(2); prompt 3 inter: 0
    expected = torch.tensor([2 - 1 / math.sqrt(2), 2 + 1 / math.sqrt(2), -1.0, -1.0, 5.0])
    torch.testing.assert_close(adv, expected, atol=1e-5, rtol=0)


def _loop_hbpo_code(rewards, groups, budgets, eps=1e-6):
    """Port of HBPO's compute_grpo_outcome_advantage for groups of >= 2 (f2 = 4 cos(3.1416 b / 8192))."""
    out = []
    for i in range(len(rewards)):
        members = [j for j in range(len(rewards)) if groups[j] == groups[i]]
        scores = torch.tensor([rewards[j] for j in members], dtype=torch.float64)
        inter = (rewards[i] - scores.mean()) / (torch.std(scores) + eps)
        sub = [rewards[j] for j in members if budgets[j] == budgets[i]]
        aintra = sum(sub) / len(sub) - 4 * math.cos(3.1416 * budgets[i] / 8192)
        out.append(float(inter + aintra + aintra))
    return torch.tensor(out)


@pytest.mark.parametrize("seed", [0, 1])
def test_hbpo_code_variant_matches_released_loop(seed):
    g = torch.Generator().manual_seed(seed)
    budget_set = torch.tensor([512.0, 1024.0, 2048.0, 2560.0])
    groups = torch.arange(3).repeat_interleave(16)  # 3 prompts x 16 rollouts, 4 per budget
    budgets = budget_set.repeat_interleave(4).repeat(3)
    rewards = torch.rand(48, generator=g) * 4 - 1
    f2 = torch.tensor([_f2(b) for b in budgets.tolist()])
    got = hbpo_advantages(rewards, groups, budgets, f2, variant="code")
    ref = _loop_hbpo_code(rewards.tolist(), groups.tolist(), budgets.tolist())
    torch.testing.assert_close(got, ref.float(), atol=1e-5, rtol=1e-5)
    # paper = code minus one intra term
    paper = hbpo_advantages(rewards, groups, budgets, f2)
    assert not torch.allclose(paper, got)


def test_hbpo_input_errors():
    r, g = torch.zeros(4), torch.zeros(4, dtype=torch.long)
    with pytest.raises(ValueError, match="f2_baseline differs within a"):
        hbpo_advantages(r, g, torch.full((4,), 512.0), torch.tensor([1.0, 2.0, 1.0, 1.0]))
    with pytest.raises(ValueError, match=r"budgets must have shape \[B\]=\[4\]"):
        hbpo_advantages(r, g, torch.zeros(3), torch.zeros(4))
    with pytest.raises(ValueError, match="variant must be 'paper' or 'code'"):
        hbpo_advantages(r, g, torch.zeros(4), torch.zeros(4), variant="released")


# ----------------------------------------------------------------------------- dispatch
def test_compute_advantages_forwards_extra_inputs():
    rewards = torch.tensor([3.0, 1.0, 2.0, 0.0])
    groups = torch.zeros(4, dtype=torch.long)
    extra = {"budgets": torch.tensor([512.0, 512.0, 2048.0, 2048.0]), "f2_baseline": torch.tensor([3.0, 3.0, 0.5, 0.5])}
    lengths = torch.tensor([10.0, 20.0, 30.0, 40.0])  # the trainer passes lengths; hbpo ignores them
    got = compute_advantages("hbpo", rewards, groups, response_lengths=lengths, extra=extra)
    torch.testing.assert_close(got, hbpo_advantages(rewards, groups, **extra))
    code = compute_advantages("hbpo_code", rewards, groups, extra=extra)
    torch.testing.assert_close(code, hbpo_advantages(rewards, groups, **extra, variant="code"))
    # an estimator that needs no extra inputs ignores them; existing callers work unchanged
    torch.testing.assert_close(compute_advantages("grpo", rewards, groups, extra=extra), grpo_advantages(rewards, groups))
    torch.testing.assert_close(compute_advantages("grpo", rewards, groups), grpo_advantages(rewards, groups))


def test_compute_advantages_missing_input_names_the_config_key():
    rewards, groups = torch.tensor([1.0, 0.0]), torch.tensor([0, 0])
    with pytest.raises(ConfigError, match=r"trainer\.adv_estimator='hbpo' needs .*budgets, f2_baseline"):
        compute_advantages("hbpo", rewards, groups)
    with pytest.raises(ConfigError, match=r"trainer\.adv_estimator='hbpo' needs .*f2_baseline"):
        compute_advantages("hbpo", rewards, groups, extra={"budgets": torch.ones(2)})
    assert estimator_inputs("hbpo") == (["budgets", "f2_baseline"], ["variant", "eps"])
    assert estimator_inputs("batch_norm") == ([], ["eps"])


def test_reinforce_pp_baseline_aliases():
    for name in ("reinforce_plus_plus_baseline", "reinforce_pp_baseline", "batch_norm"):
        assert ADVANTAGE_ESTIMATORS.get(name) is batch_normalized_advantages
    rewards, groups = torch.tensor([1.0, 0.0, 1.0, 1.0]), torch.tensor([0, 0, 1, 1])
    torch.testing.assert_close(
        compute_advantages("reinforce_plus_plus_baseline", rewards, groups),
        torch.tensor([1.224745, -1.224745, 0.0, 0.0]), atol=1e-5, rtol=0,
    )


# ----------------------------------------------------------------------------- BRPO
def test_brpo_hand_computed_three_cuts():
    # S = 3, prior p = [.2, .3, .5] (tail mass [1, .8, .5]); one prompt, two rollouts
    #   a: r = [0, 1, 1] -> G_a = [.8, .8, .5];  b: r = [0, 0, 1] -> G_b = [.5, .5, .5]
    #   V2 = [.65, .65, .5]
    #   V1_a: s=0: 0 (empty past); s=1: past r_0 = 0 -> 0; s=2: (1*0 + 2*1)/(1+2) * .5 = 1/3
    #   V1_b: 0, 0, (1*0 + 2*0)/3 * .5 = 0
    #   V_a = [(0 + 3*.65)/3, (1*0 + 2*.65)/3, (2/3 + .5)/3] = [.65, .433333, .388889]
    #   V_b = [.65, .433333, (0 + .5)/3 = .166667]
    rewards = torch.tensor([[0.0, 1.0, 1.0], [0.0, 0.0, 1.0]])
    G, V, A = brpo_returns_and_baseline(rewards, torch.tensor([0.2, 0.3, 0.5]), torch.tensor([4, 4]))
    torch.testing.assert_close(G, torch.tensor([[0.8, 0.8, 0.5], [0.5, 0.5, 0.5]]), atol=1e-6, rtol=0)
    torch.testing.assert_close(V, torch.tensor([[0.65, 1.3 / 3, 7 / 18], [0.65, 1.3 / 3, 1 / 6]]), atol=1e-6, rtol=0)
    torch.testing.assert_close(A, torch.tensor([[0.15, 0.8 - 1.3 / 3, 0.5 - 7 / 18], [-0.15, 0.5 - 1.3 / 3, 1 / 3]]),
                               atol=1e-6, rtol=0)
    # an unnormalised prior is normalised (as in the released code)
    _, _, A2 = brpo_returns_and_baseline(rewards, torch.tensor([2.0, 3.0, 5.0]), torch.tensor([4, 4]))
    torch.testing.assert_close(A2, A)


def test_brpo_singleton_group_has_no_v2_and_groups_are_separate():
    # S = 2, uniform prior; group 0 = one rollout r = [1, 1] -> G = [1, .5], V2 = 0,
    # V1 = [0, 1 * .5] -> V = [(0 + 2*0)/2, (1*.5 + 1*0)/2] = [0, .25] -> A = [1, .25]
    # group 1 = r [1, 0] and [0, 0] -> G = [.5, 0], [0, 0]; V2 = [.25, 0]
    # V1 of [1, 0] at s=1: 1 * .5 = .5 -> V = [.25, (.5 + 0)/2 = .25] -> A = [.25, -.25]; [0, 0] -> V = [.25, 0]
    rewards = torch.tensor([[1.0, 1.0], [1.0, 0.0], [0.0, 0.0]])
    _, V, A = brpo_returns_and_baseline(rewards, torch.tensor([0.5, 0.5]), torch.tensor([0, 1, 1]))
    torch.testing.assert_close(A, torch.tensor([[1.0, 0.25], [0.25, -0.25], [-0.25, 0.0]]))
    torch.testing.assert_close(V, torch.tensor([[0.0, 0.25], [0.25, 0.25], [0.25, 0.0]]))


def _loop_brpo(scores, probs, G):
    """Port of AnytimeReasoner brpo.py::compute_cot_advantage (VARIANCE_REDUCTION='brpo'); scores [B, G, S]."""
    B, _, S = scores.shape
    probs = probs / probs.sum()
    disc = torch.pow(2.0, torch.arange(S, dtype=scores.dtype))
    adv = torch.zeros_like(scores)
    for b in range(B):
        for g in range(G):
            for s in range(S):
                ret = (scores[b, g, s:] * probs[s:]).sum()
                avg = (scores[b, :, s:] * probs[s:]).sum(dim=-1).mean() if G > 1 else 0
                last = 0
                if s > 0:
                    last = (scores[b, g, :s] * disc[:s]).sum() / disc[:s].sum() * probs[s:].sum()
                adv[b, g, s] = ret - (s * last + (S - s) * avg) / S
    return adv


@pytest.mark.parametrize("S", [1, 2, 4])
def test_brpo_matches_released_loop(S):
    gen = torch.Generator().manual_seed(S)
    scores = torch.rand(3, 4, S, generator=gen, dtype=torch.float64)  # 3 prompts x 4 rollouts x S cuts
    probs = torch.arange(1, S + 1, dtype=torch.float64)  # "linear" prior (∝ b)
    ref = _loop_brpo(scores, probs, 4).reshape(12, S)
    _, _, A = brpo_returns_and_baseline(scores.reshape(12, S), probs, torch.arange(3).repeat_interleave(4))
    torch.testing.assert_close(A, ref.float(), atol=1e-6, rtol=0)


def test_brpo_input_errors():
    r = torch.zeros(2, 3)
    with pytest.raises(ValueError, match=r"prior must have shape \[S\]=\[3\]"):
        brpo_returns_and_baseline(r, torch.ones(2), torch.zeros(2, dtype=torch.long))
    with pytest.raises(ValueError, match="non-negative and not all zero"):
        brpo_returns_and_baseline(r, torch.tensor([0.5, -0.5, 1.0]), torch.zeros(2, dtype=torch.long))
    with pytest.raises(ValueError, match="non-negative and not all zero"):
        brpo_returns_and_baseline(r, torch.zeros(3), torch.zeros(2, dtype=torch.long))
    with pytest.raises(ValueError, match=r"rewards_per_cut must have shape \[B, S\]"):
        brpo_returns_and_baseline(torch.zeros(3), torch.ones(3), torch.zeros(3, dtype=torch.long))


# ----------------------------------------------------------------------- AnytimeReasoner extras
def test_brpo_prior_formulas():
    from rlspec.trainers.advantages import brpo_prior

    # code set_training_split_plan with 8k and 4 budgets
    assert brpo_prior([2000, 4000, 6000, 8000], "uniform").tolist() == [0.25] * 4
    torch.testing.assert_close(brpo_prior([2000, 4000, 6000, 8000], "linear"),
                               torch.tensor([0.1, 0.2, 0.3, 0.4], dtype=torch.float64))
    assert brpo_prior([2000, 4000, 6000, 8000], "base").tolist() == [0.0, 0.0, 0.0, 1.0]
    with pytest.raises(ConfigError, match="anytime.prior='lin'"):
        brpo_prior([1, 2], "lin")


def test_brpo_variance_reduction_options():
    # same numbers as test_brpo_hand_computed_three_cuts: V1_a = [0, 0, 1/3], V2 = [.65, .65, .5]
    rewards = torch.tensor([[0.0, 1.0, 1.0], [0.0, 0.0, 1.0]])
    prior, groups = torch.tensor([0.2, 0.3, 0.5]), torch.tensor([4, 4])
    G, V, _ = brpo_returns_and_baseline(rewards, prior, groups, "v2only")
    torch.testing.assert_close(V, torch.tensor([[0.65, 0.65, 0.5], [0.65, 0.65, 0.5]]))
    _, V, _ = brpo_returns_and_baseline(rewards, prior, groups, "v1only")
    torch.testing.assert_close(V, torch.tensor([[0.0, 0.0, 1 / 3], [0.0, 0.0, 0.0]]))
    _, V, A = brpo_returns_and_baseline(rewards, prior, groups, "none")
    assert V.abs().sum() == 0 and torch.equal(A, G)
    with pytest.raises(ConfigError, match="anytime.variance_reduction"):
        brpo_returns_and_baseline(rewards, prior, groups, "v3")


def test_brpo_token_advantages_segments_and_collapsed_cuts():
    from rlspec.trainers.advantages import brpo_token_advantages

    # budgets 2/4/6 on a 5-token thinking: cuts [2, 4, 5]; segments [0,2) A0, [2,4) A1, [4,5) A2
    out = brpo_token_advantages(torch.tensor([0.5, -1.0, 2.0]), [2, 4, 5], 5)
    assert out.tolist() == [0.5, 0.5, -1.0, -1.0, 2.0]
    # thinking ended at 3 tokens: cuts [2, 3, 3]; the last segment takes A of the first collapsed cut
    out = brpo_token_advantages(torch.tensor([0.5, -1.0, 2.0]), [2, 3, 3], 3)
    assert out.tolist() == [0.5, 0.5, -1.0]
    with pytest.raises(ValueError, match="must end the thinking"):
        brpo_token_advantages(torch.tensor([1.0, 2.0]), [1, 2], 3)
    with pytest.raises(ValueError, match="non-decreasing"):
        brpo_token_advantages(torch.tensor([1.0, 2.0]), [2, 1], 2)


def test_brpo_summary_advantages():
    from rlspec.trainers.advantages import brpo_summary_advantages

    scores = torch.tensor([1.0, 0.0, 0.0, 0.0, 1.0, 1.0, 1.0, 0.0])
    pools = torch.tensor([0, 0, 0, 0, 1, 1, 1, 1])  # two pools of 4 summaries: means .25 and .75
    adv = brpo_summary_advantages(scores, pools, n_summary=4)
    torch.testing.assert_close(adv, torch.tensor([0.75, -0.25, -0.25, -0.25, 0.25, 0.25, 0.25, -0.75]))
    # grpo method: only the last cut's summaries keep an advantage
    cut = torch.tensor([0, 0, 0, 0, 1, 1, 1, 1])
    adv = brpo_summary_advantages(scores, pools, method="grpo", cut_index=cut, num_cuts=2, n_summary=4)
    torch.testing.assert_close(adv, torch.tensor([0.0, 0.0, 0.0, 0.0, 0.25, 0.25, 0.25, -0.75]))
    # n_summary = 1: baseline = the group's mean at the same cut (rollouts 0,1 of prompt 0; 2,3 of prompt 1)
    s1 = torch.tensor([1.0, 0.0, 1.0, 1.0])
    adv = brpo_summary_advantages(s1, torch.arange(4), cut_index=torch.zeros(4, dtype=torch.long),
                                  group_index=torch.tensor([0, 0, 1, 1]), n_summary=1)
    torch.testing.assert_close(adv, torch.tensor([0.5, -0.5, 0.0, 0.0]))
    assert brpo_summary_advantages(torch.zeros(0), torch.zeros(0, dtype=torch.long), n_summary=4).numel() == 0
