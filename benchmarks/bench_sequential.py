"""The live A/B test's stopping rule (`fibreflow ab report`): its operating characteristics on simulated thumbs.

    .venv/bin/python benchmarks/bench_sequential.py [--experiments 2000]

Each case: `--experiments` simulated experiments, thumbs up with probability p_a / p_b, read after every batch of
20 votes per arm (up to 100 readings: 2,000 votes per arm) and stopped at the first decision, with the shipped
rule (configs/monitoring.yaml `ab`: alpha 0.05, min_effect 0.05, 30 votes per arm first). The baseline is the
same schedule read with a textbook fixed-sample 95% CI (what "check the dashboard every day" does with a t-test).
Prints the false-winner rate under no difference (target: at most alpha), the share of right winners under a
known effect, and the median votes per arm at the decision.
"""

from __future__ import annotations

import argparse
import time

from fibreflow.monitor.config import Ab
from fibreflow.monitor.sequential import fixed_width, simulate

CASES = [(0.5, 0.5), (0.7, 0.7), (0.9, 0.9), (0.6, 0.7), (0.7, 0.6), (0.8, 0.9), (0.5, 0.55)]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--experiments", type=int, default=2000)
    args = ap.parse_args()
    ab = Ab()
    rule = {"alpha": ab.alpha, "min_effect": ab.min_effect, "min_samples": ab.min_samples,
            "experiments": args.experiments, "batch": 20, "looks": 100}  # fmt: skip
    print(f"{args.experiments} experiments per case, read every 20 votes per arm, alpha {ab.alpha}, "
          f"min_effect {ab.min_effect}, {ab.min_samples} votes first")  # fmt: skip
    print(f"{'p_a':>5}{'p_b':>6}  {'rule':<22}{'false winner':>13}{'right winner':>13}{'futility':>10}"
          f"{'undecided':>10}{'median votes/arm':>18}")  # fmt: skip
    started = time.perf_counter()
    for i, (p_a, p_b) in enumerate(CASES):
        for name, width in (("mSPRT (shipped)", None), ("peeking fixed 95% CI", fixed_width)):
            oc = simulate(p_a, p_b, seed=100 + i, width=width, **rule)  # type: ignore[arg-type]
            if p_a == p_b:
                false, right = oc.winner_a + oc.winner_b, float("nan")
            else:
                right, false = (oc.winner_b, oc.winner_a) if p_b > p_a else (oc.winner_a, oc.winner_b)
            print(f"{p_a:>5}{p_b:>6}  {name:<22}{false:>13.3f}{right:>13.3f}{oc.futility:>10.3f}"
                  f"{oc.undecided:>10.3f}{oc.median_votes_per_arm:>18.0f}")  # fmt: skip
    print(f"({time.perf_counter() - started:.1f} s)")


if __name__ == "__main__":
    main()
