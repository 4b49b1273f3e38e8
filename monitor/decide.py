"""The regression decision: a pure function of one run's paired differences (live - baseline), the earlier runs of
the same version and arm, and the policy. `unmeasured` is decided before scoring (an endpoint that failed, a
version the router did not serve) and never becomes a score of 0."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from fibreflow.eval.stats import PairedDiff
from fibreflow.monitor.config import Rule

Status = Literal["ok", "regressed", "unmeasured"]


@dataclass(frozen=True)
class MetricVerdict:
    metric: str
    diff: PairedDiff  # live - baseline, paired by row id
    below: bool  # this run's CI lies wholly below -tolerance
    streak: int  # runs in a row (this one included) whose CI did
    regressed: bool
    reason: str


def decide(
    diffs: dict[str, PairedDiff], earlier: dict[str, list[bool]], policy: dict[str, Rule]
) -> tuple[Status, list[MetricVerdict]]:
    """`earlier[metric]`: the `below` flags of the earlier runs of this version and arm, oldest first. A metric of
    the policy the suite does not measure (no rows of its group) is left out."""
    verdicts = []
    for metric, rule in policy.items():
        d = diffs.get(metric)
        if d is None:
            continue
        below = d.high < -rule.tolerance
        streak = 0
        if below:
            streak = 1
            for flag in reversed(earlier.get(metric, [])):
                if not flag:
                    break
                streak += 1
        regressed = below and streak >= rule.consecutive
        ci = f"{d.diff:+.3f} [{d.low:+.3f}, {d.high:+.3f}]"
        if regressed:
            reason = f"{metric}: live - baseline {ci} below -{rule.tolerance:.3f} ({streak} run(s) in a row)"
        elif below:
            reason = f"{metric}: {ci} below -{rule.tolerance:.3f}, {streak} of {rule.consecutive} runs needed"
        else:
            reason = f"{metric}: {ci} within tolerance {rule.tolerance:.3f}"
        verdicts.append(MetricVerdict(metric, d, below, streak, regressed, reason))
    status: Status = "regressed" if any(v.regressed for v in verdicts) else "ok"
    return status, verdicts
