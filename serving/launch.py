"""`fibreflow serve`: the router, with the upstream it needs started first.

backend `local`: `fibreflow serve-model` as a child process (the embedded CPU upstream);
backend `vllm`: vLLM from the registry's serving specs (serving/vllm.py), or `--upstream-url` of one running;
backend `none`: the upstreams in configs/serving.yaml are already running.
The started upstream becomes the `primary` upstream; it is stopped when the router stops.
"""

from __future__ import annotations

import shlex
import subprocess
import sys
from pathlib import Path
from typing import Literal

from fibreflow.core.config import resolve_path
from fibreflow.core.errors import ConfigError
from fibreflow.serving.config import ServingConfig

Backend = Literal["none", "local", "vllm"]


def with_primary(cfg: ServingConfig, url: str) -> ServingConfig:
    ups = cfg.router.upstreams
    if "primary" not in ups:
        raise ConfigError("router.upstreams has no `primary` upstream for the started backend to take")
    primary = ups["primary"].model_copy(update={"url": url})
    return cfg.model_copy(update={"router": cfg.router.model_copy(update={"upstreams": ups | {"primary": primary}})})


def start_local(cfg: ServingConfig) -> tuple[subprocess.Popen[bytes], str]:
    from fibreflow.serving.vllm import launch

    ms = cfg.model_server
    fibreflow = Path(sys.executable).parent / "fibreflow"
    cmd = [
        str(fibreflow),
        "serve-model",
        "--set",
        f"model_server.port={ms.port}",
        "--set",
        f"model_server.host={ms.host}",
    ]
    url = f"http://{ms.host}:{ms.port}/v1"
    return launch(cmd, {}, url, 600), url


def serve(
    cfg: ServingConfig, backend: Backend = "local", upstream_url: str | None = None, dry_run: bool = False
) -> None:
    import uvicorn
    from fibreflow.serving.router import create_app

    child = None
    try:
        if upstream_url:
            cfg = with_primary(cfg, upstream_url)
        elif backend == "vllm" and dry_run:
            from fibreflow.eval.config import load_eval_config
            from fibreflow.eval.models import weights
            from fibreflow.serving.vllm import alias_specs, vllm_command

            base = weights(cfg.model_server.model, load_eval_config()).base
            print(shlex.join(vllm_command(cfg, alias_specs(cfg), base, cfg.vllm.port)))
            return
        elif backend == "vllm":
            from fibreflow.serving.vllm import start_vllm

            child, url = start_vllm(cfg)
            cfg = with_primary(cfg, url)
        elif backend == "local":
            child, url = start_local(cfg)
            cfg = with_primary(cfg, url)
        resolve_path("var/serving").mkdir(parents=True, exist_ok=True)
        uvicorn.run(
            create_app(cfg),
            host=cfg.router.host,
            port=cfg.router.port,
            log_level="warning",
            loop="uvloop",
            http="httptools",
            proxy_headers=False,
        )
    finally:
        if child is not None:
            child.terminate()
            child.wait(timeout=60)
