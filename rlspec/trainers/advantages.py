"""Advantage estimators for outcome rewards: one pure function each, registered by name.

Every estimator maps per-response scalar rewards to per-response advantages (all tokens of a
response share its advantage, as in GRPO / REINFORCE++ with outcome rewards).

Shapes: ``B`` = number of responses in the batch (prompts x group size).
"""

from __future__ import annotations

import inspect

import torch

from rlspec.errors import ConfigError
from rlspec.registry import ADVANTAGE_ESTIMATORS


def group_mean_std(rewards: torch.Tensor, group_index: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-response mean and (unbiased) std of the rewards in its group.

    Args:
        rewards: ``[B]`` float rewards.
        group_index: ``[B]`` long, the group (prompt) each response belongs to. Ids need not be
            contiguous or sorted.

    Returns:
        ``(mean, std)``, each ``[B]``. A group of one response has mean 0 and std 1 (verl's
        convention: a singleton group gives no baseline).
    """
    _, inverse, counts = torch.unique(group_index, return_inverse=True, return_counts=True)  # [G], [B], [G]
    num_groups = counts.numel()
    rewards = rewards.double()
    sums = torch.zeros(num_groups, dtype=rewards.dtype).index_add_(0, inverse, rewards)  # [G]
    means = sums / counts  # [G]
    sq_dev = (rewards - means[inverse]) ** 2  # [B]
    sq_sums = torch.zeros(num_groups, dtype=rewards.dtype).index_add_(0, inverse, sq_dev)  # [G]
    stds = torch.sqrt(sq_sums / (counts - 1).clamp(min=1))  # [G], unbiased like torch.std
    singleton = counts == 1
    means = torch.where(singleton, torch.zeros_like(means), means)
    stds = torch.where(singleton, torch.ones_like(stds), stds)
    return means[inverse].float(), stds[inverse].float()


@ADVANTAGE_ESTIMATORS.register("grpo")
def grpo_advantages(
    rewards: torch.Tensor,
    group_index: torch.Tensor,
    *,
    norm_by_std: bool = True,
    eps: float = 1e-6,
    response_lengths: torch.Tensor | None = None,
) -> torch.Tensor:
    """GRPO group-normalised advantage (DeepSeekMath, arXiv 2402.03300, Sec. 4.1.2).

    ``A_i = (R_i - mean_g(R)) / (std_g(R) + eps)``; with ``norm_by_std=False`` it is
    ``R_i - mean_g(R)`` (Dr. GRPO, arXiv 2503.20783, which drops the std to remove the
    difficulty bias). A group whose rewards are all equal gets advantage 0.

    >>> grpo_advantages(torch.tensor([1., 0., 0., 0.]), torch.tensor([0, 0, 0, 0]))
    tensor([ 1.5000, -0.5000, -0.5000, -0.5000])
    """
    del response_lengths  # same signature as the other estimators
    mean, std = group_mean_std(rewards, group_index)  # [B], [B]
    centered = rewards.float() - mean  # [B]
    if not norm_by_std:
        return centered
    return centered / (std + eps)


@ADVANTAGE_ESTIMATORS.register("dr_grpo")
def dr_grpo_advantages(
    rewards: torch.Tensor,
    group_index: torch.Tensor,
    *,
    norm_by_std: bool = False,
    eps: float = 1e-6,
    response_lengths: torch.Tensor | None = None,
) -> torch.Tensor:
    """Dr. GRPO (arXiv 2503.20783, Sec. 3.2): group mean subtracted, no std division."""
    del norm_by_std
    return grpo_advantages(rewards, group_index, norm_by_std=False, eps=eps, response_lengths=response_lengths)


@ADVANTAGE_ESTIMATORS.register("batch_norm")
def batch_normalized_advantages(
    rewards: torch.Tensor,
    group_index: torch.Tensor,
    *,
    norm_by_std: bool = True,
    eps: float = 1e-8,
    response_lengths: torch.Tensor | None = None,
) -> torch.Tensor:
    """DLER batch-wise reward normalisation = REINFORCE++-baseline (DLER arXiv 2510.15110, Eq. 3).

    ``s_i = R_i - mean_g(R)`` (group-mean baseline), then whiten ``s`` over the whole batch:
    ``A_i = (s_i - mean_batch(s)) / sqrt(var_batch(s) + eps)``.

    With ``response_lengths`` given, the batch statistics are **token-weighted** (each response
    counts once per token, with the unbiased token-count correction), which is what DLER's
    released code does through verl's ``masked_whiten``. Without it, every response counts once,
    as the paper writes Eq. 3. ``norm_by_std=False`` only centres.

    >>> batch_normalized_advantages(torch.tensor([1., 0., 1., 1.]), torch.tensor([0, 0, 1, 1]))
    tensor([ 1.2247, -1.2247,  0.0000,  0.0000])
    """
    mean, _ = group_mean_std(rewards, group_index)  # [B]
    s = rewards.double() - mean.double()  # [B]
    if response_lengths is None:
        weights = torch.ones_like(s)  # [B]
    else:
        weights = response_lengths.double().clamp(min=0)  # [B]
    total = weights.sum()
    batch_mean = (s * weights).sum() / total
    if not norm_by_std:
        return (s - batch_mean).float()
    var = ((s - batch_mean) ** 2 * weights).sum() / total
    if total > 1:
        var = var * total / (total - 1)  # unbiased, as torch.var / verl masked_var
    return ((s - batch_mean) * torch.rsqrt(var + eps)).float()


# verl's name for the same estimator (DLER's released config: algorithm.adv_estimator=reinforce_plus_plus_baseline)
ADVANTAGE_ESTIMATORS.register("reinforce_plus_plus_baseline")(batch_normalized_advantages)
ADVANTAGE_ESTIMATORS.register("reinforce_pp_baseline")(batch_normalized_advantages)


def _subgroup_mean(values: torch.Tensor, group_index: torch.Tensor, budgets: torch.Tensor) -> torch.Tensor:
    """Per-response mean of ``values`` over its subgroup (same group AND same budget). ``[B]`` float64."""
    keys = torch.stack([group_index.double(), budgets.double()], dim=1)  # [B, 2]
    _, inverse, counts = torch.unique(keys, dim=0, return_inverse=True, return_counts=True)  # [K, 2], [B], [K]
    sums = torch.zeros(counts.numel(), dtype=torch.float64).index_add_(0, inverse, values.double())  # [K]
    return (sums / counts)[inverse]  # [B]


@ADVANTAGE_ESTIMATORS.register("hbpo")
def hbpo_advantages(
    rewards: torch.Tensor,
    group_index: torch.Tensor,
    budgets: torch.Tensor,
    f2_baseline: torch.Tensor,
    *,
    variant: str = "paper",
    norm_by_std: bool = True,
    eps: float = 1e-6,
    response_lengths: torch.Tensor | None = None,
) -> torch.Tensor:
    """HBPO intra- plus inter-budget advantage (arXiv 2507.15844, Alg. 1, Eq. 4-5).

    Each prompt's rollouts are split into budget subgroups (e.g. 4 rollouts for each of the
    budgets 512, 1024, 2048, 2560). For response ``j`` of subgroup ``i`` (budget ``b_i``)::

        A^intra_i  = mean_{subgroup i}(R) - f2(b_i)          # budget-specific baseline
        A^inter_ij = (R_ij - mean_group(R)) / (std_group(R) + eps)   # over all n rollouts of q
        A_ij       = A^intra_i + A^inter_ij

    ``std`` is unbiased (``torch.std``), as in the released code. ``f2(b) = beta cos(pi b /
    (2 L_max))`` is the reward of a correct answer within budget ``b`` (reference §3.2); it is
    passed in per response (``f2_baseline``) so that this function stays independent of the
    reward constants (the released code hard-codes ``4 cos(3.1416 b / 8192)``).

    ``variant="code"`` reproduces the released ``compute_grpo_outcome_advantage``, which adds
    ``A^intra`` **twice** (``A = 2 A^intra + A^inter``; the statement ``scores[i] += aintra``
    runs inside the budget branch and again after it). ``"paper"`` (default) adds it once.
    ``norm_by_std=False`` drops the std from the inter term (Dr. GRPO style; not in HBPO).
    A group of a single response gets ``A^intra = 0`` (as in the code) and the verl singleton
    convention for the inter term (``mean 0, std 1``).

    Args:
        rewards: ``[B]`` float rewards.
        group_index: ``[B]`` long, the prompt of each response.
        budgets: ``[B]`` float, the budget (tokens) of each response's subgroup.
        f2_baseline: ``[B]`` float, ``f2(b)`` for each response's budget; must be equal within a
            subgroup.
        variant: ``"paper"`` or ``"code"``.
        response_lengths: ignored (same signature as the other estimators).

    Returns:
        ``[B]`` float32 advantages.

    >>> hbpo_advantages(torch.tensor([3., 1., 2., 0.]), torch.tensor([0, 0, 0, 0]),
    ...                 torch.tensor([512., 512., 2048., 2048.]), torch.tensor([3., 3., .5, .5]))
    tensor([ 0.1619, -1.3873,  0.8873, -0.6619])
    """
    del response_lengths
    if variant not in ("paper", "code"):
        raise ValueError(f"hbpo_advantages: variant must be 'paper' or 'code', got {variant!r}")
    b = rewards.shape[0]
    for name, t in (("rewards", rewards), ("group_index", group_index), ("budgets", budgets), ("f2_baseline", f2_baseline)):
        if t.dim() != 1 or t.shape[0] != b:
            raise ValueError(f"hbpo_advantages: {name} must have shape [B]=[{b}], got {list(t.shape)}")
    mean, std = group_mean_std(rewards, group_index)  # [B], [B]
    inter = rewards.double() - mean.double()  # [B]
    if norm_by_std:
        inter = inter / (std.double() + eps)
    f2 = f2_baseline.double()  # [B]
    f2_sub = _subgroup_mean(f2, group_index, budgets)  # [B]
    if not torch.allclose(f2, f2_sub, rtol=1e-6, atol=1e-6):
        raise ValueError(
            "hbpo_advantages: f2_baseline differs within a (group, budget) subgroup; it must be f2(b) of the "
            "response's budget b, the same for every response that shares a prompt and a budget"
        )
    intra = _subgroup_mean(rewards, group_index, budgets) - f2  # [B]
    _, inverse, counts = torch.unique(group_index, return_inverse=True, return_counts=True)  # [G], [B], [G]
    intra = torch.where(counts[inverse] == 1, torch.zeros_like(intra), intra)  # singleton group: no intra term
    times = 2.0 if variant == "code" else 1.0
    return (times * intra + inter).float()


@ADVANTAGE_ESTIMATORS.register("hbpo_code")
def hbpo_code_advantages(
    rewards: torch.Tensor,
    group_index: torch.Tensor,
    budgets: torch.Tensor,
    f2_baseline: torch.Tensor,
    *,
    norm_by_std: bool = True,
    eps: float = 1e-6,
    response_lengths: torch.Tensor | None = None,
) -> torch.Tensor:
    """:func:`hbpo_advantages` with ``variant="code"`` (the released code adds ``A^intra`` twice)."""
    return hbpo_advantages(
        rewards, group_index, budgets, f2_baseline,
        variant="code", norm_by_std=norm_by_std, eps=eps, response_lengths=response_lengths,
    )


BRPO_PRIORS = ("uniform", "linear", "base")
BRPO_VARIANCE_REDUCTION = ("brpo", "v1only", "v2only", "none")
BRPO_SUMMARY_METHODS = ("brpo", "grpo")


def brpo_prior(budgets: list[int] | tuple[int, ...], kind: str) -> torch.Tensor:
    """AnytimeReasoner's budget prior ``p_B`` over the cuts (arXiv 2505.13438 Sec. 3; code
    ``set_training_split_plan``): ``uniform`` ``1/S``, ``linear`` ``b_s / sum b``, ``base`` all mass
    on the last cut. Returns ``[S]`` float64 summing to 1.

    >>> brpo_prior([2000, 4000, 6000, 8000], "linear").tolist()
    [0.1, 0.2, 0.3, 0.4]
    """
    if kind not in BRPO_PRIORS:
        raise ConfigError(f"anytime.prior={kind!r} is not valid; choose one of: {', '.join(BRPO_PRIORS)}")
    b = torch.tensor([float(x) for x in budgets], dtype=torch.float64)
    if kind == "uniform":
        return torch.full_like(b, 1.0 / b.numel())
    if kind == "linear":
        return b / b.sum()
    out = torch.zeros_like(b)
    out[-1] = 1.0
    return out


def brpo_returns_and_baseline(
    rewards_per_cut: torch.Tensor,
    prior: torch.Tensor,
    group_index: torch.Tensor,
    variance_reduction: str = "brpo",
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """AnytimeReasoner / BRPO thinking-policy returns, baseline and advantages (arXiv 2505.13438).

    The thinking trace of each response is cut at budgets ``b_0 < ... < b_{S-1}``; ``r_s`` is the
    (mean summary) reward at cut ``s``, and ``p`` is the budget prior. With **0-based** cuts
    ``s = 0..S-1``::

        G_s  = sum_{k >= s} p_k r_k                                   # return from cut s on
        V1_s = (sum_{k < s} 2^k r_k / sum_{k < s} 2^k) * sum_{k >= s} p_k   # own discounted past
        V2_s = mean over the group (same prompt) of G_s
        V_s  = (s V1_s + (S - s) V2_s) / S
        A_s  = G_s - V_s                                              # no std normalisation

    Indexing: the reference writes ``s`` without saying where it starts; the released code
    (``verl/trainer/ppo/brpo.py::compute_cot_advantage``) loops ``for s in range(S)``, i.e. the
    0-based mapping above, so ``V1`` gets weight ``s`` = the number of past cuts and ``V1_0 = 0``
    (empty past) gets weight 0: ``V_0 = V2_0``. (Reading ``s`` 1-based would give weight ``1/S``
    to an empty past at the first cut.) The ``2^k`` ratio does not depend on where ``k`` starts.
    As in the code, the prior is normalised to sum to 1, and a group of one response has
    ``V2 = 0``. ``A[:, s]`` is the advantage of the thinking tokens between cut ``s-1`` and
    cut ``s`` (see :func:`brpo_token_advantages`).

    ``variance_reduction`` (the code's ablation switch): ``brpo`` (above), ``v1only`` (``V = V1``),
    ``v2only`` (``V = V2``: the GRPO-like group baseline) or ``none`` (``V = 0``).

    Args:
        rewards_per_cut: ``[B, S]`` float, ``r_s`` of each response at each cut.
        prior: ``[S]`` non-negative budget prior (uniform, linear ``∝ b``, or base = last cut only).
        group_index: ``[B]`` long, the prompt of each response.

    Returns:
        ``(returns G, baseline V, advantages A)``, each ``[B, S]`` float32.

    >>> G, V, A = brpo_returns_and_baseline(torch.tensor([[0., 1.], [0., 0.]]), torch.tensor([.5, .5]),
    ...                                     torch.tensor([0, 0]))
    >>> A  # G = [[.5, .5], [0, 0]]; V2 = [.25, .25]; V1 = 0 (past reward 0); V = [.25, .125]
    tensor([[ 0.2500,  0.3750],
            [-0.2500, -0.1250]])
    """
    if rewards_per_cut.dim() != 2:
        raise ValueError(f"brpo: rewards_per_cut must have shape [B, S], got {list(rewards_per_cut.shape)}")
    b, s_cuts = rewards_per_cut.shape
    if prior.dim() != 1 or prior.shape[0] != s_cuts:
        raise ValueError(f"brpo: prior must have shape [S]=[{s_cuts}], got {list(prior.shape)}")
    if group_index.dim() != 1 or group_index.shape[0] != b:
        raise ValueError(f"brpo: group_index must have shape [B]=[{b}], got {list(group_index.shape)}")
    p = prior.double()  # [S]
    if bool((p < 0).any()) or not bool(p.sum() > 0) or not bool(torch.isfinite(p).all()):
        raise ValueError(f"brpo: prior must be finite, non-negative and not all zero, got {prior.tolist()}")
    p = p / p.sum()
    r = rewards_per_cut.double()  # [B, S]
    returns = (r * p).flip(-1).cumsum(-1).flip(-1)  # [B, S]  G_s = sum_{k>=s} p_k r_k
    tail_p = p.flip(0).cumsum(0).flip(0)  # [S]  sum_{k>=s} p_k

    # V2: group mean of G_s (0 for a singleton group, as in the code)
    _, inverse, counts = torch.unique(group_index, return_inverse=True, return_counts=True)  # [G], [B], [G]
    sums = torch.zeros(counts.numel(), s_cuts, dtype=torch.float64).index_add_(0, inverse, returns)  # [G, S]
    v2 = (sums / counts[:, None])[inverse]  # [B, S]
    v2 = torch.where((counts[inverse] == 1)[:, None], torch.zeros_like(v2), v2)

    # V1: 2^k-weighted mean of the rewards at the past cuts k < s, times the remaining prior mass
    w = torch.pow(2.0, torch.arange(s_cuts, dtype=torch.float64) - (s_cuts - 1))  # [S], 2^k scaled to <= 1
    past_wr = torch.cat([torch.zeros(b, 1, dtype=torch.float64), (r * w).cumsum(-1)[:, :-1]], dim=1)  # [B, S]
    past_w = torch.cat([torch.ones(1, dtype=torch.float64), w.cumsum(0)[:-1]])  # [S] (1 avoids 0/0 at s=0)
    v1 = past_wr / past_w * tail_p  # [B, S]; 0 at s = 0

    s_idx = torch.arange(s_cuts, dtype=torch.float64)  # [S]
    if variance_reduction == "brpo":
        baseline = (s_idx * v1 + (s_cuts - s_idx) * v2) / s_cuts  # [B, S]
    elif variance_reduction == "v1only":
        baseline = v1
    elif variance_reduction == "v2only":
        baseline = v2
    elif variance_reduction == "none":
        baseline = torch.zeros_like(returns)
    else:
        raise ConfigError(f"anytime.variance_reduction={variance_reduction!r} is not valid; "
                          f"choose one of: {', '.join(BRPO_VARIANCE_REDUCTION)}")
    return returns.float(), baseline.float(), (returns - baseline).float()


def brpo_token_advantages(cut_advantages: torch.Tensor, cut_positions: list[int], thinking_length: int) -> torch.Tensor:
    """Spread one response's per-cut thinking advantages over its thinking tokens.

    AnytimeReasoner code (``compute_token_level_advantage``): tokens in ``[c_{s-1}, c_s)`` get
    ``A_s`` (``c_{-1} = 0``), one constant per segment -- ``G_s`` is already a return-to-go. Cuts at
    or past the end of the thinking collapse onto its length; the last segment (ending at the
    thinking's end, ``</think>`` included) takes the advantage of the *first* such cut, and later
    cuts map to no token (their rewards still enter the earlier returns).

    Args:
        cut_advantages: ``[S]`` ``A_s`` of this response.
        cut_positions: ``[S]`` non-decreasing token positions ``c_s = min(b_s, thinking_length)``.
        thinking_length: tokens of the thinking (the trainable sequence).

    Returns ``[thinking_length]`` float32.

    >>> brpo_token_advantages(torch.tensor([1., 2., 3.]), [2, 3, 3], 3)
    tensor([1., 1., 2.])
    """
    if cut_advantages.dim() != 1 or cut_advantages.numel() != len(cut_positions):
        raise ValueError(f"brpo: {cut_advantages.numel()} cut advantages for {len(cut_positions)} cut positions")
    out = torch.zeros(thinking_length, dtype=torch.float32)
    start = 0
    for a, c in zip(cut_advantages.tolist(), cut_positions):
        if c < start or c > thinking_length:
            raise ValueError(f"brpo: cut positions must be non-decreasing and <= {thinking_length}, got {cut_positions}")
        out[start:c] = a
        start = c
    if start != thinking_length:
        raise ValueError(f"brpo: the last cut ({start}) must end the thinking ({thinking_length} tokens)")
    return out


def brpo_summary_advantages(
    scores: torch.Tensor,
    pool_index: torch.Tensor,
    *,
    method: str = "brpo",
    cut_index: torch.Tensor | None = None,
    num_cuts: int | None = None,
    group_index: torch.Tensor | None = None,
    n_summary: int = 1,
) -> torch.Tensor:
    """Advantages of the summary policy (AnytimeReasoner, decoupled from the thinking policy).

    ``method=brpo`` with ``n_summary > 1``: ``score - mean`` of the summaries that share a pool
    (the same rollout and the same cut position; the code pools collapsed cuts), no std. With
    ``n_summary == 1`` the baseline is the group mean over the rollouts of the prompt at the same
    cut (code ``compute_summary_advantage``). ``method=grpo``: only summaries of the last cut get
    that advantage; the others get 0 (still in the loss, as in the code).

    Args:
        scores: ``[M]`` 0/1 score of each summary.
        pool_index: ``[M]`` long, summaries with equal ids share the mean baseline (``n_summary > 1``).
        cut_index / num_cuts: ``[M]`` the budget slot of each summary and ``S`` (``method=grpo``).
        group_index: ``[M]`` the prompt of each summary (``n_summary == 1``).

    >>> brpo_summary_advantages(torch.tensor([1., 0., 1., 1.]), torch.tensor([0, 0, 1, 1]), n_summary=2)
    tensor([ 0.5000, -0.5000,  0.0000,  0.0000])
    """
    if method not in BRPO_SUMMARY_METHODS:
        raise ConfigError(f"anytime.summary_method={method!r} is not valid; choose one of: {', '.join(BRPO_SUMMARY_METHODS)}")
    if scores.numel() == 0:
        return scores.float()
    if n_summary > 1:
        ids = pool_index
    else:
        if group_index is None or cut_index is None:
            raise ValueError("brpo summaries: n_summary == 1 needs group_index and cut_index (group baseline)")
        ids = group_index * (int(cut_index.max()) + 1) + cut_index
    _, inverse, counts = torch.unique(ids, return_inverse=True, return_counts=True)
    sums = torch.zeros(counts.numel(), dtype=torch.float64).index_add_(0, inverse, scores.double())
    adv = (scores.double() - (sums / counts)[inverse]).float()
    if method == "grpo":
        if cut_index is None or num_cuts is None:
            raise ValueError("brpo summaries: method=grpo needs cut_index and num_cuts")
        adv = torch.where(cut_index == num_cuts - 1, adv, torch.zeros_like(adv))
    return adv


_STANDARD_ARGS = ("rewards", "group_index", "norm_by_std", "response_lengths")


def estimator_inputs(name: str) -> tuple[list[str], list[str]]:
    """``(required, optional)`` extra per-response inputs estimator ``name`` takes beyond the standard ones."""
    params = list(inspect.signature(ADVANTAGE_ESTIMATORS.get(name)).parameters.values())
    extra = [p for p in params if p.name not in _STANDARD_ARGS and p.kind is not inspect.Parameter.VAR_KEYWORD]
    required = [p.name for p in extra if p.default is inspect.Parameter.empty]
    optional = [p.name for p in extra if p.default is not inspect.Parameter.empty]
    return required, optional


def compute_advantages(
    name: str,
    rewards: torch.Tensor,
    group_index: torch.Tensor,
    *,
    norm_by_std: bool = True,
    response_lengths: torch.Tensor | None = None,
    extra: dict[str, torch.Tensor] | None = None,
) -> torch.Tensor:
    """Look up estimator ``name`` in the registry and apply it. Returns ``[B]``.

    ``extra`` holds further per-response inputs (HBPO: ``budgets``, ``f2_baseline``). Only the
    entries the estimator's signature names are forwarded, so a trainer can pass the same dict
    whatever the estimator; a required input that is missing is a :class:`ConfigError` naming
    ``trainer.adv_estimator``.
    """
    estimator = ADVANTAGE_ESTIMATORS.get(name)
    required, optional = estimator_inputs(name)
    extra = dict(extra or {})
    missing = [k for k in required if k not in extra]
    if missing:
        raise ConfigError(
            f"trainer.adv_estimator={name!r} needs the per-response input(s) {', '.join(missing)}, which this "
            f"run does not provide (they come from budget-conditioned rollouts); use a rollout/reward setup that "
            f"produces them, or choose another trainer.adv_estimator"
        )
    forwarded = {k: v for k, v in extra.items() if k in required or k in optional}
    return estimator(rewards, group_index, norm_by_std=norm_by_std, response_lengths=response_lengths, **forwarded)
