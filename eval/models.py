"""Model specs -> generators: what `fibreflow eval --models A,B` accepts.

Every weight spec of `fibreflow.training.weights` (base, latest, run ids, runs:/, models:/, folders), plus:
endpoint:<name>                         an OpenAI-compatible server from eval.yaml's `endpoints`
vllm:<any weight spec>                  the same weights through vLLM's offline engine

With `generation.merge_adapters` a local adapter is scored folded into its dequantized base in `generation.dtype`
(training/merge.py, written once under var/eval/merged): the form the model server serves @champion in.
"""

from __future__ import annotations

import importlib.util
import os
from typing import Any

from fibreflow.core.config import dtype_name, resolve_path
from fibreflow.core.errors import ConfigError
from fibreflow.eval.config import EvalConfig
from fibreflow.eval.generators import EndpointGenerator, Generator, LocalGenerator, VllmGenerator
from fibreflow.training.weights import Weights, load_local, weights

MERGED_DIR = "var/eval/merged"  # <hash of the base and the adapter's files>-<dtype>: merged once, reused after


def identify(spec: str, cfg: EvalConfig) -> dict[str, str]:
    """What `spec` names, without loading weights: the identity logged as tags (and keyed for reuse)."""
    if spec.startswith("endpoint:"):
        ep = _endpoint(spec, cfg)
        return {"kind": "endpoint", "base_url": ep.base_url, "model": ep.model}
    if spec.startswith("vllm:"):
        return weights(spec.removeprefix("vllm:"), cfg.base_model).tags() | {"backend": "vllm"}
    w = weights(spec, cfg.base_model)
    return w.tags() | ({"merged": dtype_name(cfg.generation.dtype)} if _merges(w, cfg) else {})


def _merges(w: Weights, cfg: EvalConfig) -> bool:
    return cfg.generation.merge_adapters and w.adapter is not None


def _local_weights(spec: str, cfg: EvalConfig) -> Weights:
    """The weights a local generator loads: as named, or with the adapter merged (`generation.merge_adapters`)."""
    from fibreflow.training.merge import merged_folder

    w = weights(spec, cfg.base_model)
    if not _merges(w, cfg):
        return w
    folder = merged_folder(w, resolve_path(MERGED_DIR), dtype_name(cfg.generation.dtype))
    return Weights(str(folder), None, w.identity)


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
    model, tok = load_local(_local_weights(spec, cfg), g.dtype)
    return LocalGenerator(spec, model, tok, g.batch_size, g.max_new_tokens, progress)
