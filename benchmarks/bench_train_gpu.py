"""GPU variant of bench_train.py: a Llama-3-8B-shaped model, randomly initialised from its config (no weights
can be fetched on the GPU machine), LoRA on a bf16 base vs QLoRA on NF4, with and without gradient
checkpointing; packed batches and our label-only loss. Under 5 minutes on one H100; prints a table last.

    python benchmarks/bench_train_gpu.py             # on a CUDA machine
    python benchmarks/bench_train_gpu.py --tiny      # the same code on a tiny shape, on CPU (a smoke check)

MFU = 4 x non-embedding params x tokens/s / the bf16 matmul peak measured in the same run.
"""

from __future__ import annotations

import argparse
import time
from typing import Any

import torch
from bench_train import logical_params, matmul_peak  # the same FLOP counting and peak as the CPU script

LLAMA3_8B = {
    "hidden_size": 4096,
    "intermediate_size": 14336,
    "num_hidden_layers": 32,
    "num_attention_heads": 32,
    "num_key_value_heads": 8,
    "vocab_size": 128256,
    "max_position_embeddings": 8192,
    "rope_theta": 500000.0,
}
TINY = LLAMA3_8B | {"hidden_size": 256, "intermediate_size": 512, "num_hidden_layers": 2, "num_attention_heads": 4}
TINY |= {"num_key_value_heads": 2, "vocab_size": 2048}
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def build(shape: dict[str, int | float], device: str, nf4: bool) -> Any:
    """Random weights straight on the device (8B in bf16 is 16 GB); linear layers quantized to NF4 one by one."""
    import bitsandbytes as bnb
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(**shape, tie_word_embeddings=False)
    torch.manual_seed(0)
    with torch.device(device):
        model = LlamaForCausalLM(config).to(torch.bfloat16)
    if nf4:
        for layer in model.model.layers:
            for parent in (layer.self_attn, layer.mlp):
                for name, lin in list(parent.named_children()):
                    if not isinstance(lin, torch.nn.Linear):
                        continue
                    q = bnb.nn.Linear4bit(
                        lin.in_features,
                        lin.out_features,
                        bias=False,
                        compute_dtype=torch.bfloat16,
                        quant_type="nf4",
                        quant_storage=torch.bfloat16,
                        device="meta",
                    )
                    q.weight = bnb.nn.Params4bit(
                        lin.weight.data, requires_grad=False, quant_type="nf4", quant_storage=torch.bfloat16
                    ).to(device)  # quantizes here
                    setattr(parent, name, q)
        if device == "cuda":
            torch.cuda.empty_cache()
    return model


def measure(shape: dict, device: str, nf4: bool, gc: bool, batch: int, seq: int, steps: int) -> dict[str, float]:
    from peft import LoraConfig, get_peft_model

    model = build(shape, device, nf4)
    if device == "cuda":  # the training peak, not the bf16 weights the NF4 layers were quantized from
        torch.cuda.reset_peak_memory_stats()
    for p in model.parameters():
        p.requires_grad_(False)
    if gc:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.enable_input_require_grads()
    model = get_peft_model(model, LoraConfig(r=16, lora_alpha=32, lora_dropout=0.0, target_modules=TARGETS))
    model.train()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    vocab = shape["vocab_size"]
    ids = torch.randint(0, int(vocab), (batch, seq), device=device)
    pos = torch.arange(seq // 4, device=device).repeat(batch, 4)  # 4 packed examples per row
    target = torch.randint(0, int(vocab), (batch, seq), device=device)
    keep = torch.rand(batch, seq, device=device) < 0.4  # ~40% of positions carry labels (answers)
    times = []
    for _ in range(steps + 2):
        t = time.perf_counter()
        logits = model(input_ids=ids, position_ids=pos, logits_to_keep=keep, use_cache=False).logits
        loss = torch.nn.functional.cross_entropy(logits.float(), target[keep])
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        sync(device)
        times.append(time.perf_counter() - t)
    params = logical_params(model)
    per_step = sum(times[2:]) / steps
    out = {"tokens_per_s": batch * seq / per_step, "params": params, "step_s": per_step}
    out["peak_gb"] = torch.cuda.max_memory_allocated() / 1024**3 if device == "cuda" else float("nan")
    del model, opt
    if device == "cuda":
        torch.cuda.empty_cache()
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tiny", action="store_true", help="tiny shape on CPU: checks the script, not the GPU")
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--seq", type=int, default=2048)
    a = parser.parse_args()
    device = "cpu" if a.tiny else "cuda"
    if device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("no CUDA device: run with --tiny for a CPU smoke check")
    shape = TINY if a.tiny else LLAMA3_8B
    seq = 256 if a.tiny else a.seq
    peak = matmul_peak(device, n=1024 if a.tiny else 8192)
    variants = {"bf16 LoRA + GC": (False, True), "NF4 QLoRA + GC": (True, True), "NF4 QLoRA, no GC": (True, False)}
    rows = {}
    for name, (nf4, gc) in variants.items():
        rows[name] = measure(shape, device, nf4, gc, a.batch, seq, a.steps)
        print(f"{name}: {rows[name]['tokens_per_s']:.0f} tok/s", flush=True)
    base = rows["bf16 LoRA + GC"]["tokens_per_s"]
    name_of = "Llama-3-8B shape (random init)" if not a.tiny else "tiny Llama shape"
    print(f"\n{name_of}, batch {a.batch} x {seq} packed tokens, bf16 matmul peak {peak / 1e12:.1f} TFLOP/s")
    print(f"{'variant':<20} {'tok/s':>8} {'vs bf16':>8} {'step s':>7} {'peak GPU GB':>12} {'MFU':>6}")
    for name, r in rows.items():
        mfu = r["tokens_per_s"] * 4 * r["params"] / peak
        print(
            f"{name:<20} {r['tokens_per_s']:>8.0f} {r['tokens_per_s'] / base:>7.2f}x {r['step_s']:>7.2f} "
            f"{r['peak_gb']:>12.1f} {mfu:>6.1%}"
        )


if __name__ == "__main__":
    main()
