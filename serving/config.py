"""Serving config (`configs/serving.yaml`): the local model server and the router."""

from __future__ import annotations

from typing import Any, Literal

from fibreflow.core.config import Strict, load_config
from pydantic import Field, PositiveInt


class ModelServer(Strict):
    host: str = "127.0.0.1"
    port: int = 8001
    model: str = "smollm2-135m-instruct"  # catalogue name or model folder; adapters from the registry must match it
    dtype: Literal["float32", "bfloat16"] = "bfloat16"
    max_batch: PositiveInt = 16
    batch_wait_ms: float = Field(5.0, ge=0)
    max_new_tokens: PositiveInt = 256
    registry_aliases: list[str] = Field(default_factory=lambda: ["champion", "challenger"])


class ServingConfig(Strict):
    registered_model: str = "fibreflow-assistant"
    model_server: ModelServer = ModelServer()


def load_serving_config(overrides: dict[str, Any] | None = None) -> ServingConfig:
    return load_config(ServingConfig, "serving", overrides)


def served_name(registered_model: str, version: str | int) -> str:
    """What an upstream (this model server, vLLM) calls a registered version's adapter: `<model>-v<version>`."""
    return f"{registered_model}-v{version}"
