"""Eval model specs: every weight spec, endpoints and vLLM; bad specs say what is wrong."""

from __future__ import annotations

from pathlib import Path

import pytest
from fibreflow.core.errors import ConfigError
from fibreflow.eval.config import load_eval_config
from fibreflow.eval.models import generator, identify


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ("endpoint:nope", r"no endpoint 'nope' in eval.yaml \(known: router\)"),
        ("vllm:base", "vllm is not installed"),
        ("gpt-17", r"'gpt-17' is not in configs/models.yaml \(known: .*smollm2-135m-instruct"),
        ("models:/nobody@champion", "no such registered model version"),
        ("runs:/0123456789abcdef0123456789abcdef/adapter", "cannot be read from MLflow"),
        ("latest", "no finished training run in MLflow"),
    ],
)
def test_bad_specs_say_what_is_wrong(spec: str, message: str, store: str, project_tmp: Path) -> None:
    with pytest.raises(ConfigError, match=message):
        generator(spec, load_eval_config())


def _qlora_run(tiny: Path, compute_dtype: str) -> str:
    """A training run's id whose logged adapter (random, not zero) was made for `tiny` in NF4."""
    import mlflow
    import torch
    from fibreflow.training.publish import log_adapter
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.manual_seed(1)
    peft = get_peft_model(AutoModelForCausalLM.from_pretrained(tiny),
                          LoraConfig(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False))  # fmt: skip
    nf4 = {"load_in_4bit": True, "quant_type": "nf4", "double_quant": True, "compute_dtype": compute_dtype,
           "quant_storage": compute_dtype}  # fmt: skip
    mlflow.set_experiment("fibreflow-train")
    with mlflow.start_run() as run:
        log_adapter(peft.eval(), AutoTokenizer.from_pretrained(tiny), str(tiny), nf4)
    return run.info.run_id


@pytest.mark.integration
def test_a_qlora_run_is_identified_and_generated_4bit(tiny_llama: Path, store: str) -> None:
    run_id = _qlora_run(tiny_llama, "bfloat16")
    cfg = load_eval_config({"generation.merge_adapters": False})
    assert identify(run_id, cfg) | {"kind": "run", "quantization": "nf4"} == identify(run_id, cfg)
    assert "merged" not in identify(run_id, cfg)
    assert generator(run_id, cfg).settings["quantized_4bit"] is True


@pytest.mark.integration
def test_a_qlora_run_is_scored_merged_as_the_model_server_serves_its_champion(
    tiny_llama: Path, store: str, project_tmp: Path
) -> None:
    import torch

    run_id = _qlora_run(tiny_llama, "float32")
    as_trained = load_eval_config({"generation.dtype": "float32"})
    merged_cfg = load_eval_config({"generation.dtype": "float32", "generation.merge_adapters": True})
    assert identify(run_id, merged_cfg) == identify(run_id, as_trained) | {"merged": "float32"}
    merged = generator(run_id, merged_cfg)
    assert merged.settings["quantized_4bit"] is False and not hasattr(merged.model, "peft_config")
    [folder] = (project_tmp / "var/eval/merged").iterdir()
    ids = torch.tensor([[1, 42, 314, 2718, 99, 7]])
    with torch.no_grad():
        unmerged = generator(run_id, as_trained).model(ids).logits
        base = generator(str(tiny_llama), as_trained).model(ids).logits
        gap = (merged.model(ids).logits - unmerged).abs().max()
    assert gap < 1e-2 and gap < (base - unmerged).abs().max() / 10  # the adapter is in the merged weights
    stamp = (folder / "config.json").stat().st_mtime_ns
    generator(run_id, merged_cfg)
    assert (folder / "config.json").stat().st_mtime_ns == stamp  # merged once, reused after


@pytest.mark.integration
def test_an_adapter_folder_rewritten_in_place_is_merged_anew(tiny_llama: Path, project_tmp: Path) -> None:
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    cfg = load_eval_config({"generation.dtype": "float32", "generation.merge_adapters": True})
    adapter, answers = project_tmp / "adapter", []
    for seed in (1, 2):
        torch.manual_seed(seed)
        lora = LoraConfig(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
        get_peft_model(AutoModelForCausalLM.from_pretrained(tiny_llama), lora).save_pretrained(adapter)
        with torch.no_grad():
            answers.append(generator(str(adapter), cfg).model(torch.tensor([[1, 42, 314]])).logits)
    assert len(list((project_tmp / "var/eval/merged").iterdir())) == 2
    assert not torch.allclose(answers[0], answers[1])
