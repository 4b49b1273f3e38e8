"""Model specs -> generators: what `fibreflow eval --models A,B` accepts.

base | <catalogue name>                   the base model itself
latest                                  the newest finished training run's adapter
<run id> | runs:/<run id>/<path>        a training run's logged adapter (default path `adapter`)
models:/<name>@<alias> | models:/<name>/<version>   a registered model version
<folder>                                a local adapter (adapter_config.json) or model (config.json) folder
endpoint:<name>                         an OpenAI-compatible server from eval.yaml's `endpoints`
vllm:<any weight spec above>            the same weights through vLLM's offline engine
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fibreflow.core.errors import ConfigError
from fibreflow.eval.config import EvalConfig
from fibreflow.eval.generators import EndpointGenerator, Generator, LocalGenerator, VllmGenerator
from fibreflow.training.config import Quantization

RUN_ID = re.compile(r"^[0-9a-f]{32}$")


@dataclass(frozen=True)
class Weights:
    """Where a model's weights are: a base folder (or hub id) and optionally a LoRA adapter folder."""

    base: str
    adapter: str | None = None
    identity: dict[str, str] = field(default_factory=dict)  # MLflow tags: what exactly was evaluated
    quantization: Quantization | None = None  # how the base was quantized when the adapter was trained


def run_quantization(run_id: str) -> Quantization | None:
    """The 4-bit settings a training run used (its logged params), None for an unquantized base. A QLoRA adapter
    put on the full-precision base answers much worse (demo: 31% vs 77% of held-out terms): load it as trained."""
    import mlflow

    params = mlflow.get_run(run_id).data.params
    if params.get("quantization.load_in_4bit") != "True":
        return None
    fields = ("quant_type", "double_quant", "compute_dtype", "quant_storage")
    return Quantization.model_validate({f: params[f"quantization.{f}"] for f in fields} | {"load_in_4bit": True})


def folder_quantization(adapter: Path) -> Quantization | None:
    from fibreflow.training.train import QUANTIZATION_FILE

    found = adapter / QUANTIZATION_FILE
    q = json.loads(found.read_text())["quantization"] if found.is_file() else None
    return Quantization.model_validate(q) if q and q.get("load_in_4bit") else None


def _catalogue_base(name: str) -> str:
    from fibreflow.training.config import load_catalogue
    from fibreflow.training.models import base_model_path

    models = load_catalogue().models
    if name not in models:
        raise ConfigError(f"model {name!r} is not in configs/models.yaml (known: {', '.join(sorted(models))})")
    return base_model_path(name, models[name])


def _logged_adapter(uri: str, identity: dict[str, str]) -> Weights:
    """An MLflow-logged PEFT model (adapter only, with a pointer to its base) downloaded to a local folder."""
    import mlflow

    try:
        local = Path(mlflow.artifacts.download_artifacts(uri))
    except mlflow.exceptions.MlflowException as exc:
        raise ConfigError(f"{uri}: cannot be read from MLflow ({str(exc).splitlines()[0]})") from None
    flavor = mlflow.models.Model.load(str(local)).flavors.get("transformers", {})
    peft_dir = flavor.get("peft_adaptor")
    base = flavor.get("source_model_name")
    if not peft_dir or not base:
        raise ConfigError(f"{uri}: not a logged PEFT adapter (its MLmodel has no transformers peft_adaptor)")
    if base.startswith(("/", ".")) and not Path(base).is_dir():
        raise ConfigError(f"{uri}: its base model folder {base} does not exist on this machine")
    q = run_quantization(identity["run_id"]) if identity.get("run_id") else None
    return Weights(base, str(local / peft_dir), identity | {"uri": uri, "base_model_path": base}, q)


def _latest_run() -> str:
    """The newest finished `fibreflow train` run (tagged with a config hash), in any experiment."""
    from fibreflow.core.tracking import newest_finished_run

    found = newest_finished_run("tags.config_hash != '' and tags.base_model != ''")
    if found is None:
        raise ConfigError("`latest`: no finished training run in MLflow: run `fibreflow train` first")
    return found.info.run_id


