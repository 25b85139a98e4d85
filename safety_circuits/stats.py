"""Rates with 95% intervals, and paired comparisons of two models on the same prompts.

A rate measured on ``n`` prompts is a :class:`Rate`: the count, the share and its Wilson score
interval, which keeps its coverage at the small ``n`` and extreme shares (ASR near 0 or 1) of
these evaluations, where the normal approximation does not. Two models answering the same
prompts are compared pairwise: :func:`mcnemar` (exact, on the discordant prompts) and
:func:`paired_bootstrap` (the interval of the difference of rates, resampling prompts).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from statistics import NormalDist
from typing import Any

import numpy as np
from jaxtyping import Float
from torch import Tensor

from safety_circuits._io import Record


def _z(confidence: float) -> float:
    if not 0 < confidence < 1:
        raise ValueError(f"confidence must be in (0, 1), got {confidence}")
    return NormalDist().inv_cdf(0.5 + confidence / 2)


def wilson_interval(k: int, n: int, confidence: float = 0.95) -> tuple[float, float]:
    """The Wilson score interval of a proportion ``k / n``.

    >>> [round(x, 4) for x in wilson_interval(3, 50)]
    [0.0206, 0.1622]
    >>> wilson_interval(0, 10)[0]
    0.0
    """
    if n < 1 or not 0 <= k <= n:
        raise ValueError(f"need 0 <= k <= n and n >= 1, got k={k}, n={n}")
    z = _z(confidence)
    p = k / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z / (1 + z * z / n) * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n))
    return (0.0 if k == 0 else centre - half), (1.0 if k == n else centre + half)


def auroc_interval(auroc: float, n_pos: int, n_neg: int, confidence: float = 0.95) -> tuple[float, float]:
    """The Hanley-McNeil (1982) normal interval of an AUROC from ``n_pos`` positives and
    ``n_neg`` negatives, clipped to [0, 1] (for large sets, where a bootstrap is costly).

    >>> [round(x, 3) for x in auroc_interval(0.8, 300, 90000)]
    [0.77, 0.83]
    """
    if n_pos < 1 or n_neg < 1 or not 0 <= auroc <= 1:
        raise ValueError(f"need an AUROC in [0, 1] and n_pos, n_neg >= 1, got {auroc}, {n_pos}, {n_neg}")
    q1, q2 = auroc / (2 - auroc), 2 * auroc**2 / (1 + auroc)
    var = (auroc * (1 - auroc) + (n_pos - 1) * (q1 - auroc**2) + (n_neg - 1) * (q2 - auroc**2)) / (
        n_pos * n_neg
    )
    half = _z(confidence) * math.sqrt(max(var, 0.0))
    return max(0.0, auroc - half), min(1.0, auroc + half)


@dataclass(frozen=True)
class Rate:
    """``k`` of ``n`` prompts, the share ``k / n`` and its Wilson interval ``[lo, hi]``."""

    k: int
    n: int
    lo: float
    hi: float

    @property
    def rate(self) -> float:
        return self.k / self.n

    @classmethod
    def of(cls, flags: Sequence[bool] | np.ndarray, confidence: float = 0.95) -> Rate:
        """The rate of ``True`` among ``flags``.

        >>> Rate.of([True, False, False, False])
        Rate(0.25 [0.05, 0.70], n=4)
        """
        flags = np.asarray(flags, dtype=bool)
        k, n = int(flags.sum()), int(flags.size)
        return cls(k, n, *wilson_interval(k, n, confidence))

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "rate": self.rate}

    def __str__(self) -> str:
        return f"{self.rate:.2f} [{self.lo:.2f}, {self.hi:.2f}]"

    def __repr__(self) -> str:
        return f"Rate({self}, n={self.n})"


def _paired(a: Sequence[bool] | np.ndarray, b: Sequence[bool] | np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    a, b = np.asarray(a, dtype=bool), np.asarray(b, dtype=bool)
    if a.shape != b.shape or a.ndim != 1 or not a.size:
        raise ValueError(f"paired flags need the same non-empty 1-d shape, got {a.shape} and {b.shape}")
    return a, b


def mcnemar(a: Sequence[bool] | np.ndarray, b: Sequence[bool] | np.ndarray) -> float:
    """Two-sided exact McNemar p-value that ``a`` and ``b`` (flags on the same prompts) have the
    same rate: a binomial test on the prompts where they disagree.

    >>> round(mcnemar([1, 1, 1, 1, 1, 1, 0, 0], [0, 0, 0, 0, 0, 0, 0, 0]), 4)
    0.0312
    """
    a, b = _paired(a, b)
    only_a, only_b = int((a & ~b).sum()), int((~a & b).sum())
    n = only_a + only_b
    if n == 0:
        return 1.0
    tail = sum(math.comb(n, i) for i in range(min(only_a, only_b) + 1)) / 2**n
    return min(1.0, 2 * tail)


@dataclass(frozen=True)
class PairedDifference:
    """``rate(a) - rate(b)`` on the same prompts, its bootstrap interval and McNemar's p-value."""

    difference: float
    lo: float
    hi: float
    p_value: float
    n: int

    @property
    def significant(self) -> bool:
        """Whether McNemar's exact test rejects equal rates at the 5% level. (With few prompts on
        which the models disagree, the percentile bootstrap interval can exclude 0 while the exact
        test does not; the exact test decides.)"""
        return self.p_value < 0.05

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "significant": self.significant}


