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
from typing import TYPE_CHECKING, Literal

from fibreflow.core.config import resolve_path
from fibreflow.core.errors import ConfigError
from fibreflow.serving.config import ServingConfig

if TYPE_CHECKING:
    from fibreflow.serving.vllm import MergedArms

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


def prepare_vllm(cfg: ServingConfig) -> tuple[ServingConfig, subprocess.Popen[bytes], MergedArms]:
    """Start vLLM for the LoRA aliases (the `primary` upstream) and one per merged alias (upstream
    `merged-<alias>`, the arms on that alias pointed at it); returns the config to serve with, the LoRA vLLM and
    the merged arms (their `serve` is the router's alias hook)."""
    import mlflow
    from fibreflow.serving.vllm import MergedArms, start_vllm

    merged = MergedArms(cfg)
    ups = dict(cfg.router.upstreams)
    client = mlflow.MlflowClient()
    for alias in cfg.vllm.merged_aliases:
        try:
            version: str | None = str(client.get_model_version_by_alias(cfg.registered_model, alias).version)
        except mlflow.exceptions.MlflowException:
            version = None  # not set yet: started when it is
        url = merged.serve(alias, version) if version else "http://127.0.0.1:9/v1"
        ups[merged.upstream(alias)] = ups["primary"].model_copy(update={"url": url})
    exps = [
        e.model_copy(
            update={
                "arms": [
                    a.model_copy(update={"upstream": merged.upstream(a.alias)})
                    if a.alias in cfg.vllm.merged_aliases
                    else a
                    for a in e.arms
                ]
            }
        )
        for e in cfg.router.experiments
    ]
    proc, url = start_vllm(cfg)
    router = cfg.router.model_copy(update={"upstreams": ups, "experiments": exps})
    return with_primary(cfg.model_copy(update={"router": router}), url), proc, merged


def upstream_token(cfg: ServingConfig) -> None:
    """The shared token between the router and the upstream it starts: taken from the environment (the variable
    `model_server.api_key_env` names), or made now; the started upstream inherits it (vLLM as VLLM_API_KEY)."""
    import os
    import secrets

    var = cfg.model_server.api_key_env
    if var:
        os.environ.setdefault(var, secrets.token_urlsafe(32))
        os.environ["VLLM_API_KEY"] = os.environ[var]


def serve(
    cfg: ServingConfig, backend: Backend = "local", upstream_url: str | None = None, dry_run: bool = False
) -> None:
    import uvicorn
    from fibreflow.serving.router import create_app

    child: subprocess.Popen[bytes] | None = None
    merged: MergedArms | None = None
    hook = None

    def stop_upstreams() -> None:
        """Stop what was started, once. Also from the app's shutdown: uvicorn ends a SIGTERM'd process by raising
        the signal again once it has stopped, so a `finally` here would never run and the upstream would be left
        running without its router."""
        nonlocal child, merged
        if child is not None:
            child.terminate()
            child.wait(timeout=60)
            child = None
        if merged is not None:
            merged.close()
            merged = None

    try:
        if upstream_url:
            cfg = with_primary(cfg, upstream_url)
        elif backend == "vllm" and dry_run:
            from fibreflow.serving.vllm import alias_specs, vllm_command
            from fibreflow.training.weights import weights

            base = weights(cfg.model_server.model).base
            print(shlex.join(vllm_command(cfg, alias_specs(cfg), base, cfg.vllm.port)))
            return
        elif backend == "vllm":
            upstream_token(cfg)
            cfg, child, merged = prepare_vllm(cfg)
            hook = merged.serve
        elif backend == "local":
            upstream_token(cfg)
            child, url = start_local(cfg)
            cfg = with_primary(cfg, url)
        resolve_path("var/serving").mkdir(parents=True, exist_ok=True)
        uvicorn.run(
            create_app(cfg, alias_hook=hook, on_stop=stop_upstreams),
            host=cfg.router.host,
            port=cfg.router.port,
            log_level="warning",
            loop="uvloop",
            http="httptools",
            proxy_headers=False,
        )
    finally:
        stop_upstreams()
