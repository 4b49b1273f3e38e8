"""Training fixtures: a project home with a built dataset, and small train configs for the tiny Llama."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest
import yaml


@pytest.fixture
def train_home(project_tmp: Path, seeded_url: str, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A project home with a dataset built from the seeded database (real build, real Parquet)."""
    import mlflow
    from fibreflow.core import db
    from fibreflow.datasets import build

    uri = f"sqlite:///{project_tmp / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    mlflow.set_tracking_uri(uri)  # the process-wide URI an earlier test's run may have set
    cfg = build.load_data_config()
    with db.connect(seeded_url) as conn:
        build.build(conn, cfg, progress=False)
    return project_tmp


@pytest.fixture
def write_config() -> Callable[..., Path]:
    return _write_config


def _write_config(home: Path, tiny: Path, **sections: dict) -> Path:
    """A train config for the tiny model: small, fast, every mechanism switched on."""
    tree: dict = {
        "model": "smollm2-135m-instruct",
        "model_path": str(tiny),
        "dtype": "float32",
        "quantization": None,
        "lora": {"r": 4, "alpha": 8, "dropout": 0.0, "target_modules": ["q_proj", "v_proj", "up_proj"]},
        "data": {"dataset": "terminology", "max_train_rows": 48, "max_eval_rows": 8},
        "optim": {"max_steps": 12, "lr": 5e-3, "batch_size": 4, "seq_len": 128, "warmup_ratio": 0.1},
        "eval": {"every_steps": 4, "early_stopping_patience": None},
        "checkpoint": {"every_steps": 4, "keep": 5},
        "heldout": {"known": 4, "unknown": 2, "batch_size": 4, "max_new_tokens": 8},
        "tracking": {"experiment": "test-train", "system_metrics": False},
    }
    for key, value in sections.items():
        tree[key] = value if not isinstance(value, dict) or not isinstance(tree.get(key), dict) else tree[key] | value
    path = home / "train.yaml"
    path.write_text(yaml.safe_dump(tree))
    return path
