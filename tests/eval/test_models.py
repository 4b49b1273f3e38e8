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


@pytest.mark.integration
def test_a_qlora_run_is_identified_and_generated_4bit(tiny_llama: Path, store: str) -> None:
    import mlflow
    import torch
    from fibreflow.training.publish import log_adapter
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.manual_seed(1)
    peft = get_peft_model(AutoModelForCausalLM.from_pretrained(tiny_llama),
                          LoraConfig(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False))  # fmt: skip
    nf4 = {"load_in_4bit": True, "quant_type": "nf4", "double_quant": True, "compute_dtype": "bfloat16",
           "quant_storage": "bfloat16"}  # fmt: skip
    mlflow.set_experiment("fibreflow-train")
    with mlflow.start_run() as run:
        log_adapter(peft.eval(), AutoTokenizer.from_pretrained(tiny_llama), str(tiny_llama), nf4)
    cfg = load_eval_config()
    assert identify(run.info.run_id, cfg) | {"kind": "run", "quantization": "nf4"} == identify(run.info.run_id, cfg)
    assert generator(run.info.run_id, cfg).settings["quantized_4bit"] is True
