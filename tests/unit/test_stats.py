"""Intervals and paired tests against independent computations (scipy) and hand-worked cases."""

import numpy as np
import pytest
from scipy.stats import binomtest, rankdata

from safety_circuits.stats import (
    Rate,
    _bootstrap_auroc,
    _wins,
    auroc_interval,
    mcnemar,
    paired_bootstrap,
    separation,
    wilson_interval,
)


@pytest.mark.parametrize(("k", "n"), [(3, 50), (0, 10), (10, 10), (81, 263), (1, 1)])
def test_wilson_equals_scipy(k, n):
    ci = binomtest(k, n).proportion_ci(confidence_level=0.95, method="wilson")
    assert wilson_interval(k, n) == pytest.approx((ci.low, ci.high), abs=1e-12)


def test_wilson_textbook_case():
    """0 successes in 10: the Wilson 95% upper bound is 0.2775 (the 'rule of three' gives 0.3)."""
    assert wilson_interval(0, 10) == (0.0, pytest.approx(0.27753, abs=1e-5))


def test_rate_and_bad_input():
    rate = Rate.of([True] * 3 + [False] * 47)
    assert (rate.k, rate.n, rate.rate) == (3, 50, 0.06)
    assert str(rate) == "0.06 [0.02, 0.16]"
    assert Rate(**{k: v for k, v in rate.to_dict().items() if k != "rate"}) == rate
    with pytest.raises(ValueError, match="k <= n"):
        wilson_interval(5, 4)
    with pytest.raises(ValueError, match="n >= 1"):
        Rate.of([])
    with pytest.raises(ValueError, match="confidence"):
        wilson_interval(1, 2, confidence=95)


def test_mcnemar_equals_binomial_test_on_discordant_pairs():
    rng = np.random.default_rng(0)
    a, b = rng.random(80) < 0.5, rng.random(80) < 0.3
    only_a, only_b = int((a & ~b).sum()), int((~a & b).sum())
    expected = binomtest(only_a, only_a + only_b, 0.5).pvalue
    assert mcnemar(a, b) == pytest.approx(expected, rel=1e-12)
    assert mcnemar(a, a) == 1.0


def test_paired_bootstrap():
    a = np.array([True] * 30 + [False] * 20)
    b = np.array([False] * 50)
    result = paired_bootstrap(a, b, n_boot=2000)
    assert result.difference == pytest.approx(0.6) and result.lo < 0.6 < result.hi
    assert result.significant and result.p_value < 1e-6
    same = paired_bootstrap(a, a, n_boot=2000)
    assert (same.difference, same.lo, same.hi, same.significant) == (0, 0, 0, False)
    with pytest.raises(ValueError, match="same non-empty"):
        paired_bootstrap(a, b[:10])


def test_separation_against_sklearn():
    from sklearn.metrics import roc_auc_score, roc_curve

    rng = np.random.default_rng(0)
    y = np.r_[np.ones(40, int), np.zeros(60, int)]
    s = rng.normal(size=100) + 1.5 * y
    s[5] = s[50]  # a tie across classes
    sep = separation(y, s)
    assert sep.auroc == pytest.approx(roc_auc_score(y, s), abs=1e-12)
    assert sep.auroc_lo < sep.auroc < sep.auroc_hi and (sep.n_pos, sep.n_neg) == (40, 60)
    fpr, tpr, _ = roc_curve(y, s)
    assert sep.fpr == pytest.approx(fpr[np.argmax(tpr >= 0.95)])  # the first ROC point at 95% TPR
    assert sep.fpr_lo <= sep.fpr <= sep.fpr_hi
    assert separation(y, s, seed=1).auroc == sep.auroc
    perfect = separation([1, 1, 0, 0], [0.9, 0.8, 0.2, 0.1])
    assert (perfect.auroc, perfect.auroc_lo, perfect.fpr) == (1.0, 1.0, 0.0)
    with pytest.raises(ValueError, match="at least one of each"):
        separation([1, 1], [0.2, 0.3])
    with pytest.raises(ValueError, match="one value per prompt"):
        separation([1, 0], [0.2])


def test_bootstrap_auroc_equals_ranking_each_resample():
    """The counts form of the bootstrap gives each resample's rank-based AUROC (ties included)."""
    rng = np.random.default_rng(0)
    pos, neg = rng.integers(0, 6, 40).astype(float), rng.integers(0, 5, 30).astype(float)
    pos_idx, neg_idx = rng.integers(0, 40, (50, 40)), rng.integers(0, 30, (50, 30))
    fast = _bootstrap_auroc(_wins(pos, neg), pos_idx, neg_idx)
    ranks = rankdata(np.concatenate([pos[pos_idx], neg[neg_idx]], axis=1), axis=1)
    by_ranks = (ranks[:, :40].sum(1) - 40 * 41 / 2) / (40 * 30)
    np.testing.assert_allclose(fast, by_ranks, rtol=0, atol=1e-12)


def test_auroc_interval_matches_the_bootstrap():
    """The Hanley-McNeil interval and the stratified bootstrap agree on a moderate sample."""
    rng = np.random.default_rng(0)
    pos, neg = rng.normal(1.0, 1.0, 200), rng.normal(0.0, 1.0, 2000)
    labels = np.r_[np.ones(200), np.zeros(2000)].astype(int)
    boot = separation(labels, np.r_[pos, neg], n_boot=1000)
    lo, hi = auroc_interval(boot.auroc, 200, 2000)
    assert lo < boot.auroc < hi
    assert (hi - lo) == pytest.approx(boot.auroc_hi - boot.auroc_lo, rel=0.2)
    assert auroc_interval(1.0, 5, 5) == (1.0, 1.0)
    with pytest.raises(ValueError, match="AUROC"):
        auroc_interval(1.2, 5, 5)
