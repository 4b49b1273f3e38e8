"""Training throughput and memory: our trainer's variants vs a plain transformers `Trainer` + peft, one run.

    python benchmarks/bench_train.py [--steps 6] [--warmup 2]

Every variant trains SmolLM2-135M with the demo config's LoRA on the same training rows (the glossary and the
assistant mixture), in its own process (so peak RSS is its own). Packed: the demo's chats of several questions in
rows of up to 1,024 tokens; padded (ours or the plain recipe): one question an example, 4 a step. tokens/s counts
real tokens (no padding). MFU = FLOPs per token x tokens/s / the bf16 matmul peak measured here: a frozen base's
forward 2N plus input gradients 2N of its N non-embedding parameters at and above the lowest adapted layer (no
weight gradients; nothing below `lora.from_layer` is differentiated). Prints one table, baseline ratios included.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from typing import Any

EAGER = {"optim.compile": False}  # the demo compiles each layer (`optim.compile`); the other variants measure without
VARIANTS: dict[str, tuple[str, bool, bool, bool, dict[str, Any]]] = {
    # name: (trainer, quantized, packed, gradient checkpointing, other overrides of the demo config)
    "plain Trainer+peft, NF4 (recipe defaults: GC on)": ("plain", True, False, True, {}),
    "plain Trainer+peft, NF4, GC off": ("plain", True, False, False, {}),
    "ours NF4 packed, compiled layers (demo)": ("ours", True, True, False, {}),
    "ours NF4 packed, eager": ("ours", True, True, False, EAGER),
    "ours NF4 packed, LoRA on layers 15-29 only": ("ours", True, True, False, {"lora.from_layer": 15} | EAGER),
    "ours NF4 packed, sdpa's block-diagonal mask": ("ours", True, True, False, EAGER),
    "ours NF4 packed + GC": ("ours", True, True, True, EAGER),
    "ours NF4 padded": ("ours", True, False, False, EAGER),
    "ours bf16 LoRA packed": ("ours", False, True, False, EAGER),
}
PADDED_BATCH = 4  # questions per step when not packing (~1,000 real tokens, as in a packed step of the demo's: one
# row of up to 1,024 tokens)


def matmul_peak(device: str = "cpu", dtype: str = "bfloat16", n: int = 2048, reps: int = 10) -> float:
    """FLOP/s of an n x n x n matmul on this device: the peak MFU is measured against (shared with the GPU script)."""
    import torch

    a = torch.randn(n, n, dtype=getattr(torch, dtype), device=device)
    b = torch.randn(n, n, dtype=getattr(torch, dtype), device=device)
    a @ b
    if device == "cuda":
        torch.cuda.synchronize()
    t = time.perf_counter()
    for _ in range(reps):
        a @ b
    if device == "cuda":
        torch.cuda.synchronize()
    return 2 * n**3 * reps / (time.perf_counter() - t)


def run_variant(name: str, steps: int, warmup: int) -> dict[str, Any]:
    import torch
    from fibreflow.training.config import default_train_config, load_train_config
    from fibreflow.training.data import Collator, prepare
    from fibreflow.training.models import add_lora, compile_layers, load_base, load_tokenizer, resolve_base
    from fibreflow.training.train import load_rows
    from transformers import TrainerCallback, TrainingArguments, set_seed

    kind, quantized, packed, gc, other = VARIANTS[name]
    overrides: dict[str, Any] = {"optim.packing": packed, "optim.gradient_checkpointing": gc, **other}
    if not quantized:
        overrides["quantization"] = None
    cfg = load_train_config(default_train_config(), overrides)
    base = resolve_base(cfg)
    tok = load_tokenizer(base)
    _, rows, _ = load_rows(cfg)
    o = cfg.optim
    data = prepare(rows, tok, o.seq_len, packed, o.seed, o.pack_len, o.chat_turns if packed else 1)
    batch = cfg.optim.batch_size if packed else PADDED_BATCH
    set_seed(0)
    model = add_lora(load_base(base, cfg), cfg) if kind == "ours" else plain_model(base, cfg, gc)
    if kind == "ours" and cfg.optim.compile:
        compile_layers(model)  # compiled in the first (warm-up) step
    if "block-diagonal" in name:  # attention over the whole row, the examples kept apart by a mask (the default)
        model.set_attn_implementation("sdpa")
    counted: list[int] = []
    collate = Collator(tok.pad_token_id, packed=packed)

    def counting(rows_: list[dict]) -> dict:
        out = collate(rows_)
        counted.append(int(out["attention_mask"].sum()) if "attention_mask" in out else out["input_ids"].numel())
        if kind == "plain":  # the plain recipe: unshifted labels, full logits, the model's own loss
            out = {"input_ids": out["input_ids"], "attention_mask": out["attention_mask"], "labels": plain_labels(out)}
        return out

    times: list[float] = []

    class Clock(TrainerCallback):
        def on_step_end(self, args: Any, state: Any, control: Any, **kw: Any) -> None:
            times.append(time.perf_counter())

    args = TrainingArguments(
        output_dir="benchmarks/out/train-tmp",
        per_device_train_batch_size=batch,
        max_steps=warmup + steps,
        learning_rate=cfg.optim.lr,
        logging_steps=1000,
        save_strategy="no",
        report_to="none",
        remove_unused_columns=False,
        use_cpu=not torch.cuda.is_available(),
        disable_tqdm=True,
    )
    trainer = trainer_for(kind, model, args, data, counting, Clock())
    trainer.train()
    measured_tokens = sum(counted[warmup : warmup + steps])
    seconds = times[warmup + steps - 1] - times[warmup - 1]
    return {
        "tokens_per_s": measured_tokens / seconds,
        "peak_rss_gb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024**2,
        "flops_per_token": 2 * logical_params(model) + 2 * logical_params(model, cfg.lora.from_layer),
    }


def logical_params(model: Any, from_layer: int = 0) -> int:
    """Base parameters outside embeddings and output head (of the decoder layers from `from_layer` up, and the
    final norm); a 4-bit weight counts by its logical shape, not its packed bytes (shared with the GPU script)."""
    import math
    import re

    total = 0
    for name, p in model.named_parameters():
        if "embed" in name or "lora_" in name or "lm_head" in name:
            continue
        layer = re.search(r"\.layers\.(\d+)\.", name)
        if layer is not None and int(layer.group(1)) < from_layer:
            continue
        state = getattr(p, "quant_state", None)
        total += math.prod(state.shape) if state is not None else p.numel()
    return total


def plain_labels(batch: dict) -> Any:
    """Our shifted labels back to the unshifted form the model's own loss expects."""
    import torch

    shift = batch["shift_labels"]
    return torch.cat([torch.full_like(shift[:, :1], -100), shift[:, :-1]], dim=1)


