"""The live A/B test's stopping rule: a mixture sequential probability ratio test (mSPRT) on the difference of two
arms' mean feedback scores, read as often as anyone likes.

The test (Johari, Koomen, Pekelis & Walsh, "Always Valid Inference: Continuous Monitoring of A/B Tests", Operations
Research 70(3), 2022): for the observed difference d = mean(b) - mean(a) with variance V = s_a^2/n_a + s_b^2/n_b,
and a normal mixture N(0, tau^2) over the true difference,

    Lambda = sqrt(V / (V + tau^2)) * exp(tau^2 d^2 / (2 V (V + tau^2)))

and "no difference" is rejected once Lambda >= 1/alpha. Under no difference, the chance that this *ever* happens,
however often it is read, is at most alpha (Ville's inequality), so reading the report after every batch of votes
does not inflate false winners the way repeated t-tests do. Inverting the test gives the always-valid confidence
interval  d +- sqrt(V (V + tau^2) / tau^2 * (log((V + tau^2) / V) + 2 log(1/alpha))).

The variance is estimated from the data (plug-in, with a floor so a run of identical votes never claims certainty),
so the guarantee is asymptotic; `simulate` measures the operating characteristics on simulated thumbs (the tests
check the false-winner rate over >= 1,000 experiments read after every batch). tau is the smallest difference worth
acting on (`min_effect`): the mixture puts its weight on effects of that size.

Decisions, each valid whenever it is read:
- `winner`: the always-valid CI excludes 0 -> the arm with the higher mean;
- `stop: futility`: the CI lies inside (-min_effect, +min_effect): any difference is smaller than worth acting on;
- `no difference yet`: neither (or fewer than `min_samples` votes on an arm).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Literal

import numpy as np

Decision = Literal["winner", "no difference yet", "stop: futility"]
VAR_FLOOR = 0.01  # per vote, on a 0..1 score: the variance of a 99%-thumbs-up arm


@dataclass(frozen=True)
class SequentialResult:
    """arm b against arm a at one reading."""

    diff: float  # mean(b) - mean(a)
    low: float  # the always-valid CI of the difference
    high: float
    n_a: int
    n_b: int
    likelihood_ratio: float  # the mSPRT statistic; a winner once >= 1 / alpha
    decision: Decision
    winner: Literal["a", "b"] | None
    alpha: float


def half_width(v: np.ndarray | float, tau: float, alpha: float) -> np.ndarray | float:
    """Half the always-valid CI's width for a difference with variance `v` (elementwise)."""
    v = np.asarray(v, dtype=float)
    return np.sqrt(v * (v + tau**2) / tau**2 * (np.log((v + tau**2) / v) + 2 * np.log(1 / alpha)))


def fixed_width(v: np.ndarray | float, tau: float, alpha: float) -> np.ndarray | float:
    """The fixed-sample (1 - alpha) normal CI's half-width: valid for one reading only (the peeking baseline)."""
    from scipy.stats import norm

    return norm.ppf(1 - alpha / 2) * np.sqrt(np.asarray(v, dtype=float))


def likelihood_ratio(d: np.ndarray | float, v: np.ndarray | float, tau: float) -> np.ndarray | float:
    """The mSPRT statistic (inf once the evidence is overwhelming; only its crossing of 1/alpha matters)."""
    v = np.asarray(v, dtype=float)
    with np.errstate(over="ignore"):
        return np.sqrt(v / (v + tau**2)) * np.exp(tau**2 * np.asarray(d) ** 2 / (2 * v * (v + tau**2)))


def decide(low: np.ndarray, high: np.ndarray, enough: np.ndarray, min_effect: float) -> np.ndarray:
    """0 no difference yet, 1 winner, 2 futility (elementwise)."""
    winner = enough & ((low > 0) | (high < 0))
    futile = enough & ~winner & (low > -min_effect) & (high < min_effect)
    return np.where(winner, 1, np.where(futile, 2, 0))


