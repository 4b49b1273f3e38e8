"""What training produces, and how to load it back: a base model and optionally a LoRA adapter, with the 4-bit
settings the adapter was trained with (a QLoRA adapter is only right on its base quantized the same way: on the
full-precision base the demo scores 31% instead of 75% of held-out terms).

The quantization is recorded one way: `fibreflow_quantization.json` beside the adapter's weights, written by
training; logged to MLflow, the same record travels in the logged model's metadata.

Specs every stage accepts:
    base | <catalogue name>                              the base model itself
    latest                                               the newest finished training run's adapter
    <run id> | runs:/<run id>/<path>                     a training run's logged adapter (default path `adapter`)
    models:/<name>@<alias> | models:/<name>/<version>    a registered model version
    <folder>                                             a local adapter (adapter_config.json) or model folder
Logged adapters are downloaded once into `var/models/artifacts/` (the only place a model server loads adapters
from at run time), written to a temp folder and renamed: never half-written.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fibreflow.core.config import resolve_path
from fibreflow.core.errors import ConfigError
from fibreflow.training.config import Quantization

RUN_ID = re.compile(r"^[0-9a-f]{32}$")
QUANTIZATION_FILE = "fibreflow_quantization.json"
METADATA_KEY = "fibreflow_quantization"
ARTIFACTS_DIR = "var/models/artifacts"


@dataclass(frozen=True)
class Weights:
    """Where a model's weights are: a base folder (or hub id) and optionally a LoRA adapter folder."""

    base: str
    adapter: str | None = None
    identity: dict[str, str] = field(default_factory=dict)  # MLflow tags: what exactly this is
    quantization: Quantization | None = None  # how the base was quantized when the adapter was trained

    def tags(self) -> dict[str, str]:
        return self.identity | {"quantization": self.quantization.quant_type if self.quantization else "none"}


def quantization_record(q: Quantization | None) -> dict[str, Any] | None:
    """The record written beside an adapter (None: trained on an unquantized base)."""
    return q.model_dump() if q is not None and q.load_in_4bit else None


def write_quantization(adapter: Path, q: Quantization | None) -> None:
    (adapter / QUANTIZATION_FILE).write_text(json.dumps({"quantization": quantization_record(q)}))


def _quantization(record: dict[str, Any] | None) -> Quantization | None:
    return Quantization.model_validate(record) if record and record.get("load_in_4bit") else None


def folder_quantization(adapter: Path) -> Quantization | None:
    found = adapter / QUANTIZATION_FILE
    return _quantization(json.loads(found.read_text())["quantization"]) if found.is_file() else None


def catalogue_base(name: str) -> str:
    """A catalogue entry's base model as a path `from_pretrained` loads offline."""
    from fibreflow.training.config import load_catalogue
    from fibreflow.training.models import base_model_path

    models = load_catalogue().models
    if name not in models:
        raise ConfigError(f"model {name!r} is not in configs/models.yaml (known: {', '.join(sorted(models))})")
    return base_model_path(name, models[name])


def latest_run() -> str:
    """The newest finished `fibreflow train` run (tagged with a config hash), in any experiment."""
    from fibreflow.core.tracking import newest_finished_run

    found = newest_finished_run("tags.config_hash != '' and tags.base_model != ''")
    if found is None:
        raise ConfigError("`latest`: no finished training run in MLflow: run `fibreflow train` first")
    return found.info.run_id


def _download(uri: str, key: str) -> Path:
    """The artifact at `uri`, downloaded once to var/models/artifacts/<key> (temp folder, then rename)."""
    import mlflow

    dest = resolve_path(ARTIFACTS_DIR) / key
    if (dest / "MLmodel").is_file():
        return dest
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{key}-", dir=dest.parent))
    try:
        local = Path(mlflow.artifacts.download_artifacts(uri, dst_path=str(tmp)))
        try:
            local.rename(dest)
        except OSError:  # another process finished first: its copy is as good
            if not (dest / "MLmodel").is_file():
                raise
    except mlflow.exceptions.MlflowException as exc:
        raise ConfigError(f"{uri}: cannot be read from MLflow ({str(exc).splitlines()[0]})") from None
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return dest


