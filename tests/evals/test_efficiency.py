"""AES (O1-Pruner arXiv 2501.12570) and SIRI's dAcc/CR (arXiv 2509.25176) against hand computations."""

import pytest

from rlspec.evals.efficiency import aes, siri_acc_cr


def test_aes_accuracy_gain():
    # dLen = (1000 - 500) / 1000 = .5; dAcc = (.9 - .8) / .8 = .125 -> 1 * .5 + 3 * .125 = .875
    assert aes(0.9, 500, 0.8, 1000) == pytest.approx(0.875)
    # percentages give the same score
    assert aes(90.0, 500, 80.0, 1000) == pytest.approx(0.875)


def test_aes_accuracy_drop_costs_gamma():
    # dLen = .5; dAcc = (.7 - .8) / .8 = -.125 -> .5 - 5 * .125 = -.125
    assert aes(0.7, 500, 0.8, 1000) == pytest.approx(-0.125)
    # custom weights (1, 5, 10): .5 - 10 * .125 = -.75; gain side: .5 + 5 * .125 = 1.125
    assert aes(0.7, 500, 0.8, 1000, eta=1, zeta=5, gamma=10) == pytest.approx(-0.75)
    assert aes(0.9, 500, 0.8, 1000, eta=1, zeta=5, gamma=10) == pytest.approx(1.125)


def test_aes_equal_accuracy_and_longer_output():
    # dAcc = 0 -> only the length term; 1500 tokens vs 1000: dLen = -.5
    assert aes(0.8, 1500, 0.8, 1000) == pytest.approx(-0.5)
    assert aes(0.8, 1000, 0.8, 1000) == 0.0
    # eta scales the length term: 2 * (1000 - 250) / 1000 = 1.5
    assert aes(0.8, 250, 0.8, 1000, eta=2.0) == pytest.approx(1.5)


def test_siri_acc_cr_hand_computed():
    # SIRI-low 1.5B, AIME24: dAcc = 40.4 / 28.2 - 1 = .4326241; CR = 7093 / 12333 = .5751236 -> .7522279
    assert siri_acc_cr(40.4, 7093, 28.2, 12333) == pytest.approx(0.4326241 / 0.5751236, rel=1e-6)
    # an accuracy drop counts as 0 however short: AdaptThink 7B on AIME25 (37.0 < 38.3)
    assert siri_acc_cr(37.0, 9556, 38.3, 11114) == 0.0
    assert siri_acc_cr(0.5, 100, 0.5, 200) == 0.0  # same accuracy
    # longer output lowers the score: dAcc = .2, CR = 2 -> .1
    assert siri_acc_cr(0.6, 2000, 0.5, 1000) == pytest.approx(0.1)


def test_siri_table1_rows_by_per_benchmark_mean():
    """Mean over AIME24/AIME25/AMC/MATH500 of the per-benchmark score vs SIRI Table 1 (2 decimals)."""
    base15 = [(28.2, 12333), (21.5, 12264), (61.8, 8449), (82.4, 4745)]
    base7 = [(53.5, 10306), (38.3, 11114), (79.4, 6740), (90.2, 3674)]
    rows = [  # (base, rows, printed value)
        (base15, [(41.1, 8585), (29.0, 8348), (73.9, 5515), (87.6, 3054)], 0.39),  # DeepScaleR-Preview
        (base15, [(42.8, 10453), (30.9, 10352), (74.6, 7339), (88.1, 4223)], 0.36),  # DAPO-DeepScaleR-16K
        (base15, [(31.0, 6679), (22.3, 6800), (63.3, 3498), (82.0, 1782)], 0.08),  # AdaptThink
        (base7, [(57.6, 9983), (40.8, 10705), (84.5, 6508), (92.5, 3658)], 0.06),
        (base7, [(55.6, 8546), (37.0, 9556), (80.1, 4778), (90.6, 1868)], 0.02),
        (base7, [(56.1, 6122), (41.5, 6386), (85.8, 4015), (93.5, 2452)], 0.10),  # SIRI-low 7B
        (base7, [(57.1, 8585), (45.4, 9106), (86.7, 5773), (93.7, 3378)], 0.11),  # SIRI-high 7B
    ]
    for base, row, printed in rows:
        score = sum(siri_acc_cr(a, n, a0, n0) for (a, n), (a0, n0) in zip(row, base)) / 4
        assert round(score, 2) == printed
    # the base model scores 0
    assert all(siri_acc_cr(a, n, a, n) == 0 for a, n in base15)


@pytest.mark.parametrize("fn", [aes, siri_acc_cr])
def test_bad_inputs(fn):
    with pytest.raises(ValueError, match="base_acc must be > 0"):
        fn(0.5, 100, 0.0, 100)
    with pytest.raises(ValueError, match="base_length must be > 0"):
        fn(0.5, 100, 0.5, 0)
    with pytest.raises(ValueError, match="acc must be a finite number >= 0"):
        fn(float("nan"), 100, 0.5, 100)
    with pytest.raises(ValueError, match="length must be a finite number >= 0"):
        fn(0.5, -1, 0.5, 100)


def test_siri_zero_length():
    with pytest.raises(ValueError, match="length must be > 0"):
        siri_acc_cr(0.5, 0, 0.5, 100)
    assert aes(0.5, 0, 0.5, 100) == pytest.approx(1.0)  # AES is defined at length 0: dLen = 1
