"""The main job's wall time from scratch (target: <= 20 min on 2 cores), and again with nothing changed.

    python benchmarks/bench_pipeline.py     # ~17 min on 2 cores

Runs `fibreflow main` twice in a fresh project home (its own embedded database, datasets, MLflow store under a
temp folder; configs from this checkout), then prints each run's wall time and peak RSS, the ratio between
them, and the first run's stages (child runs) with their times.
"""

from __future__ import annotations

import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
FIBREFLOW = Path(sys.executable).parent / "fibreflow"


def run(home: Path) -> tuple[float, float]:
    env = os.environ | {"FIBREFLOW_HOME": str(home), "HF_HUB_OFFLINE": "1", "MLFLOW_DISABLE_TELEMETRY": "true",
                        "RAGAS_DO_NOT_TRACK": "true"}  # fmt: skip
    env.pop("MLFLOW_TRACKING_URI", None)
    env.pop("DATABASE_URL", None)
    start = time.perf_counter()
    subprocess.run([str(FIBREFLOW), "main"], env=env, check=True, stdout=subprocess.DEVNULL)
    peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1e6  # GB (largest child so far)
    return time.perf_counter() - start, peak


def stages(home: Path) -> list[tuple[str, float]]:
    """The first parent run's children, in start order, with their durations."""
    import mlflow

    mlflow.set_tracking_uri(f"sqlite:///{home / 'var/mlflow/mlflow.db'}")
    parents = mlflow.search_runs(search_all_experiments=True, filter_string="attributes.run_name = 'pipeline'",
                                 order_by=["attributes.start_time ASC"], output_format="list")  # fmt: skip
    children = mlflow.search_runs(search_all_experiments=True, output_format="list",
                                  filter_string=f"tags.mlflow.parentRunId = '{parents[0].info.run_id}'",
                                  order_by=["attributes.start_time ASC"])  # fmt: skip
    return [(r.info.run_name, (r.info.end_time - r.info.start_time) / 1000) for r in children]


def main() -> None:
    with tempfile.TemporaryDirectory(prefix="fibreflow-bench-") as tmp:
        home = Path(tmp)
        (home / "configs").symlink_to(ROOT / "configs")
        try:
            first, peak1 = run(home)
            second, peak2 = run(home)
            steps = stages(home)
        finally:
            subprocess.run([str(FIBREFLOW), "db", "down"], env=os.environ | {"FIBREFLOW_HOME": str(home)},
                           stdout=subprocess.DEVNULL, check=False)  # fmt: skip
    print("| run | wall | peak RSS (largest process) | vs from scratch |")
    print("|---|---|---|---|")
    print(f"| from scratch | {first / 60:.1f} min | {peak1:.1f} GB | 1.00x |")
    print(f"| again, nothing changed (every step reused) | {second:.0f} s | {peak2:.1f} GB | {second / first:.3f}x |")
    print("\n| stage (first run) | seconds |\n|---|---|")
    for name, seconds in steps:
        print(f"| {name} | {seconds:.0f} |")


if __name__ == "__main__":
    main()