def paired_bootstrap(
    a: Sequence[bool] | np.ndarray,
    b: Sequence[bool] | np.ndarray,
    n_boot: int = 10_000,
    confidence: float = 0.95,
    seed: int = 0,
) -> PairedDifference:
    """The difference of rates of two models on the same prompts, with a percentile bootstrap
    interval (prompts resampled together for both models) and the exact McNemar p-value."""
    a, b = _paired(a, b)
    _z(confidence)
    diff = a.astype(float) - b.astype(float)
    rows = np.random.default_rng(seed).integers(0, diff.size, size=(n_boot, diff.size))
    means = diff[rows].mean(axis=1)
    tail = (1 - confidence) / 2
    lo, hi = np.quantile(means, [tail, 1 - tail])
    return PairedDifference(float(diff.mean()), float(lo), float(hi), mcnemar(a, b), int(diff.size))


@dataclass(frozen=True)
class Separation(Record):
    """How well scores separate positives (label 1) from negatives: AUROC and the false-positive
    rate at a true-positive rate of ``tpr``, each with a stratified percentile-bootstrap interval."""

    auroc: float
    auroc_lo: float
    auroc_hi: float
    tpr: float
    fpr: float
    fpr_lo: float
    fpr_hi: float
    n_pos: int
    n_neg: int

    def __str__(self) -> str:
        return f"AUROC {self.auroc:.2f} [{self.auroc_lo:.2f}, {self.auroc_hi:.2f}]"


def _wins(pos: np.ndarray, neg: np.ndarray) -> np.ndarray:
    """``[n_pos, n_neg]``: 1 where the positive scores above the negative, 1/2 on a tie, else 0."""
    return (pos[:, None] > neg[None, :]) + 0.5 * (pos[:, None] == neg[None, :])


def _bootstrap_auroc(wins: np.ndarray, pos_idx: np.ndarray, neg_idx: np.ndarray) -> np.ndarray:
    """The AUROC of each resample (rows of indices into the positives and the negatives).

    A resample's AUROC is the mean of ``wins`` over its (positive, negative) pairs: with ``c``
    the times each item was drawn, ``c_pos @ wins @ c_neg / (n_pos n_neg)``: one matrix product
    for all resamples, instead of ranking each one.
    """

    def counts(idx: np.ndarray, n: int) -> np.ndarray:
        rows = np.arange(len(idx))[:, None] * n
        return np.bincount((rows + idx).ravel(), minlength=len(idx) * n).reshape(len(idx), n)

    c_pos, c_neg = counts(pos_idx, wins.shape[0]), counts(neg_idx, wins.shape[1])
    return ((c_pos @ wins) * c_neg).sum(-1) / (pos_idx.shape[1] * neg_idx.shape[1])


