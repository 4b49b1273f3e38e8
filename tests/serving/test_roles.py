"""Install by role: a router installed with the `serve` extra alone (at constraints.txt's versions) has no torch,
ragas or bitsandbytes, and still answers chat, embeddings and /ask, its embeddings coming from the model server's
/v1/embeddings with the same vectors as the in-process model; an embeddings upstream of another vector space is
refused by the same guard."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import psycopg
import pytest
from fibreflow.datasets.retrieval import Retriever
from fibreflow.serving.model_server import create_model_app
from servers import free_port, until
from toolchat import SEARCH_ARGS, SEARCH_QUESTION

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def serve_venv(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A fresh venv with `pip install -c constraints.txt '.[serve]'` (from the package index, like the router
    image)."""
    venv = tmp_path_factory.mktemp("serve-venv")
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    pip = [str(venv / "bin" / "python"), "-m", "pip", "--disable-pip-version-check", "-q"]
    subprocess.run([*pip, "install", "-c", str(ROOT / "constraints.txt"), f"{ROOT}[serve]"], check=True,
                   timeout=900)  # fmt: skip
    return venv


@pytest.mark.integration
@pytest.mark.slow
def test_the_serve_extra_has_no_training_or_evaluation_stack(serve_venv: Path) -> None:
    probe = "import importlib.util as u, json; print(json.dumps({m: u.find_spec(m) is not None for m in %r}))"
    mods = ["torch", "transformers", "ragas", "bitsandbytes", "sentence_transformers", "peft", "fastapi", "mlflow"]
    out = subprocess.run([str(serve_venv / "bin" / "python"), "-c", probe % mods], capture_output=True, text=True,
                         check=True)  # fmt: skip
    found = json.loads(out.stdout)
    assert [m for m in mods if found[m]] == ["fastapi", "mlflow"]  # mlflow-skinny: the registry client


@pytest.mark.integration
@pytest.mark.slow
def test_a_router_without_torch_serves_chat_embeddings_and_ask(
    serve_venv: Path, tool_engine: Any, embedder: Any, embedded_url: str, run_app: Any, project_tmp: Path
) -> None:
    model_server = run_app(create_model_app(tool_engine, default_max_tokens=64, embedder=embedder))
    port = free_port()
    arms = [{"name": "a", "upstream": "primary", "model": "tiny", "weight": 1.0}]
    sets = {
        "router.port": port,
        "router.upstreams": {"primary": {"url": f"{model_server}/v1"}},
        "router.experiments": [{"model": "assistant", "salt": "s", "arms": arms}],
        "router.fallback": None,
        "router.schedule.periods": [],
        "router.auth.required": False,
        "router.audit.enabled": False,
        "router.fibreflow.model": "assistant",
        "router.embeddings.upstream": "primary",
    }
    args = [a for k, v in sets.items() for a in ("--set", f"{k}={json.dumps(v)}")]
    env = os.environ | {"DATABASE_URL": embedded_url, "FIBREFLOW_HOME": str(project_tmp)}
    log = project_tmp / "router.log"
    with log.open("wb") as err:
        proc = subprocess.Popen([str(serve_venv / "bin" / "fibreflow"), "serve", "--backend", "none", *args], env=env,
                                stdout=subprocess.DEVNULL, stderr=err)  # fmt: skip
    base = f"http://127.0.0.1:{port}"
    try:

        def up() -> bool:
            assert proc.poll() is None, f"the router exited: {log.read_text()[-3000:]}"
            try:
                return httpx.get(f"{base}/health", timeout=1).status_code == 200
            except httpx.HTTPError:
                return False

        until(up, 60, "the serve-only router answering")
        chat = {"model": "assistant", "messages": [{"role": "user", "content": "What is a BOQ?"}], "max_tokens": 4}
        assert httpx.post(f"{base}/v1/chat/completions", json=chat, timeout=60).status_code == 200
        texts = ["pole planted on Main Street", "BOQ total for trenching"]
        got = httpx.post(f"{base}/v1/embeddings", json={"model": "default", "input": texts,
                                                        "encoding_format": "float"}, timeout=60)  # fmt: skip
        assert got.status_code == 200, got.text
        body = got.json()
        assert (body["model"], body["dimensions"], body["revision"]) == (embedder.spec.name, 384,
                                                                        embedder.spec.revision)  # fmt: skip
        vectors = np.array([d["embedding"] for d in body["data"]], dtype=np.float32)
        assert np.allclose(vectors, embedder.encode(texts), atol=1e-5)
        assert body["usage"]["prompt_tokens"] == embedder.count_tokens(texts)
        ask = httpx.post(f"{base}/v1/fibreflow/ask", json={"question": SEARCH_QUESTION, "k": 3}, timeout=60)
        assert ask.status_code == 200, ask.text
        search = ask.json()["tool_calls"][0]  # the model searched the records: embedded by the upstream
        assert search["name"] == "search_records" and search["arguments"]["query"] == SEARCH_ARGS["query"]
        with psycopg.connect(embedded_url) as conn:  # the same records as the in-process model finds
            want = Retriever(embedder, "record_embeddings").search(conn, SEARCH_ARGS["query"], 3)
        assert search["record_ids"] == [h.record_id for h in want]
    finally:
        proc.terminate()
        proc.wait(30)


@pytest.mark.integration
def test_an_embeddings_upstream_of_another_space_is_refused(
    embedded_url: str, tool_engine: Any, run_app: Any, project_tmp: Path
) -> None:
    """An upstream that serves 8-d vectors (another model) under the records' model name: /ask says the table holds
    384-d vectors and how to fix it, never a search in the wrong space; an upstream that is down: a 503 naming it."""
    from fastapi import FastAPI
    from fibreflow.serving.router import create_app
    from serving_helpers import tool_config

    other = FastAPI()

    @other.post("/v1/embeddings")
    async def embeddings(body: dict[str, Any]) -> dict[str, Any]:
        data = [{"object": "embedding", "index": i, "embedding": [1.0] * 8} for i, _ in enumerate(body["input"])]
        return {"object": "list", "data": data, "model": body["model"], "revision": "other", "usage": {}}

    model_server = run_app(create_model_app(tool_engine, default_max_tokens=64))
    wrong = run_app(other)
    for url, status, message in ((f"{wrong}/v1", 503, "holds 384-d vectors"),
                                 (f"http://127.0.0.1:{free_port()}/v1", 503, "unreachable")):  # fmt: skip
        cfg = tool_config(model_server, upstreams={"local": {"url": f"{model_server}/v1"},
                                                   "emb": {"url": url, "connect_timeout_s": 1}},
                          embeddings={"model": "bundled", "upstream": "emb"})  # fmt: skip
        api = run_app(create_app(cfg, redis_url="", database_url=embedded_url, watch=False))
        r = httpx.post(f"{api}/v1/fibreflow/ask", json={"question": SEARCH_QUESTION}, timeout=60)  # it searches
        assert r.status_code == status and message in r.json()["error"]["message"], r.text
