"""Promotion gates: a pure decision over per-metric results of challenger vs champion.

Each metric's rule (configs/gates.yaml) is judged on the paired CI of (challenger - champion):
`min` on the challenger's mean; `max_regression` is a non-inferiority test: the CI's lower bound must be at or
above -max_regression (we are confident it is not worse by more than that); `min_improvement` needs the CI's
lower bound at or above it (confident it is better by at least that).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from fibreflow.core.config import Strict, load_config
from fibreflow.eval.stats import PairedDiff
from pydantic import Field


class Rule(Strict):
    min: float | None = None
    max_regression: float | None = Field(None, ge=0)
    min_improvement: float | None = None


class GatesConfig(Strict):
    metrics: dict[str, Rule]


def load_gates(overrides: dict[str, Any] | None = None) -> GatesConfig:
    return load_config(GatesConfig, "gates", overrides)


@dataclass(frozen=True)
class Decision:
    passed: bool
    reasons: list[str] = field(default_factory=list)  # one line per rule checked, failures first


def decide(gates: GatesConfig, results: dict[str, PairedDiff]) -> Decision:
    """Pass when every gated metric present meets every rule; a gated metric missing from results fails."""
    failures: list[str] = []
    passes: list[str] = []
    for name, rule in gates.metrics.items():
        d = results.get(name)
        if d is None:
            failures.append(f"{name}: not measured")
            continue
        ci = f"diff {d.diff:+.3f} [{d.low:+.3f}, {d.high:+.3f}]"
        if rule.min is not None:
            (passes if d.b >= rule.min else failures).append(f"{name}: {d.b:.3f} vs minimum {rule.min:.3f}")
        if rule.max_regression is not None:
            ok = d.low >= -rule.max_regression
            verdict = "within" if ok else "may exceed"
            (passes if ok else failures).append(f"{name}: {ci} {verdict} max regression {rule.max_regression:.3f}")
        if rule.min_improvement is not None:
            better = d.low >= rule.min_improvement
            verdict = "meets" if better else "does not meet"
            (passes if better else failures).append(
                f"{name}: {ci} {verdict} minimum improvement {rule.min_improvement:+.3f}"
            )
    return Decision(passed=not failures, reasons=failures + passes)
