"""After training: the adapter into MLflow (loadable by URI, its quantization record in the logged model's
metadata), and the optional merged model."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from fibreflow.training.config import TrainConfig
from fibreflow.training.models import allow_4bit_inference_layout
from fibreflow.training.weights import METADATA_KEY, Weights, quantization_record

PIP_REQUIREMENTS = ["torch==2.13.0", "transformers==5.24.0", "peft==0.21.2", "accelerate==1.15.0"]


def finish(cfg: TrainConfig, model: Any, tok: Any, base: str, out: Path) -> dict[str, Any]:
    import mlflow

    tracked = mlflow.active_run() is not None
    result: dict[str, Any] = {}
    allow_4bit_inference_layout(model)  # training is over: generation may use the fast 4-bit layout
    if tracked and cfg.tracking.log_model:
        info = log_adapter(model, tok, base, quantization_record(cfg.quantization))
        result["model_uri"] = info.model_uri
    if cfg.merge:
        from fibreflow.training.merge import merge

        merged = merge(Weights(base, str(out / "adapter"), {}, cfg.quantization), out / "merged", reuse=False)
        result["merged"] = str(merged)
        if tracked:
            mlflow.set_tag("merged_model_path", str(merged))
    return result


def log_adapter(model: Any, tok: Any, base: str, quantization: dict[str, Any] | None) -> Any:
    """Only the adapter (a few MB) with a pointer to its base and the record of how that base was quantized in
    training; loads back with `fibreflow.training.weights.weights("runs:/<id>/adapter")`."""
    import mlflow
    from fibreflow.training.config import load_catalogue

    gen = load_catalogue().generation
    return mlflow.transformers.log_model(
        transformers_model={"model": model, "tokenizer": tok},
        name="adapter",
        task="text-generation",
        base_model_path=base,
        pip_requirements=PIP_REQUIREMENTS,
        model_config={"max_new_tokens": gen.max_new_tokens, "do_sample": gen.temperature > 0}
        | ({"temperature": gen.temperature} if gen.temperature > 0 else {}),
        metadata={METADATA_KEY: quantization},
    )
