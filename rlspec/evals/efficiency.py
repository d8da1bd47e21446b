"""Accuracy-vs-length efficiency scores of a model against its base model.

Both scores are relative, so ``acc`` may be a fraction or a percentage and ``length`` any unit,
as long as the model and the base use the same unit, benchmark, sampling and length cap
(reference §9.7: never score against another paper's base numbers).
"""

from __future__ import annotations

import math

__all__ = ["aes", "siri_acc_cr"]


def _check(acc: float, length: float, base_acc: float, base_length: float) -> None:
    for name, value in (("acc", acc), ("length", length), ("base_acc", base_acc), ("base_length", base_length)):
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0:
            raise ValueError(f"{name} must be a finite number >= 0, got {value!r}")
    if base_acc <= 0:
        raise ValueError("base_acc must be > 0: both scores divide by the base model's accuracy")
    if base_length <= 0:
        raise ValueError("base_length must be > 0: both scores divide by the base model's mean length")


def aes(
    acc: float,
    length: float,
    base_acc: float,
    base_length: float,
    eta: float = 1.0,
    zeta: float = 3.0,
    gamma: float = 5.0,
) -> float:
    """Accuracy-Efficiency Score (O1-Pruner, arXiv 2501.12570).

    ``dLen = (L_base - L) / L_base`` and ``dAcc = (A - A_base) / A_base``; then

        ``AES = eta * dLen + zeta * |dAcc|``   if ``dAcc >= 0``
        ``AES = eta * dLen - gamma * |dAcc|``  if ``dAcc < 0``

    so an accuracy drop costs ``gamma / zeta`` times more than an equal gain earns. Defaults
    ``eta=1, zeta=3, gamma=5`` (reference §6; variants such as (1, 5, 10) exist). Higher is better.

    >>> round(aes(0.9, 500, 0.8, 1000), 6)  # dLen = .5, dAcc = .125 -> .5 + 3 * .125
    0.875
    """
    _check(acc, length, base_acc, base_length)
    d_len = (base_length - length) / base_length
    d_acc = (acc - base_acc) / base_acc
    if d_acc >= 0:
        return float(eta * d_len + zeta * abs(d_acc))
    return float(eta * d_len - gamma * abs(d_acc))


def siri_acc_cr(acc: float, length: float, base_acc: float, base_length: float) -> float:
    """SIRI's accuracy-CR ratio ``dAcc / CR`` (arXiv 2509.25176, Table 1 and Sec. 5.1).

    ``dAcc = max(acc / acc_init - 1, 0)`` (accuracy drops count as 0) and ``CR = len / len_init``
    (compression ratio; lower is shorter). Higher is better; 0 for the base model itself.

    The paper reports one number per model over four benchmarks without saying how they are
    combined. Averaging this per-benchmark score over AIME24/AIME25/AMC/MATH500 reproduces 7 of
    the 9 rows of its Table 1 to two decimals (SIRI-low 1.5B gives 0.485 vs the printed 0.47),
    so the aggregation is left to the caller.

    >>> round(siri_acc_cr(40.4, 7093, 28.2, 12333), 4)  # SIRI-low 1.5B on AIME24: .432624 / .575124
    0.7522
    """
    _check(acc, length, base_acc, base_length)
    if length <= 0:
        raise ValueError("length must be > 0: the compression ratio CR = length / base_length is the divisor")
    d_acc = max(acc / base_acc - 1.0, 0.0)
    cr = length / base_length
    return float(d_acc / cr)