def _fpr_at(pos: np.ndarray, neg: np.ndarray, tpr: float) -> np.ndarray:
    """The share of negatives scored at or above the highest threshold that keeps ``tpr`` of the
    positives at or above it, per row."""
    k = int(np.floor((1 - tpr) * pos.shape[-1] + 1e-9))
    threshold = np.sort(pos, axis=-1)[..., k : k + 1]
    return (neg >= threshold).mean(-1)


def separation(
    labels: Sequence[int] | np.ndarray,
    scores: Sequence[float] | np.ndarray,
    tpr: float = 0.95,
    n_boot: int = 2000,
    confidence: float = 0.95,
    seed: int = 0,
) -> Separation:
    """AUROC and FPR at ``tpr`` of ``scores`` for binary ``labels``, with intervals from a
    bootstrap that resamples positives and negatives separately.

    >>> s = separation([1, 1, 1, 0, 0, 0], [0.9, 0.8, 0.4, 0.5, 0.2, 0.1], tpr=0.6)
    >>> round(s.auroc, 3), s.fpr
    (0.889, 0.0)
    """
    y, s = np.asarray(labels), np.asarray(scores, dtype=np.float64)
    if y.shape != s.shape or y.ndim != 1:
        raise ValueError(f"labels {y.shape} and scores {s.shape} must be one value per prompt")
    pos, neg = s[y == 1], s[y == 0]
    if not len(pos) or not len(neg) or len(pos) + len(neg) != len(y):
        raise ValueError("labels must be 0 or 1, with at least one of each")
    if not 0 < tpr <= 1:
        raise ValueError(f"tpr must be in (0, 1], got {tpr}")
    tail = (1 - confidence) / 2
    _z(confidence)
    rng = np.random.default_rng(seed)
    pos_idx = rng.integers(0, len(pos), size=(n_boot, len(pos)))
    neg_idx = rng.integers(0, len(neg), size=(n_boot, len(neg)))
    wins = _wins(pos, neg)
    aurocs = _bootstrap_auroc(wins, pos_idx, neg_idx)
    fprs = _fpr_at(pos[pos_idx], neg[neg_idx], tpr)
    (a_lo, a_hi), (f_lo, f_hi) = np.quantile(aurocs, [tail, 1 - tail]), np.quantile(fprs, [tail, 1 - tail])
    return Separation(
        auroc=float(wins.mean()),
        auroc_lo=float(a_lo),
        auroc_hi=float(a_hi),
        tpr=tpr,
        fpr=float(_fpr_at(pos, neg, tpr)),
        fpr_lo=float(f_lo),
        fpr_hi=float(f_hi),
        n_pos=len(pos),
        n_neg=len(neg),
    )


def kl_divergence(reference: Float[Tensor, "n vocab"], other: Float[Tensor, "n vocab"]) -> Float[Tensor, ""]:
    """Mean over rows of KL(softmax(reference) || softmax(other)), in float32 and differentiable.

    Rows are logits or log-probabilities (each is normalised here): the one KL of the package,
    for tuning's retain loss, the specificity of a neuron set and a direction's side effects.

    >>> import torch
    >>> logp = torch.tensor([[0.0, 0.0], [1.0, -1.0]]).log_softmax(-1)
    >>> float(kl_divergence(logp, logp)), round(float(kl_divergence(logp[:1], logp[1:])), 4)
    (0.0, 0.4338)
    """
    ref = reference.float().log_softmax(-1)
    return (ref.exp() * (ref - other.float().log_softmax(-1))).sum(-1).mean()
