"""Paired statistics for comparing two models on the same samples."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass


@dataclass(frozen=True)
class PairedDiff:
    """mean(b - a) over paired samples with a bootstrap confidence interval."""

    a: float
    b: float
    diff: float
    low: float
    high: float
    n: int

    @property
    def excludes_zero(self) -> bool:
        return self.low > 0 or self.high < 0


def paired_bootstrap(
    a: Sequence[float], b: Sequence[float], *, confidence: float = 0.95, resamples: int = 10_000, seed: int = 0
) -> PairedDiff:
    """Bootstrap CI of mean(b) - mean(a): each resample draws the same sample indices for both models."""
    import numpy as np
    from scipy.stats import bootstrap

    x, y = np.asarray(a, dtype=float), np.asarray(b, dtype=float)
    if x.shape != y.shape or x.size == 0:
        raise ValueError("paired samples must be non-empty and of equal length")
    d = y - x
    if np.all(d == d[0]):  # no spread: the interval is the point
        low = high = float(d[0])
    else:
        res = bootstrap(
            (d,), np.mean, confidence_level=confidence, n_resamples=resamples, method="percentile", random_state=seed
        )
        low, high = float(res.confidence_interval.low), float(res.confidence_interval.high)
    return PairedDiff(float(x.mean()), float(y.mean()), float(d.mean()), low, high, int(x.size))
