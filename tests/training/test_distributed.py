"""The same entry point under torchrun: 2 CPU processes (gloo DDP), one MLflow run, one adapter.

(`accelerate launch` starts several CPU processes only through MPI; torchrun needs nothing extra.)
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = [pytest.mark.integration, pytest.mark.slow]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_ddp_on_two_cpu_processes(train_home: Path, tiny_llama: Path, write_config) -> None:
    import mlflow

    config = write_config(
        train_home,
        tiny_llama,
        optim={"max_steps": 6},
        eval={"every_steps": 3},
        checkpoint={"every_steps": 3, "keep": 2},
        heldout={"enabled": False},
    )
    cmd = [
        sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
        "--master_addr", "127.0.0.1", "--master_port", str(_free_port()),
        "-m", "fibreflow.cli.main", "train", "--config", str(config),
    ]  # fmt: skip
    env = os.environ | {"OMP_NUM_THREADS": "1", "GLOO_SOCKET_IFNAME": "lo"}
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=900)
    Path("/tmp/ddp_stderr.txt").write_text(done.stderr)
    assert done.returncode == 0, done.stderr[-4000:]
    exp = mlflow.get_experiment_by_name("test-train")
    runs = mlflow.search_runs([exp.experiment_id], output_format="list")
    assert len(runs) == 1, [(r.info.run_name, r.data.tags.get("world_size")) for r in runs]  # main process only
    [run] = runs
    assert run.data.tags["world_size"] == "2", done.stderr[-3000:]
    assert run.info.status == "FINISHED"
    assert len(mlflow.MlflowClient().get_metric_history(run.info.run_id, "loss")) == 6
    [adapter] = list((train_home / "var/train").glob("*/*/adapter/adapter_model.safetensors"))
    assert adapter.stat().st_size > 0
