"""Gates and the paired bootstrap on synthetic paired data with known answers."""

from __future__ import annotations

import numpy as np
import pytest
from fibreflow.eval.gates import GatesConfig, decide, load_gates
from fibreflow.eval.stats import PairedDiff, paired_bootstrap


def test_bootstrap_finds_a_known_gain() -> None:
    rng = np.random.default_rng(0)
    a = rng.binomial(1, 0.3, 400).astype(float)
    b = np.where(rng.random(400) < 0.4, 1.0, a)  # b = a plus ~40% of a's misses fixed: true gain ~0.28
    d = paired_bootstrap(a, b)
    assert d.excludes_zero and d.low < 0.28 < d.high and d.diff == pytest.approx(b.mean() - a.mean())


def test_bootstrap_of_identical_models_includes_zero() -> None:
    a = np.random.default_rng(1).binomial(1, 0.5, 200).astype(float)
    d = paired_bootstrap(a, a.copy())
    assert (d.low, d.high, d.excludes_zero) == (0.0, 0.0, False)


def test_pairing_narrows_the_interval() -> None:
    """Same per-sample difficulty for both models: the paired CI is far narrower than the marginal spread."""
    rng = np.random.default_rng(2)
    hard = rng.random(300)
    a = (hard > 0.5).astype(float)
    b = (hard > 0.45).astype(float)
    d = paired_bootstrap(a, b)
    assert d.excludes_zero and d.high - d.low < 0.06


def _d(champion: float, challenger: float, low: float, high: float) -> PairedDiff:
    return PairedDiff(champion, challenger, challenger - champion, low, high, 100)


GATES = GatesConfig.model_validate(
    {"metrics": {"accuracy": {"min": 0.5, "max_regression": 0.02}, "faithfulness": {"min_improvement": 0.0}}}
)


@pytest.mark.parametrize(
    ("results", "passed", "first_reason"),
    [
        ({"accuracy": _d(0.6, 0.7, 0.05, 0.15), "faithfulness": _d(0.8, 0.85, 0.01, 0.09)}, True, "accuracy: 0.700"),
        ({"accuracy": _d(0.6, 0.45, -0.2, -0.1), "faithfulness": _d(0.8, 0.85, 0.01, 0.09)}, False, "accuracy: 0.450"),
        ({"accuracy": _d(0.7, 0.6, -0.15, -0.05), "faithfulness": _d(0.8, 0.85, 0.01, 0.09)}, False, "accuracy: diff"),
        ({"accuracy": _d(0.7, 0.69, -0.015, 0.01), "faithfulness": _d(0.8, 0.85, 0.01, 0.09)}, True, "accuracy: 0.690"),
        ({"accuracy": _d(0.7, 0.69, -0.05, 0.03), "faithfulness": _d(0.8, 0.85, 0.01, 0.09)}, False, "accuracy: diff"),
        ({"accuracy": _d(0.6, 0.7, 0.05, 0.15), "faithfulness": _d(0.8, 0.8, -0.02, 0.02)}, False, "faithfulness"),
        ({"accuracy": _d(0.6, 0.7, 0.05, 0.15)}, False, "faithfulness: not measured"),
    ],
)
def test_gate_decisions(results: dict, passed: bool, first_reason: str) -> None:
    decision = decide(GATES, results)
    assert decision.passed is passed
    assert decision.reasons[0].startswith(first_reason), decision.reasons


def test_shipped_gates_parse() -> None:
    assert "accuracy" in load_gates().metrics