def weights(spec: str, cfg: EvalConfig) -> Weights:
    """Resolve a weight-loading spec (everything but endpoint:)."""
    if spec == "base":
        return Weights(_catalogue_base(cfg.base_model), None, {"kind": "base", "base_model": cfg.base_model})
    if spec == "latest":
        spec = _latest_run()
    if RUN_ID.match(spec):
        spec = f"runs:/{spec}/adapter"
    if spec.startswith("runs:/"):
        return _logged_adapter(spec, {"kind": "run", "run_id": spec.split("/")[1]})
    if spec.startswith("models:/"):
        return _logged_adapter(spec, _registered(spec))
    folder = Path(spec)
    if (folder / "adapter_config.json").is_file():
        base = json.loads((folder / "adapter_config.json").read_text())["base_model_name_or_path"]
        ident = {"kind": "adapter_folder", "path": str(folder.resolve())}
        return Weights(base, str(folder.resolve()), ident, folder_quantization(folder))
    if (folder / "config.json").is_file():
        return Weights(str(folder.resolve()), None, {"kind": "model_folder", "path": str(folder.resolve())})
    return Weights(_catalogue_base(spec), None, {"kind": "base", "base_model": spec})


def _registered(uri: str) -> dict[str, str]:
    """models:/name@alias or models:/name/version -> the version's identity (name, version, source run)."""
    import mlflow

    name, _, rest = uri.removeprefix("models:/").partition("/")
    client = mlflow.MlflowClient()
    try:
        if "@" in name:
            name, alias = name.split("@", 1)
            mv = client.get_model_version_by_alias(name, alias)
        else:
            mv = client.get_model_version(name, rest)
    except mlflow.exceptions.MlflowException as exc:
        raise ConfigError(f"{uri}: no such registered model version ({str(exc).splitlines()[0]})") from None
    return {"kind": "registered", "registered_model": name, "version": str(mv.version), "run_id": mv.run_id or ""}


def load_local(w: Weights, dtype: str) -> tuple[Any, Any]:
    """(model, tokenizer) on CPU/GPU in `dtype`, the adapter (if any) applied, ready to generate."""
    import torch
    from fibreflow.training.models import load_tokenizer
    from transformers import AutoModelForCausalLM

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    q = w.quantization
    if q is not None:  # the base exactly as the adapter was trained on it
        from fibreflow.training.config import bnb_config

        model = AutoModelForCausalLM.from_pretrained(
            w.base, dtype=getattr(torch, q.compute_dtype), quantization_config=bnb_config(q)
        )
    else:
        model = AutoModelForCausalLM.from_pretrained(w.base, dtype=getattr(torch, dtype))
    if w.adapter:
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, w.adapter)
    if q is not None:
        from fibreflow.training.models import allow_4bit_inference_layout

        allow_4bit_inference_layout(model)
    if torch.cuda.is_available():
        model = model.to("cuda")
    has_tok = w.adapter and (Path(w.adapter) / "tokenizer_config.json").is_file()
    return model.eval(), load_tokenizer(w.adapter if has_tok else w.base)


def identify(spec: str, cfg: EvalConfig) -> dict[str, str]:
    """What `spec` names, without loading weights: the identity logged as tags (and keyed for reuse)."""
    if spec.startswith("endpoint:"):
        ep = _endpoint(spec, cfg)
        return {"kind": "endpoint", "base_url": ep.base_url, "model": ep.model}
    if spec.startswith("vllm:"):
        return _tags(weights(spec.removeprefix("vllm:"), cfg)) | {"backend": "vllm"}
    return _tags(weights(spec, cfg))


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
        w = weights(spec.removeprefix("vllm:"), cfg)
        engine = {"quantization": "bitsandbytes"} if w.quantization else {}  # vLLM loads the base 4-bit, as trained
        return VllmGenerator(spec, w.base, w.adapter, g.max_new_tokens, engine_args=engine)
    model, tok = load_local(weights(spec, cfg), g.dtype)
    return LocalGenerator(spec, model, tok, g.batch_size, g.max_new_tokens, progress)


def _tags(w: Weights) -> dict[str, str]:
    return w.identity | {"quantization": w.quantization.quant_type if w.quantization else "none"}
