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
    engine, _ = build_engine(load_serving_config({"model_server.dtype": "float32", "model_server.merged_aliases": []}))
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


@pytest.mark.integration
def test_the_champion_is_served_merged_and_answers_as_its_adapter(
    tiny_home: Path, tiny_llama: Path, tmp_path: Path, train_run: Any, run_app: Any
) -> None:
    """model_server.merged_aliases: @champion runs on an engine of its own with its adapter folded into the base
    (written once, reused), answering as the adapter on the base does; @challenger stays a LoRA module."""
    import mlflow
    from fibreflow.core.config import resolve_path
    from fibreflow.registry.registry import register

    client = mlflow.MlflowClient()
    v1 = register(train_run(tiny_llama, tmp_path / "a", 1, steps=3))["version"]
    client.set_registered_model_alias("fibreflow-assistant", "champion", v1)
    v2 = register(train_run(tiny_llama, tmp_path / "b", 2, steps=3))["version"]  # @challenger
    cfg = load_serving_config({"model_server.dtype": "float32"})
    assert cfg.model_server.merged_aliases == ["champion"]  # the shipped default
    engine, merged = build_engine(cfg)
    lora, _ = build_engine(load_serving_config({"model_server.dtype": "float32", "model_server.merged_aliases": []}))
    try:
        champion, challenger = f"fibreflow-assistant-v{v1}", f"fibreflow-assistant-v{v2}"
        assert list(merged) == [champion] and engine.models() == ["smollm2-135m-instruct", challenger]
        [folder] = resolve_path("var/serving/merged").glob(f"{champion}-*-float32")
        assert (folder / "config.json").is_file()
        server, reference = run_app(create_model_app(engine, merged=merged)), run_app(create_model_app(lora))
        ids = {m["id"] for m in httpx.get(f"{server}/v1/models").json()["data"]}
        assert ids == {"smollm2-135m-instruct", champion, challenger}
        for model in (champion, challenger):
            for question in ("What is a BOQ?", "Define pole", "How far along is project 3?"):
                body = {"model": model, "messages": [{"role": "user", "content": question}], "max_tokens": 12,
                        "temperature": 0}  # fmt: skip
                got = httpx.post(f"{server}/v1/chat/completions", json=body, timeout=60).json()
                want = httpx.post(f"{reference}/v1/chat/completions", json=body, timeout=60).json()
                assert got["choices"][0]["message"]["content"] == want["choices"][0]["message"]["content"], model
        refused = httpx.post(f"{server}/v1/load_lora_adapter", json={"lora_name": champion, "lora_path": "/x"})
        assert refused.status_code in (400, 403)
        health = httpx.get(f"{server}/health").json()
        assert champion in health["models"] and health["rows"] > 0
    finally:
        for e in (engine, lora, *merged.values()):
            e.close()
