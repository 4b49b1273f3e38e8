"""Merging a QLoRA adapter into the base it was trained on (NF4-dequantized), for upstreams that serve merged
weights."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch


@pytest.mark.integration
def test_a_merged_qlora_adapter_answers_as_the_adapter_on_its_4bit_base(tiny_llama: Path, project_tmp: Path) -> None:
    from fibreflow.training.config import Quantization
    from fibreflow.training.merge import merge
    from fibreflow.training.weights import Weights, load_local
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(5)
    adapter = project_tmp / "adapter"
    lora = LoraConfig(r=4, target_modules=["q_proj", "v_proj", "up_proj"], init_lora_weights=False)
    get_peft_model(AutoModelForCausalLM.from_pretrained(tiny_llama), lora).save_pretrained(adapter)
    q = Quantization(
        load_in_4bit=True, quant_type="nf4", double_quant=True, compute_dtype="float32", quant_storage="float32"
    )
    w = Weights(str(tiny_llama), str(adapter), {}, q)
    ids = torch.tensor([[1, 42, 314, 2718, 99, 7]])
    with torch.no_grad():
        as_trained = load_local(w, "float32")[0](ids).logits
        on_full_precision = load_local(Weights(str(tiny_llama), str(adapter)), "float32")[0](ids).logits
        folder = merge(w, project_tmp / "merged/tiny-v1")
        merged = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)(ids).logits
    # the adapter on its NF4 base, in one set of weights (bitsandbytes' CPU kernels round in bf16: ~3e-3 apart),
    # far closer than the adapter on the full-precision base, which is what a naive merge would have served
    faithful, naive = (merged - as_trained).abs().max(), (on_full_precision - as_trained).abs().max()
    assert faithful < 1e-2 and faithful < naive / 10  # measured: 0.003 vs 0.096
    stamp = (folder / "config.json").stat().st_mtime_ns
    assert merge(w, folder) == folder and (folder / "config.json").stat().st_mtime_ns == stamp  # reused
    merge(w, folder, reuse=False)  # replaced whole: no temp or old folder left beside it
    assert sorted(p.name for p in folder.parent.iterdir()) == ["tiny-v1"]
    with pytest.raises(ValueError, match="no adapter"):
        merge(Weights(str(tiny_llama)), project_tmp / "merged/tiny-base")


@pytest.mark.integration
def test_train_merge_folds_a_qlora_adapter_into_its_nf4_base(tiny_llama: Path, project_tmp: Path, write_config) -> None:
    """`fibreflow train --merge` goes through the same merge: its merged model answers as the adapter on its 4-bit
    base, not as the adapter on the full-precision base (31% instead of 75% on the demo)."""
    from fibreflow.training.config import load_train_config
    from fibreflow.training.publish import finish
    from fibreflow.training.train import save_adapter
    from fibreflow.training.weights import Weights, load_local
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    nf4 = {"load_in_4bit": True, "quant_type": "nf4", "double_quant": True, "compute_dtype": "float32",
           "quant_storage": "float32"}  # fmt: skip
    cfg = load_train_config(write_config(project_tmp, tiny_llama, quantization=nf4, merge=True))
    torch.manual_seed(5)
    lora = LoraConfig(r=4, target_modules=["q_proj", "v_proj", "up_proj"], init_lora_weights=False)
    peft = get_peft_model(AutoModelForCausalLM.from_pretrained(tiny_llama), lora)
    out = project_tmp / "run"
    out.mkdir()
    save_adapter(peft, AutoTokenizer.from_pretrained(tiny_llama), cfg, out / "adapter")
    merged_dir = Path(finish(cfg, peft, AutoTokenizer.from_pretrained(tiny_llama), str(tiny_llama), out)["merged"])
    ids = torch.tensor([[1, 42, 314, 2718, 99, 7]])
    with torch.no_grad():
        as_trained = load_local(Weights(str(tiny_llama), str(out / "adapter"), {}, cfg.quantization), "float32")[0]
        on_full = load_local(Weights(str(tiny_llama), str(out / "adapter")), "float32")[0]
        merged = AutoModelForCausalLM.from_pretrained(merged_dir, dtype=torch.float32)
        want = as_trained(ids).logits
        faithful, naive = (merged(ids).logits - want).abs().max(), (on_full(ids).logits - want).abs().max()
    assert faithful < 1e-2 and faithful < naive / 10
