"""The GPU benchmark can only run on a GPU machine; its code runs here on a tiny shape so it cannot rot."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "bench_train_gpu.py"


@pytest.mark.integration
def test_gpu_benchmark_script_runs_on_a_tiny_shape() -> None:
    done = subprocess.run(
        [sys.executable, str(SCRIPT), "--tiny", "--steps", "1"], capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stderr[-3000:]
    table = done.stdout.splitlines()[-3:]
    assert [line.split()[0] for line in table] == ["bf16", "NF4", "NF4"]
    assert all(float(line.split()[-5]) > 0 for line in table)  # tokens/s of each variant
