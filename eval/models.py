"""Model specs -> generators: what `fibreflow eval --models A,B` accepts.

Every weight spec of `fibreflow.training.weights` (base, latest, run ids, runs:/, models:/, folders), plus:
endpoint:<name>                         an OpenAI-compatible server from eval.yaml's `endpoints`
vllm:<any weight spec>                  the same weights through vLLM's offline engine
"""

from __future__ import annotations

import importlib.util
import os
from typing import Any

from fibreflow.core.errors import ConfigError
from fibreflow.eval.config import EvalConfig
from fibreflow.eval.generators import EndpointGenerator, Generator, LocalGenerator, VllmGenerator
from fibreflow.training.weights import load_local, weights


def identify(spec: str, cfg: EvalConfig) -> dict[str, str]:
    """What `spec` names, without loading weights: the identity logged as tags (and keyed for reuse)."""
    if spec.startswith("endpoint:"):
        ep = _endpoint(spec, cfg)
        return {"kind": "endpoint", "base_url": ep.base_url, "model": ep.model}
    if spec.startswith("vllm:"):
        return weights(spec.removeprefix("vllm:"), cfg.base_model).tags() | {"backend": "vllm"}
    return weights(spec, cfg.base_model).tags()


def _endpoint(spec: str, cfg: EvalConfig) -> Any:
    name = spec.removeprefix("endpoint:")
    if name not in cfg.endpoints:
        raise ConfigError(f"{spec}: no endpoint {name!r} in eval.yaml (known: {', '.join(cfg.endpoints) or '-'})")
    return cfg.endpoints[name]


def generator(spec: str, cfg: EvalConfig, progress: bool = False) -> Generator:
    """A ready generator for `spec`."""
    g = cfg.generation
    if spec.startswith("endpoint:"):
        ep = _endpoint(spec, cfg)
        key = os.environ.get(ep.api_key_env, "none") if ep.api_key_env else "none"
        return EndpointGenerator(
            spec, ep.base_url, ep.model, key, concurrency=cfg.endpoint_concurrency, max_new_tokens=g.max_new_tokens
        )
    if spec.startswith("vllm:"):
        if importlib.util.find_spec("vllm") is None:
            raise ConfigError(f"{spec}: vllm is not installed here (GPU deployments: pip install '.[gpu]')")
        w = weights(spec.removeprefix("vllm:"), cfg.base_model)
        engine = {"quantization": "bitsandbytes"} if w.quantization else {}  # vLLM loads the base 4-bit, as trained
        return VllmGenerator(spec, w.base, w.adapter, g.max_new_tokens, engine_args=engine)
    model, tok = load_local(weights(spec, cfg.base_model), g.dtype)
    return LocalGenerator(spec, model, tok, g.batch_size, g.max_new_tokens, progress)
