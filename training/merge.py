"""An adapter folded into its base as trained: the project's one merge path (`fibreflow train --merge`, merged
serving arms).

A QLoRA adapter learned against its base's NF4 rounding (on the full-precision base the demo scores 31% instead
of 75%). So the base is loaded 4-bit exactly as in training, every quantized weight is dequantized back, and the
adapter is merged into those weights in fp32. Saved in fp32 by default: bf16 would round away much of a small
LoRA delta. Written to a temp folder and swapped in: never half-written.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from fibreflow.core.config import atomic_folder
from fibreflow.training.weights import Weights, load_local, quantization_record


def dequantized_base(w: Weights) -> tuple[object, object]:
    """(fp32 model, tokenizer) whose weights are the base as the adapter saw it in training."""
    import torch
    from bitsandbytes.functional import dequantize_4bit
    from bitsandbytes.nn import Linear4bit
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


def merged_folder(w: Weights, root: Path, dtype: str, label: str = "") -> Path:
    """`w` merged once into `root/[<label>-]<key>-<dtype>` and reused after. The key is what the merge is made of
    (the base, its 4-bit settings, the adapter's files), so an adapter rewritten in place, or another registry's
    version of the same number, is merged anew instead of being served stale."""
    if w.adapter is None:
        raise ValueError(f"{w.base}: nothing to merge (no adapter)")
    key = hashlib.sha256(json.dumps([w.base, quantization_record(w.quantization)]).encode())
    for file in sorted(Path(w.adapter).glob("adapter_*")):  # adapter_config.json, adapter_model.safetensors
        key.update(file.name.encode() + file.read_bytes())
    return merge(w, root / f"{label + '-' if label else ''}{key.hexdigest()[:16]}-{dtype}", dtype)


def merge(w: Weights, dest: Path, dtype: str = "float32", *, reuse: bool = True) -> Path:
    """`w` (base + adapter) merged into the folder `dest`; an existing one is reused unless `reuse` is off
    (then it is replaced, atomically)."""
    import torch
    from peft import PeftModel

    if reuse and (dest / "config.json").is_file():
        return dest
    if w.adapter is None:
        raise ValueError(f"{dest.name}: nothing to merge (no adapter)")
    model, tok = dequantized_base(w)
    merged = PeftModel.from_pretrained(model, w.adapter).merge_and_unload()
    with atomic_folder(dest) as tmp:
        merged.to(getattr(torch, dtype)).save_pretrained(tmp)
        tok.save_pretrained(tmp)  # type: ignore[attr-defined]
    return dest
