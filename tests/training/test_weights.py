"""Weight specs resolve to the exact weights named: run ids, runs:/ and models:/ URIs, folders; a QLoRA adapter
loads on its base quantized as in training."""

from __future__ import annotations

from pathlib import Path

import pytest
from fibreflow.training.weights import QUANTIZATION_FILE, load_local, weights


def _adapter(tiny: Path, out: Path, seed: int = 1):
    """A LoRA adapter on the tiny Llama with non-zero B (so it changes the logits), saved to `out`."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.manual_seed(seed)
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
def test_another_registry_s_version_of_the_same_number_is_another_model(
    tiny_llama: Path, tmp_path: Path, project_tmp: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """One project home, two tracking stores (staging and production, or a store reset): each store's v1 loads its
    own adapter and is merged into its own folder, never the other's downloaded or merged copy."""
    import mlflow
    import torch
    from fibreflow.training.merge import merged_folder
    from fibreflow.training.publish import log_adapter

    seen = []
    for seed in (1, 2):
        uri = f"sqlite:///{project_tmp / f'mlflow-{seed}.db'}"
        monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
        mlflow.set_tracking_uri(uri)
        peft, tok = _adapter(tiny_llama, tmp_path / f"adapter-{seed}", seed)
        mlflow.set_experiment("fibreflow-train")
        with mlflow.start_run():
            info = log_adapter(peft, tok, str(tiny_llama), None)
        mlflow.register_model(info.model_uri, "fibreflow-assistant")
        w = weights("models:/fibreflow-assistant/1")
        model, _ = load_local(w, "float32")
        assert torch.allclose(_logits(model, tok), _logits(peft, tok), atol=1e-5), f"store {seed}"
        merged = merged_folder(w, project_tmp / "merged", "float32", label="fibreflow-assistant-v1")
        assert merged_folder(w, project_tmp / "merged", "float32", label="fibreflow-assistant-v1") == merged
        seen.append((w.adapter, merged))
    assert seen[0][0] != seen[1][0] and seen[0][1] != seen[1][1]


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


@pytest.mark.parametrize("native", [False, True], ids=["avx2-only", "bf16-native"])
def test_auto_precision_is_bf16_only_where_the_machine_computes_it(
    tiny_llama: Path, native: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The shipped demo configs say `auto`: on a CPU without native bf16 (AVX2 only: bf16 matmuls 25-70x slower than
    fp32) every stage loads in float32, elsewhere in bfloat16; an adapter's quantization record stays `auto`."""
    import torch
    from fibreflow.core import config
    from fibreflow.core.config import torch_dtype
    from fibreflow.datasets.embed import load_embed_config
    from fibreflow.eval.config import load_eval_config
    from fibreflow.serving.config import load_serving_config
    from fibreflow.training.config import default_train_config, load_train_config
    from fibreflow.training.weights import Weights

    monkeypatch.setattr(config, "bf16_is_native", lambda: native)
    want = torch.bfloat16 if native else torch.float32
    train = load_train_config(default_train_config())
    assert train.quantization is not None
    names = [train.dtype, train.quantization.compute_dtype, load_eval_config().generation.dtype,
             load_serving_config().model_server.dtype, load_embed_config().dtype]  # fmt: skip
    assert names == ["auto"] * 5 and {torch_dtype(n) for n in names} == {want}
    assert torch_dtype("float32") == torch.float32 and torch_dtype("bfloat16") == torch.bfloat16  # explicit wins
    model, _ = load_local(Weights(str(tiny_llama), None, {"kind": "base"}, None), "auto")
    assert model.dtype == want


def test_the_bf16_probe_matches_the_cpu() -> None:
    """oneDNN computes bf16 natively only with AVX512 (or AMX); this machine's flags say which it has."""
    import torch
    from fibreflow.core.config import bf16_is_native

    if not Path("/proc/cpuinfo").is_file() or torch.cuda.is_available():
        pytest.skip("a Linux CPU-only machine is needed to read the flags")
    flags = set(Path("/proc/cpuinfo").read_text().split())
    assert bf16_is_native() == bool(flags & {"avx512bw", "avx512_bf16", "amx_bf16"})
