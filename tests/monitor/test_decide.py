"""The regression decision, table-driven: tolerance, confidence (the CI, not the mean), consecutive runs."""

from __future__ import annotations

import pytest
from fibreflow.eval.stats import PairedDiff
from fibreflow.monitor.config import Rule
from fibreflow.monitor.decide import decide

POLICY = {"accuracy": Rule(tolerance=0.05, consecutive=1), "grounded_accuracy": Rule(tolerance=0.10, consecutive=2)}


def diff(low: float, high: float) -> PairedDiff:
    return PairedDiff(0.8, 0.8 + (low + high) / 2, (low + high) / 2, low, high, 64)


@pytest.mark.parametrize(
    ("diffs", "earlier", "status", "regressed"),
    [
        ({"accuracy": diff(-0.02, 0.03)}, {}, "ok", []),  # no change
        ({"accuracy": diff(-0.30, -0.04)}, {}, "ok", []),  # worse on average, but not surely by more than 0.05
        ({"accuracy": diff(-0.30, -0.06)}, {}, "regressed", ["accuracy"]),  # surely worse by more than 0.05
        ({"accuracy": diff(0.10, 0.30)}, {}, "ok", []),  # better
        # two runs in a row needed for grounded accuracy
        ({"grounded_accuracy": diff(-0.5, -0.2)}, {}, "ok", []),
        ({"grounded_accuracy": diff(-0.5, -0.2)}, {"grounded_accuracy": [True]}, "regressed", ["grounded_accuracy"]),
        ({"grounded_accuracy": diff(-0.5, -0.2)}, {"grounded_accuracy": [True, False]}, "ok", []),  # the streak broke
        # a metric the suite does not measure is left out, not failed
        ({}, {}, "ok", []),
    ],
)
def test_decision_table(diffs: dict, earlier: dict, status: str, regressed: list[str]) -> None:
    got, verdicts = decide(diffs, earlier, POLICY)
    assert got == status and [v.metric for v in verdicts if v.regressed] == regressed
    assert {v.metric for v in verdicts} == set(diffs)


def test_reasons_name_the_metric_the_ci_and_the_streak() -> None:
    _, [v] = decide({"grounded_accuracy": diff(-0.5, -0.2)}, {}, POLICY)
    assert v.reason == "grounded_accuracy: -0.350 [-0.500, -0.200] below -0.100, 1 of 2 runs needed"
    _, [v] = decide({"grounded_accuracy": diff(-0.5, -0.2)}, {"grounded_accuracy": [True]}, POLICY)
    assert "below -0.100 (2 run(s) in a row)" in v.reason and v.streak == 2
