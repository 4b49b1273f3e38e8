"""Eval fixtures: real HTTP servers on loopback (scripted upstreams and judges); a home with a built dataset."""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
from fibreflow.core import db
from fibreflow.datasets import build
from fibreflow.datasets.config import load_data_config


@pytest.fixture
def serve() -> Iterator[Callable[[type[BaseHTTPRequestHandler]], str]]:
    """Start a threaded HTTP server with the given handler class; returns its OpenAI-style base URL (…/v1)."""
    servers: list[ThreadingHTTPServer] = []

    def start(handler: type[BaseHTTPRequestHandler]) -> str:
        server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
        server.daemon_threads = True
        threading.Thread(target=server.serve_forever, daemon=True).start()
        servers.append(server)
        return f"http://127.0.0.1:{server.server_address[1]}/v1"

    yield start
    for s in servers:
        s.shutdown()


@pytest.fixture
def eval_home(project_tmp: Path, embedded_url: str, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A project home: the embedded test database (seeded, embedded) as DATABASE_URL, its dataset built."""
    import mlflow

    monkeypatch.setenv("DATABASE_URL", embedded_url)
    uri = f"sqlite:///{project_tmp / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    mlflow.set_tracking_uri(uri)
    with db.connect(embedded_url) as conn:
        build.build(conn, load_data_config(), progress=False)
    return project_tmp


@pytest.fixture
def random_adapter(tiny_llama: Path, tmp_path: Path) -> Path:
    """A LoRA adapter folder on the tiny Llama with non-zero B (it changes the answers), tokenizer included."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out = tmp_path / "adapter"
    torch.manual_seed(3)
    model = AutoModelForCausalLM.from_pretrained(tiny_llama)
    lora = LoraConfig(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
    get_peft_model(model, lora).save_pretrained(out)
    AutoTokenizer.from_pretrained(tiny_llama).save_pretrained(out)
    return out