def plain_model(base: str, cfg: Any, gc: bool) -> Any:
    """The textbook QLoRA recipe: from_pretrained with BitsAndBytesConfig, prepare_model_for_kbit_training, LoRA."""
    from fibreflow.core.config import torch_dtype
    from fibreflow.training.config import bnb_config, lora_config
    from peft import get_peft_model, prepare_model_for_kbit_training
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(
        base, dtype=torch_dtype(cfg.dtype), quantization_config=bnb_config(cfg.quantization)
    )
    model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=gc)
    return get_peft_model(model, lora_config(cfg.lora, model.config.num_hidden_layers))


def trainer_for(kind: str, model: Any, args: Any, data: list, collate: Any, clock: Any) -> Any:
    from fibreflow.training.trainer import LabelledTrainer
    from transformers import Trainer

    cls = LabelledTrainer if kind == "ours" else Trainer
    return cls(model=model, args=args, train_dataset=data, data_collator=collate, callbacks=[clock])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--variant", help=argparse.SUPPRESS)
    a = parser.parse_args()
    if a.variant:
        print("RESULT " + json.dumps(run_variant(a.variant, a.steps, a.warmup)))
        return
    peak_bf16, peak_fp32 = matmul_peak(dtype="bfloat16"), matmul_peak(dtype="float32")
    results = {}
    for name in VARIANTS:
        cmd = [sys.executable, __file__, "--variant", name, "--steps", str(a.steps), "--warmup", str(a.warmup)]
        done = subprocess.run(cmd, capture_output=True, text=True)
        line = next((x for x in done.stdout.splitlines() if x.startswith("RESULT ")), None)
        if line is None:
            sys.exit(f"{name} failed:\n{done.stderr[-3000:]}")
        results[name] = json.loads(line[7:])
        print(f"{name}: {results[name]['tokens_per_s']:.0f} tok/s", file=sys.stderr, flush=True)
    baseline = results["plain Trainer+peft, NF4 (recipe defaults: GC on)"]["tokens_per_s"]
    baseline_nogc = results["plain Trainer+peft, NF4, GC off"]["tokens_per_s"]
    print(f"\nbf16 matmul peak {peak_bf16 / 1e9:.0f} GFLOP/s, fp32 {peak_fp32 / 1e9:.0f} GFLOP/s (2048^3, this run)")
    print(f"{'variant':<50} {'tok/s':>7} {'vs plain':>9} {'vs plain GC off':>16} {'peak RSS':>9} {'MFU':>6}")
    for name, r in results.items():
        mfu = r["tokens_per_s"] * r["flops_per_token"] / peak_bf16
        print(
            f"{name:<50} {r['tokens_per_s']:>7.0f} {r['tokens_per_s'] / baseline:>8.2f}x "
            f"{r['tokens_per_s'] / baseline_nogc:>15.2f}x {r['peak_rss_gb']:>7.2f}GB {mfu:>6.1%}"
        )


if __name__ == "__main__":
    main()