def _logged_adapter(uri: str, key: str, identity: dict[str, str]) -> Weights:
    """An MLflow-logged PEFT model (adapter only, with a pointer to its base) as a local folder."""
    import mlflow

    local = _download(uri, key)
    logged = mlflow.models.Model.load(str(local))
    flavor = logged.flavors.get("transformers", {})
    peft_dir, base = flavor.get("peft_adaptor"), flavor.get("source_model_name")
    if not peft_dir or not base:
        raise ConfigError(f"{uri}: not a logged PEFT adapter (its MLmodel has no transformers peft_adaptor)")
    if base.startswith(("/", ".")) and not Path(base).is_dir():
        raise ConfigError(f"{uri}: its base model folder {base} does not exist on this machine")
    q = _quantization((logged.metadata or {}).get(METADATA_KEY))
    return Weights(base, str(local / peft_dir), identity | {"uri": uri, "base_model_path": base}, q)


def _registered(uri: str) -> tuple[str, str, dict[str, str]]:
    """models:/name@alias or models:/name/version -> (name, version, identity)."""
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
    version = str(mv.version)
    identity = {"kind": "registered", "registered_model": name, "version": version, "run_id": mv.run_id or "",
                "source": mv.source or ""}  # fmt: skip
    return name, version, identity


def weights(spec: str, base_model: str | None = None) -> Weights:
    """Resolve a spec (see the module docstring); `base_model` is the catalogue name that `base` means."""
    if spec == "base":
        if base_model is None:
            raise ConfigError("`base`: no base model configured")
        return Weights(catalogue_base(base_model), None, {"kind": "base", "base_model": base_model})
    if spec == "latest":
        spec = latest_run()
    if RUN_ID.match(spec):
        spec = f"runs:/{spec}/adapter"
    if spec.startswith("runs:/"):
        run_id, _, path = spec.removeprefix("runs:/").partition("/")
        key = f"run-{run_id}-{path.strip('/').replace('/', '-') or 'root'}"
        return _logged_adapter(spec, key, {"kind": "run", "run_id": run_id})
    if spec.startswith("models:/"):
        name, version, identity = _registered(spec)
        # keyed by what the version is, not only its number: another store's (or a reset store's) v1 is another model
        digest = hashlib.sha256(f"{identity['run_id']}|{identity['source']}".encode()).hexdigest()[:12]
        return _logged_adapter(f"models:/{name}/{version}", f"{name}-v{version}-{digest}", identity)
    folder = Path(spec)
    if (folder / "adapter_config.json").is_file():
        base = json.loads((folder / "adapter_config.json").read_text())["base_model_name_or_path"]
        ident = {"kind": "adapter_folder", "path": str(folder.resolve())}
        return Weights(base, str(folder.resolve()), ident, folder_quantization(folder))
    if (folder / "config.json").is_file():
        return Weights(str(folder.resolve()), None, {"kind": "model_folder", "path": str(folder.resolve())})
    return Weights(catalogue_base(spec), None, {"kind": "base", "base_model": spec})


def load_local(w: Weights, dtype: str) -> tuple[Any, Any]:
    """(model, tokenizer) on CPU/GPU in `dtype`, the adapter (if any) applied, ready to generate."""
    import torch
    from fibreflow.core.config import torch_dtype
    from fibreflow.training.models import load_tokenizer
    from transformers import AutoModelForCausalLM

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    q = w.quantization
    if q is not None:  # the base exactly as the adapter was trained on it
        from fibreflow.training.config import bnb_config

        model = AutoModelForCausalLM.from_pretrained(
            w.base, dtype=torch_dtype(q.compute_dtype), quantization_config=bnb_config(q)
        )
    else:
        model = AutoModelForCausalLM.from_pretrained(w.base, dtype=torch_dtype(dtype))
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
