"""The live A/B test's sequential rule (mSPRT) on simulated thumbs: 1,000 experiments per case, each read after every
batch of votes and stopped at its first decision, as an operator reading `fibreflow ab report` daily would."""

from __future__ import annotations

import math

import numpy as np
import pytest
from fibreflow.monitor.sequential import fixed_width, likelihood_ratio, msprt, simulate

RULE = {"alpha": 0.05, "min_effect": 0.05, "min_samples": 30}
EXPERIMENTS = 1000
# the share of false winners is a binomial estimate over 1,000 experiments: allow 3 of its standard errors
TOLERANCE = 3 * math.sqrt(RULE["alpha"] * (1 - RULE["alpha"]) / EXPERIMENTS)


@pytest.mark.parametrize("p", [0.3, 0.5, 0.7, 0.9])
def test_under_no_difference_false_winners_stay_within_the_stated_rate(p: float) -> None:
    oc = simulate(p, p, experiments=EXPERIMENTS, batch=20, looks=100, seed=int(p * 100), **RULE)
    print(f"no difference at p={p}: {oc}")
    assert oc.winner_a + oc.winner_b <= RULE["alpha"] + TOLERANCE


def test_read_after_every_single_vote_the_rate_still_holds() -> None:
    oc = simulate(0.6, 0.6, experiments=EXPERIMENTS, batch=1, looks=2000, seed=3, **RULE)
    print(f"every vote: {oc}")
    assert oc.winner_a + oc.winner_b <= RULE["alpha"] + TOLERANCE


def test_the_simulation_catches_a_rule_that_peeks() -> None:
    """The same simulation with a fixed-sample 95% CI read after every batch (peeking) names far more false
    winners than 5%: the check above is able to fail."""
    naive = simulate(0.5, 0.5, experiments=EXPERIMENTS, batch=20, looks=100, seed=5, **RULE)
    peeking = simulate(0.5, 0.5, experiments=EXPERIMENTS, batch=20, looks=100, seed=5, width=fixed_width, **RULE)
    print(f"mSPRT: {naive.winner_a + naive.winner_b:.3f} false winners, peeking t-test: "
          f"{peeking.winner_a + peeking.winner_b:.3f}")  # fmt: skip
    assert peeking.winner_a + peeking.winner_b > 3 * RULE["alpha"]


@pytest.mark.parametrize(("p_a", "p_b", "right"), [(0.6, 0.7, "b"), (0.7, 0.6, "a"), (0.8, 0.9, "b")])
def test_with_a_known_effect_it_finds_the_right_winner(p_a: float, p_b: float, right: str) -> None:
    oc = simulate(p_a, p_b, experiments=EXPERIMENTS, batch=20, looks=100, seed=11, **RULE)
    found, wrong = (oc.winner_b, oc.winner_a) if right == "b" else (oc.winner_a, oc.winner_b)
    print(f"p_a={p_a} p_b={p_b}: right winner {found:.3f}, wrong {wrong:.3f}, futility {oc.futility:.3f}, "
          f"median votes per arm {oc.median_votes_per_arm:.0f}")  # fmt: skip
    assert found >= 0.95 and wrong <= RULE["alpha"] / 2 and oc.futility <= RULE["alpha"]
    assert 30 <= oc.median_votes_per_arm < 2000  # decided well before the horizon


def test_no_real_difference_ends_in_futility_not_forever() -> None:
    oc = simulate(0.9, 0.9, experiments=EXPERIMENTS, batch=20, looks=100, seed=13, **RULE)
    print(f"no difference at 0.9: futility {oc.futility:.3f}, median votes per arm {oc.median_votes_per_arm:.0f}")
    assert oc.futility >= 0.9


def test_one_reading_decisions_and_the_ci_is_the_inverted_test() -> None:
    rng = np.random.default_rng(0)
    few = msprt([1.0] * 10, [0.0] * 10, **RULE)
    assert few.decision == "no difference yet" and few.winner is None  # under min_samples: never decided
    a, b = rng.binomial(1, 0.5, 400).astype(float), rng.binomial(1, 0.8, 400).astype(float)
    won = msprt(a, b, **RULE)
    assert won.decision == "winner" and won.winner == "b" and won.low > 0 and won.likelihood_ratio >= 1 / 0.05
    same = msprt(rng.binomial(1, 0.95, 3000).astype(float), rng.binomial(1, 0.95, 3000).astype(float), **RULE)
    assert same.decision == "stop: futility" and -0.05 < same.low < same.high < 0.05
    # at the CI's edge the test statistic is exactly the threshold: the CI is the set the test does not reject
    v = (a.var(ddof=1) / a.size) + (b.var(ddof=1) / b.size)
    edge = won.diff - won.low
    assert likelihood_ratio(edge, v, RULE["min_effect"]) == pytest.approx(1 / 0.05, rel=1e-9)
    assert msprt([], [1.0], **RULE).decision == "no difference yet"
