"""Token sampling: temperature, top-k, top-p (nucleus) and the policy log-probabilities.

Pure functions over ``[B, V]`` logits (``B`` rows, ``V`` vocabulary). The rollout engines call
:func:`sample_next_tokens` once per decode step.

Log-probabilities follow :class:`rlspec.rollout.base.RolloutResult`: ``log_softmax(logits / T)``
(``T = 1`` when greedy) at the chosen token, *before* top-k / top-p filtering -- the quantity the
trainer recomputes (as in verl and TRL), not the log-probability under the truncated sampler.
"""

from __future__ import annotations

import torch

from rlspec.rollout.base import SamplingParams

def apply_temperature(logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """``logits / temperature``; ``temperature == 0`` (greedy) leaves the logits unchanged.

    >>> apply_temperature(torch.tensor([[2.0, 1.0]]), 0.5)
    tensor([[4., 2.]])
    """
    if temperature < 0:
        raise ValueError(f"temperature must be >= 0, got {temperature}")
    if temperature == 0 or temperature == 1:
        return logits
    return logits / temperature


def apply_top_k(logits: torch.Tensor, k: int) -> torch.Tensor:
    """Keep the ``k`` largest logits of each row, set the rest to ``-inf`` (``k == 0``: off).

    Ties with the k-th largest value are kept (as in HF ``TopKLogitsWarper``).

    >>> apply_top_k(torch.tensor([[1.0, 3.0, 2.0]]), 2)
    tensor([[-inf, 3., 2.]])
    """
    if k < 0:
        raise ValueError(f"top_k must be >= 0 (0 = off), got {k}")
    if k == 0 or k >= logits.shape[-1]:
        return logits
    kth = torch.topk(logits, k, dim=-1).values[..., -1:]  # [B, 1]
    return logits.masked_fill(logits < kth, float("-inf"))


def apply_top_p(logits: torch.Tensor, p: float) -> torch.Tensor:
    """Nucleus filtering (Holtzman et al. 2020, "The Curious Case of Neural Text Degeneration").

    Keeps, per row, the smallest set of most-probable tokens whose total probability reaches
    ``p``: a token is dropped when the probability mass of the tokens ranked above it is already
    ``>= p``. The most probable token is always kept. ``p == 1``: off.

    >>> apply_top_p(torch.log(torch.tensor([[0.5, 0.3, 0.2]])), 0.7)  # 0.5 < 0.7, 0.8 >= 0.7
    tensor([[-0.6931, -1.2040,    -inf]])
    """
    if not 0 < p <= 1:
        raise ValueError(f"top_p must be in (0, 1], got {p}")
    if p >= 1:
        return logits
    vocab = logits.shape[-1]
    if vocab < 4 * TOP_P_CANDIDATES:  # small vocabularies: a sort costs no more
        return _top_p_by_sort(logits, p)
    # the nucleus lies within the k most probable tokens of every row whose top k hold >= p of the
    # mass: found with torch.topk instead of sorting the whole vocabulary (a sort of 49k ids took
    # ~40% of a 64-row decode step of a 49M model on CPU); rows whose top k hold less take the
    # sort. Row by row, so a row's nucleus does not depend on the rows beside it.
    flat = logits.reshape(-1, vocab)
    top, idx = torch.topk(flat.float().softmax(dim=-1), TOP_P_CANDIDATES, dim=-1)  # descending
    cum = top.cumsum(dim=-1)
    keep = torch.zeros(flat.shape, dtype=torch.bool, device=flat.device).scatter(-1, idx, (cum - top) < p)
    out = flat.masked_fill(~keep, float("-inf"))
    outside = cum[:, -1] < p
    if bool(outside.any()):
        rows = outside.nonzero().squeeze(-1)
        out[rows] = _top_p_by_sort(flat[rows], p)
    return out.view(logits.shape)


TOP_P_CANDIDATES = 256  # apply_top_p looks for the nucleus among this many tokens first


def _top_p_by_sort(logits: torch.Tensor, p: float) -> torch.Tensor:
    """:func:`apply_top_p` over the whole sorted vocabulary."""
    sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
    sorted_probs = sorted_logits.float().softmax(dim=-1)
    mass_above = sorted_probs.cumsum(dim=-1) - sorted_probs  # [B, V], 0 for the top token
    drop_sorted = mass_above >= p
    drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
    return logits.masked_fill(drop, float("-inf"))


def sample_from_probs(probs: torch.Tensor, uniform: torch.Tensor) -> torch.Tensor:
    """Inverse-CDF sampling: the token whose cumulative-probability interval contains ``u``.

    Row ``b`` returns the smallest ``i`` with ``cdf_b[i] > u_b * cdf_b[V-1]``, where ``cdf`` is
    the float64 cumulative sum of ``probs`` (rows need not be normalised). Tokens of probability 0
    have empty intervals and are never returned. Needs only one uniform number per row, unlike
    ``torch.multinomial`` / the Gumbel trick, which draw ``V`` (much slower on CPU).

    Args:
        probs: ``[B, V]`` non-negative weights, each row with a positive sum.
        uniform: ``[B]`` numbers in ``[0, 1)``.

    Returns:
        ``[B]`` long token ids.

    >>> sample_from_probs(torch.tensor([[0.2, 0.5, 0.3], [0.5, 0.0, 0.5]]), torch.tensor([0.2, 0.5]))
    tensor([1, 2])
    """
    cdf = probs.double().cumsum(dim=-1)  # [B, V], non-decreasing
    total = cdf[:, -1:]
    target = uniform.double().unsqueeze(-1) * total
    # keep the target strictly below the total so some token's interval always contains it
    target = torch.minimum(target, torch.nextafter(total, torch.zeros_like(total)))
    return torch.searchsorted(cdf, target, right=True).squeeze(-1)


_MASK64 = (1 << 64) - 1


def _signed(x: int) -> int:
    return x - (1 << 64) if x >> 63 else x


_GOLDEN, _MIX1, _MIX2 = (_signed(c) for c in (0x9E3779B97F4A7C15, 0xBF58476D1CE4E5B9, 0x94D049BB133111EB))
_STREAM = _signed(0xD1342543DE82EF95)


def _srl(x: torch.Tensor, bits: int) -> torch.Tensor:
    """Logical right shift of int64 ``x`` (torch's ``>>`` is arithmetic)."""
    return (x >> bits) & ((1 << (64 - bits)) - 1)


def position_uniforms(seed: int, streams: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    """Counter-based uniform numbers in ``[0, 1)``: one per (``seed``, stream, position), the same
    whichever rows share a batch and whichever step computes it.

    The sampler draws token ``j`` of request ``r`` with ``u = position_uniforms(seed, r, j)``
    (inverse CDF, :func:`sample_from_probs`), so a plain decode step and a speculative verify step
    that reaches the same position draw the same token: with point-mass drafts (lookups) the
    coupled verifier (:func:`rlspec.rollout.speculative.verification.verify_chain_coupled`) then
    emits exactly the tokens plain decoding would have (Leviathan et al.'s acceptance probability
    ``p(x)`` is kept: the draft ``x`` is accepted when the plain sample equals it). The numbers are
    splitmix64 (Steele et al. 2014) of ``seed * phi + stream * c + position``, in wrapping int64
    arithmetic, top 53 bits.

    Args:
        seed: the call's seed.
        streams: ``[n]`` long (or broadcastable to ``positions``), e.g. the request index.
        positions: ``[n]`` or ``[n, m]`` long, the token index in the stream.

    Returns:
        float64 of the broadcast shape.

    >>> u = position_uniforms(7, torch.tensor([0, 1]), torch.tensor([[0, 1], [0, 1]]))
    >>> bool(((u >= 0) & (u < 1)).all()), u[0, 1].item() == position_uniforms(7, torch.tensor([0]), torch.tensor([1])).item()
    (True, True)
    """
    streams = streams.long()
    positions = positions.long()
    if positions.dim() > streams.dim():
        streams = streams.view(*streams.shape, *([1] * (positions.dim() - streams.dim())))
    z = streams * _STREAM + positions + _signed(((seed + 1) * _GOLDEN) & _MASK64)  # wraps mod 2^64
    z = (z ^ _srl(z, 30)) * _MIX1
    z = (z ^ _srl(z, 27)) * _MIX2
    z = z ^ _srl(z, 31)
    return _srl(z, 11).double() * (1.0 / (1 << 53))


def sample_from_logits(logits: torch.Tensor, generator: torch.Generator | None = None,
                       uniform: torch.Tensor | None = None) -> torch.Tensor:
    """Draw one token per row from ``softmax(logits)``; ``-inf`` logits are never drawn.

    Args:
        logits: ``[B, V]``.
        generator: optional private RNG (same device as ``logits``); ``None`` uses the global RNG.
        uniform: optional ``[B]`` numbers in ``[0, 1)`` to draw with instead (no RNG is used).

    Returns:
        ``[B]`` long token ids.
    """
    probs = logits.float().softmax(dim=-1)
    return _draw(probs, generator, uniform)


def _draw(probs: torch.Tensor, generator: torch.Generator | None, uniform: torch.Tensor | None = None) -> torch.Tensor:
    if uniform is None:
        uniform = torch.rand(probs.shape[0], generator=generator, device=probs.device)
    return sample_from_probs(probs, uniform)


def token_logprobs(logits: torch.Tensor, tokens: torch.Tensor, temperature: float) -> torch.Tensor:
    """Policy log-probabilities ``log_softmax(logits / T)[token]`` (``T = 1`` when greedy).

    Args:
        logits: ``[B, V]`` raw (unfiltered) logits.
        tokens: ``[B]`` chosen token ids.
        temperature: sampling temperature; ``0`` means greedy and is scored with ``T = 1``.

    Returns:
        ``[B]`` float32.
    """
    t = 1.0 if temperature == 0 else temperature
    logp = torch.log_softmax(logits.float() / t if t != 1.0 else logits.float(), dim=-1)
    return logp.gather(-1, tokens.unsqueeze(-1)).squeeze(-1)


def sample_next_tokens(
    logits: torch.Tensor, params: SamplingParams, generator: torch.Generator | None = None,
    uniform: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """One decode step of sampling: choose the next token of every row and score it.

    Greedy (``temperature == 0``) takes the argmax. Otherwise the logits are divided by the
    temperature, filtered by top-k then top-p (the order HF and vLLM use) and sampled.

    Args:
        logits: ``[B, V]`` next-token logits (any float dtype; computed in float32).
        params: the sampling settings.
        generator: optional private RNG; ``None`` uses the global RNG.
        uniform: optional ``[B]`` inverse-CDF numbers (e.g. :func:`position_uniforms`) used
            instead of the RNG.

    Returns:
        ``(tokens [B] long, logprobs [B] float32)``; logprobs as in :func:`token_logprobs`.
    """
    logits = logits.float()
    if params.greedy:
        tokens = logits.argmax(dim=-1)
        logp = torch.log_softmax(logits, dim=-1)
        return tokens, logp.gather(-1, tokens.unsqueeze(-1)).squeeze(-1)
    scaled = apply_temperature(logits, params.temperature)
    logp = torch.log_softmax(scaled, dim=-1)
    if params.top_k == 0 and params.top_p >= 1:
        tokens = _draw(logp.exp(), generator, uniform)  # unfiltered: reuse the softmax
    else:
        tokens = sample_from_logits(apply_top_p(apply_top_k(scaled, params.top_k), params.top_p), generator, uniform)
    return tokens, logp.gather(-1, tokens.unsqueeze(-1)).squeeze(-1)
