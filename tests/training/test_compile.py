"""`optim.compile` on a tiny Llama with LoRA and packed rows: the compiled layers give eager's loss and gradients on
rows of different lengths, the eager forwards come back for generation, and a machine without a C++ compiler trains
uncompiled."""

from __future__ import annotations

import types
from pathlib import Path

import pytest
import torch
from fibreflow.core.errors import ConfigError
from fibreflow.training.config import load_train_config
from fibreflow.training.models import add_lora, compile_layers, load_base

LENGTHS = ((7, 12, 5), (9, 20))  # two packed rows: the second a new shape for the compiled graph


def _lora_model(tiny: Path, home: Path, write_config) -> torch.nn.Module:
    cfg = load_train_config(write_config(home, tiny, optim={"packing": True}))
    torch.manual_seed(0)
    return add_lora(load_base(str(tiny), cfg), cfg)


def _loss_and_grads(model: torch.nn.Module) -> list[tuple[float, dict[str, torch.Tensor]]]:
    g = torch.Generator().manual_seed(0)
    out = []
    for lengths in LENGTHS:
        ids = torch.randint(5, 2000, (1, sum(lengths)), generator=g)
        pos = torch.cat([torch.arange(n) for n in lengths]).unsqueeze(0)
        model.zero_grad(set_to_none=True)
        logits = model(input_ids=ids, position_ids=pos, use_cache=False).logits[0, :-1]
        loss = torch.nn.functional.cross_entropy(logits, ids[0, 1:])
        loss.backward()
        out.append((loss.item(), {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}))
    return out


def _greedy(model: torch.nn.Module) -> torch.Tensor:
    model.eval()
    with torch.no_grad():
        return model.generate(input_ids=torch.tensor([[11, 42, 7, 99]]), max_new_tokens=6, do_sample=False)


def test_compiled_layers_train_as_eager_and_give_the_eager_forwards_back(
    tiny_llama: Path, tmp_path: Path, write_config
) -> None:
    model = _lora_model(tiny_llama, tmp_path, write_config)
    eager = _loss_and_grads(model)
    layers = model.get_base_model().model.layers
    restore = compile_layers(model)
    assert restore is not None and all(hasattr(layer.forward, "_torchdynamo_orig_callable") for layer in layers)
    compiled = _loss_and_grads(model)
    for (loss_e, grads_e), (loss_c, grads_c) in zip(eager, compiled, strict=True):
        assert loss_c == pytest.approx(loss_e, rel=1e-5)
        assert grads_c.keys() == grads_e.keys() and any("lora_B" in n for n in grads_c)
        for name, grad in grads_e.items():
            torch.testing.assert_close(grads_c[name], grad, atol=1e-5, rtol=1e-4, msg=name)
    restore()
    assert not any("forward" in vars(layer) for layer in layers)  # the class's forward: eager again
    model.train()
    assert torch.equal(_greedy(model), _greedy(_lora_model(tiny_llama, tmp_path, write_config)))


def test_without_a_cpp_compiler_training_runs_uncompiled(
    tiny_llama: Path, tmp_path: Path, write_config, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    if torch.cuda.is_available():
        pytest.skip("on CUDA inductor compiles through Triton, not $CXX")
    monkeypatch.setenv("CXX", "no-such-compiler-here")
    model = _lora_model(tiny_llama, tmp_path, write_config)
    assert compile_layers(model) is None
    assert "no C++ compiler (no-such-compiler-here)" in capsys.readouterr().err
    assert not any("forward" in vars(layer) for layer in model.get_base_model().model.layers)


def test_a_model_without_decoder_layers_is_refused() -> None:
    with pytest.raises(ConfigError, match="no transformers decoder layers"):
        compile_layers(types.SimpleNamespace(modules=lambda: [torch.nn.Linear(2, 2)]))


def test_each_model_in_one_process_is_compiled_afresh(tiny_llama: Path, tmp_path: Path, write_config) -> None:
    """`fibreflow tune` trains its trials one after another in one process, each a new model with LoRA settings of
    its own: every trial's layers still compile, instead of the earlier trials' graphs using up dynamo's recompile
    limit (8; here 2, to need fewer trials) and sending the later ones to eager with nothing but a warning."""
    from torch._dynamo.utils import counters

    with torch._dynamo.config.patch(recompile_limit=2):  # not monkeypatch: its undo deletes the setting
        for trial in range(3):
            lora = {"dropout": 0.05 * trial}
            cfg = load_train_config(write_config(tmp_path, tiny_llama, optim={"packing": True}, lora=lora))
            model = add_lora(load_base(str(tiny_llama), cfg), cfg)
            restore = compile_layers(model)
            assert restore is not None
            before = counters["stats"]["unique_graphs"]
            _loss_and_grads(model)
            assert counters["stats"]["unique_graphs"] > before, f"trial {trial} ran eagerly"
            restore()
