"""A registered version as one merged model folder, for upstreams that serve merged weights faster than LoRA
(vLLM here: LoRA costs it 2-3x).

A QLoRA adapter learned against its base's NF4 rounding (issue #4: on the full-precision base it scores 31%
instead of 77%). So the base is loaded 4-bit exactly as in training, every quantized weight is dequantized back,
and the adapter is merged into those weights in fp32. Saved in fp32 by default: bf16 would round away much of a
small LoRA delta. Written to a temp folder and renamed: never half-written; an existing folder is reused.
"""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

from fibreflow.core.config import resolve_path
from fibreflow.eval.models import Weights

MERGED_DIR = "var/serving/merged"


def dequantized_base(w: Weights) -> tuple[object, object]:
    """(fp32 model, tokenizer) whose weights are the base as the adapter saw it in training."""
    import torch
    from bitsandbytes.functional import dequantize_4bit
    from bitsandbytes.nn import Linear4bit
    from fibreflow.eval.models import load_local
    from fibreflow.training.models import load_tokenizer
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(w.base, dtype=torch.float32)
    if w.quantization is not None:
        quantized, _ = load_local(Weights(w.base, None, {}, w.quantization), "float32")
        seen = {name: m for name, m in quantized.named_modules() if isinstance(m, Linear4bit)}
        with torch.no_grad():
            for name, module in model.named_modules():
                if name in seen:
                    q = seen[name].weight
                    module.weight.copy_(dequantize_4bit(q.data, q.quant_state).to(torch.float32))
    return model, load_tokenizer(w.base)


def merge(w: Weights, name: str, dtype: str = "float32") -> Path:
    """The folder of `w` (base + adapter) merged, named `<name>-<dtype>` under var/serving/merged."""
    import torch
    from peft import PeftModel

    out = resolve_path(MERGED_DIR) / f"{name}-{dtype}"
    if (out / "config.json").is_file():
        return out
    if w.adapter is None:
        raise ValueError(f"{name}: nothing to merge (no adapter)")
    model, tok = dequantized_base(w)
    merged = PeftModel.from_pretrained(model, w.adapter).merge_and_unload()
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}-", dir=out.parent))
    try:
        merged.to(getattr(torch, dtype)).save_pretrained(tmp)
        tok.save_pretrained(tmp)  # type: ignore[attr-defined]
        tmp.rename(out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out
