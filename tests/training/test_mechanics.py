"""LoRA mechanics on a tiny Llama: what trains, what stays frozen, the loss falls, the bitsandbytes CPU trap."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from fibreflow.training.attention import PACKED_SDPA
from fibreflow.training.config import TrainConfig
from fibreflow.training.models import add_lora, load_base, make_4bit_trainable

NF4 = {"load_in_4bit": True, "quant_type": "nf4", "double_quant": True, "compute_dtype": "bfloat16"}


def _cfg(tiny: Path, quantization: dict | None, dtype: str = "float32") -> TrainConfig:
    return TrainConfig.model_validate(
        {
            "model": "smollm2-135m-instruct",
            "model_path": str(tiny),
            "dtype": dtype,
            "quantization": quantization,
            "lora": {"r": 8, "alpha": 16, "dropout": 0.0, "target_modules": "all-linear"},
        }
    )


def _batch() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(5, 2000, (2, 24), generator=g)
    return {"input_ids": ids, "labels": ids.clone()}


def _same_bytes(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Bit-identical (4-bit weights stored as bf16 hold NaN bit patterns, so `==` cannot compare them)."""
    return a.shape == b.shape and torch.equal(a.contiguous().view(torch.uint8), b.contiguous().view(torch.uint8))


def _frozen(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items() if "lora_" not in k}


@pytest.mark.parametrize(
    ("quantization", "dtype"), [(None, "float32"), (None, "bfloat16"), (NF4, "bfloat16")], ids=["fp32", "bf16", "nf4"]
)
def test_lora_trains_adapters_only_and_the_loss_falls(tiny_llama: Path, quantization: dict | None, dtype: str) -> None:
    torch.manual_seed(0)
    model = add_lora(load_base(str(tiny_llama), _cfg(tiny_llama, quantization, dtype)), _cfg(tiny_llama, quantization))
    trainable = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in n for n in trainable)
    frozen = _frozen(model)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    batch, losses = _batch(), []
    for _ in range(20):
        loss = model(**batch).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < 0.92 * losses[0] and losses == sorted(losses, reverse=True), losses
    after = dict(model.named_parameters())
    unchanged = [n for n, before in trainable.items() if torch.equal(before, after[n].detach())]
    assert not unchanged, f"LoRA parameters that never changed: {unchanged}"
    for name, before in _frozen(model).items():
        assert _same_bytes(before, frozen[name]), f"base weight {name} changed"


def _lora_grads(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    model(**_batch()).loss.backward()
    return {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


def _packed_layers(model: torch.nn.Module) -> int:
    from bitsandbytes.nn import Linear4bit

    return sum(
        bool(getattr(m.weight.quant_state, "packing_format_for_cpu", False))
        for m in model.modules()
        if isinstance(m, Linear4bit)
    )


def _nf4_lora(tiny: Path) -> torch.nn.Module:
    from fibreflow.training.config import bnb_config, lora_config
    from peft import get_peft_model
    from transformers import AutoModelForCausalLM

    cfg = _cfg(tiny, NF4, "bfloat16")
    torch.manual_seed(0)
    base = AutoModelForCausalLM.from_pretrained(str(tiny), quantization_config=bnb_config(cfg.quantization))
    return get_peft_model(base, lora_config(cfg.lora, base.config.num_hidden_layers))


def _rel_error(grads: dict[str, torch.Tensor], reference: dict[str, torch.Tensor]) -> float:
    a = torch.cat([grads[k].flatten() for k in reference])
    b = torch.cat([reference[k].flatten() for k in reference])
    return ((a - b).norm() / b.norm()).item()


def _after_inference(tiny: Path, repair: bool) -> dict[str, torch.Tensor]:
    model = _nf4_lora(tiny).eval()
    with torch.no_grad():
        model(**_batch())
    assert _packed_layers(model) > 0  # bitsandbytes repacked the weights for inference
    if repair:
        assert make_4bit_trainable(model) > 0
        assert _packed_layers(model) == 0
    return _lora_grads(model.train())


def test_inference_before_training_is_repaired(tiny_llama: Path) -> None:
    """bitsandbytes repacks 4-bit weights for inference on an eval-mode no-grad forward (AVX512-BF16 CPUs);
    training afterwards gets wrong gradients. `make_4bit_trainable` restores the training layout."""
    from bitsandbytes.functional import has_avx512bf16

    if not has_avx512bf16():
        pytest.skip("this CPU has no AVX512-BF16: bitsandbytes never repacks here")
    reference = _lora_grads(_nf4_lora(tiny_llama).train())
    assert _rel_error(_after_inference(tiny_llama, repair=False), reference) > 0.2  # the trap: ~80% off here
    assert _rel_error(_after_inference(tiny_llama, repair=True), reference) < 0.02  # repaired: ~0.5% (re-quantized)


def test_loaded_4bit_model_never_repacks(tiny_llama: Path) -> None:
    """Our loader switches the repacking off, so eval steps between training steps are safe."""
    model = add_lora(load_base(str(tiny_llama), _cfg(tiny_llama, NF4, "bfloat16")), _cfg(tiny_llama, NF4))
    model.eval()
    with torch.no_grad():
        model(**_batch())
    assert _packed_layers(model) == 0


@pytest.mark.parametrize(("packing", "attention"), [(True, PACKED_SDPA), (False, "sdpa")])
def test_packed_training_attends_per_example(tiny_llama: Path, packing: bool, attention: str) -> None:
    cfg = _cfg(tiny_llama, None)
    cfg = cfg.model_copy(update={"optim": cfg.optim.model_copy(update={"packing": packing})})
    assert load_base(str(tiny_llama), cfg).config._attn_implementation == attention


def test_lora_from_a_layer_up_stops_the_backward_pass_there(tiny_llama: Path) -> None:
    cfg = _cfg(tiny_llama, NF4, "bfloat16")
    cfg = cfg.model_copy(update={"lora": cfg.lora.model_copy(update={"from_layer": 1, "target_modules": ["q_proj"]})})
    model = add_lora(load_base(str(tiny_llama), cfg), cfg)
    adapted = {n.split(".layers.")[1].split(".")[0] for n, p in model.named_parameters() if p.requires_grad}
    assert adapted == {"1"}
    needs_grad: list[bool] = []
    layers = model.get_base_model().model.layers
    hooks = [
        layer.register_forward_hook(lambda _m, _i, out: needs_grad.append(out[0].requires_grad)) for layer in layers
    ]
    model(**_batch()).loss.backward()
    for hook in hooks:
        hook.remove()
    assert needs_grad == [False, True]  # layer 0 builds no autograd graph: nothing below layer 1 is differentiated


def test_lora_from_a_layer_the_model_lacks_is_refused(tiny_llama: Path) -> None:
    from fibreflow.core.errors import ConfigError

    cfg = _cfg(tiny_llama, None)
    cfg = cfg.model_copy(update={"lora": cfg.lora.model_copy(update={"from_layer": 2, "target_modules": ["q_proj"]})})
    with pytest.raises(ConfigError, match=r"lora\.from_layer: 2, but the model has 2 layers"):
        add_lora(load_base(str(tiny_llama), cfg), cfg)
