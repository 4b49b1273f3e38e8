"""The serving spec: what the serving layer needs to run a registered version (base, adapter, the 4-bit settings
it was trained with, context length, chat template, generation defaults). Written once by `register` as an
artifact of the training run that made the weights (the version's `serving_spec` tag points at it) and read back
only through this module.
"""

from __future__ import annotations

from typing import Any

from fibreflow.core.config import Strict
from fibreflow.core.errors import ConfigError
from fibreflow.training.config import Quantization
from pydantic import PositiveInt

TAG = "serving_spec"


class ServingSpec(Strict):
    registered_model: str
    version: str
    base_model: str | None  # the catalogue name the adapter was trained from
    base_model_path: str
    adapter_uri: str
    quantization: Quantization | None  # None: an unquantized base; else load it 4-bit exactly so
    max_context: PositiveInt | None
    max_new_tokens: PositiveInt
    chat_template: str | None
    dtype: str | None
    merged_model_path: str | None = None  # written by `fibreflow train --merge`, if it was

    @staticmethod
    def artifact_path(version: str) -> str:
        return f"serving/spec-v{version}.json"


def write_spec(client: Any, run_id: str, spec: ServingSpec) -> str:
    """Log `spec` with the training run; returns the URI the version's `serving_spec` tag holds."""
    path = ServingSpec.artifact_path(spec.version)
    client.log_dict(run_id, spec.model_dump(mode="json"), path)
    return f"runs:/{run_id}/{path}"


def read_spec(mv: Any) -> ServingSpec:
    """The spec of a registered version (an `mlflow` ModelVersion)."""
    import mlflow

    if TAG not in mv.tags:
        raise ConfigError(f"{mv.name} v{mv.version} has no serving spec: register it again (`fibreflow register`)")
    return ServingSpec.model_validate(mlflow.artifacts.load_dict(mv.tags[TAG]))
