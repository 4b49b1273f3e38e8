"""Registry alias moves reach the router and its upstream without a restart (real MLflow, real model server)."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import httpx
import pytest
from fibreflow.serving.config import load_serving_config
from fibreflow.serving.model_server import build_engine, create_model_app
from fibreflow.serving.router import create_app

MSG = [{"role": "user", "content": "What is a BOQ?"}]


def ask(base: str, arm: str) -> httpx.Response:
    body = {"model": "fibreflow-assistant", "messages": MSG, "max_tokens": 6, "temperature": 0}
    return httpx.post(f"{base}/v1/chat/completions", json=body, headers={"x-fibreflow-arm": arm}, timeout=30)


@pytest.mark.integration
def test_a_promotion_reaches_the_router_and_the_model_server(
    tiny_home: Path, tiny_llama: Path, tmp_path: Path, train_run: Any, run_app: Any
) -> None:
    import mlflow
    from fibreflow.registry.registry import register

    v1 = register(train_run(tiny_llama, tmp_path / "a", 1))["version"]
    client = mlflow.MlflowClient()
    client.set_registered_model_alias("fibreflow-assistant", "champion", v1)
    engine = build_engine(load_serving_config({"model_server.dtype": "float32"}))
    try:
        assert engine.models() == ["smollm2-135m-instruct", "fibreflow-assistant-v1"]
        upstream = run_app(create_model_app(engine, default_max_tokens=8, adapter_roots=(tiny_home / "var/models",)))
        cfg = load_serving_config({
            "router.upstreams.primary.url": f"{upstream}/v1", "router.alias_poll_s": 0.2,
            "router.auth.required": False, "router.audit.enabled": False, "router.schedule.periods": [],
            "router.cache.enabled": False})  # fmt: skip
        base = run_app(create_app(cfg, redis_url=""))
        first = ask(base, "champion")
        assert first.headers["x-fibreflow-model-version"] == v1 and ask(base, "challenger").status_code == 200
        v2 = register(train_run(tiny_llama, tmp_path / "b", 2))["version"]  # @challenger -> v2
        client.set_registered_model_alias("fibreflow-assistant", "champion", v2)  # promoted
        deadline = time.monotonic() + 20
        while ask(base, "champion").headers["x-fibreflow-model-version"] != v2:
            assert time.monotonic() < deadline, "the router never saw the alias move"
            time.sleep(0.1)
        assert "fibreflow-assistant-v2" in engine.models()  # the router had the upstream load it
        direct = httpx.post(f"{upstream}/v1/chat/completions", json={"model": "fibreflow-assistant-v2",
                            "messages": MSG, "max_tokens": 6, "temperature": 0}).json()  # fmt: skip
        now = ask(base, "champion").json()
        assert now["choices"][0]["message"]["content"] == direct["choices"][0]["message"]["content"]
        assert now["choices"][0]["message"]["content"] != first.json()["choices"][0]["message"]["content"]
        models = httpx.get(f"{base}/v1/models").json()["data"]
        assert models[0]["arms"] == {"champion": "fibreflow-assistant-v2", "challenger": "fibreflow-assistant-v2"}
    finally:
        engine.close()
