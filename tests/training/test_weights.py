"""Weight specs resolve to the exact weights named: run ids, runs:/ and models:/ URIs, folders; a QLoRA adapter
loads on its base quantized as in training."""

from __future__ import annotations

from pathlib import Path

import pytest
from fibreflow.training.weights import QUANTIZATION_FILE, load_local, weights


def _adapter(tiny: Path, out: Path):
    """A LoRA adapter on the tiny Llama with non-zero B (so it changes the logits), saved to `out`."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.manual_seed(1)
    model = AutoModelForCausalLM.from_pretrained(tiny, dtype=torch.float32)
    peft = get_peft_model(model, LoraConfig(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False))
    tok = AutoTokenizer.from_pretrained(tiny)
    peft.save_pretrained(out)
    tok.save_pretrained(out)
    return peft.eval(), tok


def _logits(model, tok):
    import torch

    ids = tok("Fusion splicing joins fibres", return_tensors="pt")["input_ids"]
    with torch.no_grad():
        return model(input_ids=ids).logits


@pytest.mark.integration
def test_every_spec_form_loads_the_same_adapter(
    tiny_llama: Path, tmp_path: Path, store: str, project_tmp: Path
) -> None:
    store_home = project_tmp
    import mlflow
    import torch
    from fibreflow.training.publish import log_adapter

    peft, tok = _adapter(tiny_llama, tmp_path / "adapter")
    want = _logits(peft, tok)
    mlflow.set_experiment("fibreflow-train")
    with mlflow.start_run() as run:
        mlflow.set_tags({"config_hash": "abc", "base_model": "smollm2-135m-instruct"})
        info = log_adapter(peft, tok, str(tiny_llama), None)
    mlflow.register_model(info.model_uri, "fibreflow-assistant")
    mlflow.MlflowClient().set_registered_model_alias("fibreflow-assistant", "challenger", "1")

    rid = run.info.run_id
    specs = [rid, f"runs:/{rid}/adapter", "latest", "models:/fibreflow-assistant@challenger",
             "models:/fibreflow-assistant/1", str(tmp_path / "adapter")]  # fmt: skip
    for spec in specs:
        w = weights(spec)
        assert Path(w.base) == tiny_llama and w.adapter, spec
        model, tok2 = load_local(w, "float32")
        assert torch.allclose(_logits(model, tok2), want, atol=1e-5), spec
    registered = weights("models:/fibreflow-assistant@challenger")
    assert registered.identity | {"registered_model": "fibreflow-assistant", "version": "1", "run_id": rid} == (
        registered.identity
    )
    assert weights(rid).identity["run_id"] == rid
    # downloaded once into the project's artifact cache, the one place model servers load adapters from
    assert Path(registered.adapter).is_relative_to(store_home / "var/models/artifacts")
    assert weights("models:/fibreflow-assistant/1").adapter == registered.adapter
    # a full model folder is the model itself
    assert weights(str(tiny_llama)).adapter is None


@pytest.mark.integration
def test_a_qlora_adapter_is_loaded_on_the_base_quantized_as_in_training(
    tiny_llama: Path, tmp_path: Path, store: str
) -> None:
    """The 4-bit settings come from the adapter's quantization record: in the logged model, or the folder's file."""
    import json

    import mlflow
    from bitsandbytes.nn import Linear4bit
    from fibreflow.training.publish import log_adapter

    peft, tok = _adapter(tiny_llama, tmp_path / "adapter")
    nf4 = {"load_in_4bit": True, "quant_type": "nf4", "double_quant": True, "compute_dtype": "bfloat16",
           "quant_storage": "bfloat16"}  # fmt: skip
    mlflow.set_experiment("fibreflow-train")
    with mlflow.start_run() as run:
        log_adapter(peft, tok, str(tiny_llama), nf4)
    with mlflow.start_run() as plain_run:
        log_adapter(peft, tok, str(tiny_llama), None)
    (tmp_path / "adapter" / QUANTIZATION_FILE).write_text(json.dumps({"quantization": nf4}))

    for spec in (run.info.run_id, str(tmp_path / "adapter")):
        w = weights(spec)
        assert w.quantization is not None and w.quantization.quant_type == "nf4", spec
        model, _ = load_local(w, "float32")
        assert any(isinstance(mod, Linear4bit) for mod in model.modules()), spec
    assert weights(plain_run.info.run_id).quantization is None
    assert weights(run.info.run_id).tags()["quantization"] == "nf4"