def msprt(
    a: Sequence[float], b: Sequence[float], *, alpha: float, min_effect: float, min_samples: int
) -> SequentialResult:
    """The reading of the test on all of both arms' votes so far."""
    x, y = np.asarray(a, dtype=float), np.asarray(b, dtype=float)
    if x.size == 0 or y.size == 0:
        return SequentialResult(float("nan"), -1.0, 1.0, x.size, y.size, 1.0, "no difference yet", None, alpha)
    d = float(y.mean() - x.mean())
    v = max(_var(x), VAR_FLOOR) / x.size + max(_var(y), VAR_FLOOR) / y.size
    h = float(half_width(v, min_effect, alpha))
    enough = np.array(min(x.size, y.size) >= min_samples)
    code = int(decide(np.array(d - h), np.array(d + h), enough, min_effect))
    decision: Decision = ("no difference yet", "winner", "stop: futility")[code]  # type: ignore[assignment]
    winner = ("b" if d > 0 else "a") if code == 1 else None
    return SequentialResult(d, d - h, d + h, x.size, y.size, float(likelihood_ratio(d, v, min_effect)), decision,
                            winner, alpha)  # fmt: skip


def _var(x: np.ndarray) -> float:
    return float(x.var(ddof=1)) if x.size > 1 else 0.0


@dataclass(frozen=True)
class OperatingCharacteristics:
    """What the rule did over simulated experiments, each read after every batch and stopped at its first decision."""

    experiments: int
    p_a: float
    p_b: float
    winner_a: float  # share of experiments that declared a the winner
    winner_b: float
    futility: float
    undecided: float  # share still "no difference yet" at the horizon
    median_votes_per_arm: float  # at the decision (the horizon for undecided ones)


def simulate(
    p_a: float,
    p_b: float,
    *,
    alpha: float,
    min_effect: float,
    min_samples: int,
    experiments: int = 1000,
    batch: int = 20,
    looks: int = 100,
    seed: int = 0,
    width: Callable[[np.ndarray, float, float], np.ndarray] | None = None,
) -> OperatingCharacteristics:
    """Thumbs up with probability p_a and p_b, `batch` votes per arm between readings, up to `looks` readings.
    `width(v, tau, alpha)`: the CI's half-width rule (default: the always-valid one; `fixed_width`, the textbook
    fixed-sample CI, shows what reading it repeatedly costs)."""
    rng = np.random.default_rng(seed)
    n = batch * np.arange(1, looks + 1)  # votes per arm at each reading
    ups_a = rng.binomial(batch, p_a, (experiments, looks)).cumsum(axis=1)
    ups_b = rng.binomial(batch, p_b, (experiments, looks)).cumsum(axis=1)
    mean_a, mean_b = ups_a / n, ups_b / n
    var_a = np.maximum(mean_a * (1 - mean_a) * n / np.maximum(n - 1, 1), VAR_FLOOR)  # the sample variance of 0/1
    var_b = np.maximum(mean_b * (1 - mean_b) * n / np.maximum(n - 1, 1), VAR_FLOOR)
    d, v = mean_b - mean_a, var_a / n + var_b / n
    h = (width or half_width)(v, min_effect, alpha)
    codes = decide(d - h, d + h, np.broadcast_to(n >= min_samples, d.shape), min_effect)
    decided = codes != 0
    first = np.where(decided.any(axis=1), decided.argmax(axis=1), looks - 1)
    final = codes[np.arange(experiments), first]
    sign = np.sign(d[np.arange(experiments), first])
    return OperatingCharacteristics(
        experiments=experiments, p_a=p_a, p_b=p_b,
        winner_a=float(np.mean((final == 1) & (sign < 0))), winner_b=float(np.mean((final == 1) & (sign > 0))),
        futility=float(np.mean(final == 2)), undecided=float(np.mean(final == 0)),
        median_votes_per_arm=float(np.median(n[first])),
    )  # fmt: skip
