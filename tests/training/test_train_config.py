"""Train config -> BitsAndBytesConfig / LoraConfig, and config errors that name the key."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from fibreflow.core.errors import ConfigError
from fibreflow.training.config import (
    Lora,
    Quantization,
    bnb_config,
    default_train_config,
    load_train_config,
    lora_config,
    model_entry,
)

CONFIGS = Path(__file__).resolve().parents[2] / "configs"


@pytest.mark.parametrize(
    ("quant", "expected"),
    [
        (Quantization(), {"bnb_4bit_quant_type": "nf4", "bnb_4bit_use_double_quant": True}),
        (
            Quantization(quant_type="fp4", double_quant=False, compute_dtype="float32"),
            {"bnb_4bit_quant_type": "fp4", "bnb_4bit_use_double_quant": False, "bnb_4bit_compute_dtype": torch.float32},
        ),
        (Quantization(compute_dtype="float16"), {"bnb_4bit_compute_dtype": torch.float16}),
        (Quantization(quant_storage="float32"), {"bnb_4bit_quant_storage": torch.float32}),
    ],
)
def test_quantization_converts_to_bitsandbytes(quant: Quantization, expected: dict) -> None:
    cfg = bnb_config(quant)
    assert cfg is not None and cfg.load_in_4bit
    for key, value in expected.items():
        assert getattr(cfg, key) == value, key


@pytest.mark.parametrize("quant", [None, Quantization(load_in_4bit=False)])
def test_no_quantization_means_no_bitsandbytes(quant: Quantization | None) -> None:
    assert bnb_config(quant) is None


@pytest.mark.parametrize(
    ("lora", "expected"),
    [
        (Lora(), {"r": 16, "lora_alpha": 32, "lora_dropout": 0.05, "target_modules": "all-linear"}),
        (
            Lora(r=8, alpha=16, dropout=0.0, target_modules=["q_proj", "v_proj"], bias="lora_only"),
            {
                "r": 8,
                "lora_alpha": 16,
                "lora_dropout": 0.0,
                "target_modules": {"q_proj", "v_proj"},
                "bias": "lora_only",
            },
        ),
        (Lora(target_modules=["q_proj"], from_layer=28), {"layers_to_transform": [28, 29]}),
    ],
)
def test_lora_converts_to_peft(lora: Lora, expected: dict) -> None:
    cfg = lora_config(lora, num_layers=30)
    assert cfg.task_type == "CAUSAL_LM"
    for key, value in expected.items():
        assert getattr(cfg, key) == value, key


@pytest.mark.parametrize(
    ("overrides", "named"),
    [
        ({"lora.rank": 8}, r"lora\.rank"),  # unknown key
        ({"optim.lr": "fast"}, r"optim\.lr"),  # ill-typed
        ({"optim.batch_size": 0}, r"optim\.batch_size"),
        ({"quantization.quant_type": "nf3"}, r"quantization\.quant_type"),
        ({"lora.dropout": 1.5}, r"lora\.dropout"),
        ({"checkpoint.every_steps": 7}, "multiple of eval.every_steps"),
        ({"lora.from_layer": 15, "lora.target_modules": "all-linear"}, "from_layer needs target_modules as a list"),
    ],
)
def test_bad_train_config_names_the_key(overrides: dict, named: str) -> None:
    with pytest.raises(ConfigError, match=named):
        load_train_config(default_train_config(), overrides)


def test_unknown_model_names_the_catalogue() -> None:
    cfg = load_train_config(default_train_config(), {"model": "gpt-5"})
    with pytest.raises(ConfigError, match=r"gpt-5.*configs/models\.yaml"):
        model_entry(cfg)


def test_every_shipped_train_config_resolves_its_model() -> None:
    shipped = sorted((CONFIGS / "train").glob("*/*.yaml"))
    assert len(shipped) >= 5
    for path in shipped:
        cfg = load_train_config(path)
        assert path.parent.name == cfg.model, path  # configs/train/<model>/<method>.yaml
        model_entry(cfg)


def test_config_hash_ignores_what_happens_after_training() -> None:
    a = load_train_config(default_train_config())
    assert (
        a.config_hash() == load_train_config(default_train_config(), {"merge": True, "heldout.known": 3}).config_hash()
    )
    assert a.config_hash() != load_train_config(default_train_config(), {"optim.lr": 1e-4}).config_hash()
