"""Evaluation-time generation: batched local answers vs one-by-one `generate`, and vLLM as the ceiling, one run.

    python benchmarks/bench_generate.py [--questions 64] [--max-new-tokens 64] [--no-vllm]

The same questions (a seeded sample of the built dataset's test set, asked as `fibreflow eval` asks them)
through SmolLM2-135M-Instruct, greedy:
  1. one by one: `model.generate` per question (the baseline);
  2. naive batches of 16 in file order, left-padded;
  3. ours: `generate_local` (length-sorted, left-padded) at several batch sizes;
  4. vLLM's offline engine (`vllm-cpu`, its own venv: scripts/install_vllm.sh) through `VllmGenerator`;
  5. a vLLM server through `EndpointGenerator` with bounded concurrency (achieved concurrency reported).
Each local method runs in float32 and bfloat16 (decoding a 135M model on 2 cores is bound by reading the
weights: bf16 halves the bytes and the CPU's AVX512-BF16 matmuls are ~3x fp32's). Prints samples/s, generated
tokens/s, the ratio to one-by-one in the same dtype and in fp32, and how many answers equal one-by-one's.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
VLLM_PY = ROOT / ".venv-vllm" / "bin" / "python"
VLLM_ENV = {"VLLM_CPU_KVCACHE_SPACE": "2", "VLLM_CPU_NUM_OF_RESERVED_CPU": "0", "HF_HUB_OFFLINE": "1"}

# Run in the vLLM venv: the repo installed there --no-deps, so this is our VllmGenerator on real vLLM.
VLLM_CHILD = """
import importlib.metadata as md, json, sys, time
_v = md.version
md.version = lambda name: _v("vllm-cpu") + "+cpu" if name == "vllm" else _v(name)  # select vLLM's CPU platform
from fibreflow.eval.generators import VllmGenerator
args = json.loads(sys.argv[1])
gen = VllmGenerator("base", args["model"], None, args["max_new_tokens"], engine_args={"dtype": "bfloat16"})
gen.generate(args["conversations"][:4])  # engine start + warm-up
start = time.perf_counter()
answers = gen.generate(args["conversations"])
print("RESULT " + json.dumps({"seconds": time.perf_counter() - start, "answers": answers}))
"""


def questions(n: int, seed: int) -> list[list[dict[str, str]]]:
    """n test-set questions as `fibreflow eval` asks them (system prompt; grounded ones with their records)."""
    from fibreflow.datasets.build import TEST_SET, load_data_config, version_dir
    from fibreflow.eval.config import Rag
    from fibreflow.eval.rag import build_prompts
    from fibreflow.eval.testset import load_test_set

    cfg = load_data_config()
    rows = load_test_set(version_dir(cfg) / TEST_SET)
    picked = sorted(random.Random(seed).sample(range(len(rows)), n))
    prompts = build_prompts([rows[i] for i in picked], cfg.system_prompt, Rag(mode="given"))
    return [p.conversation for p in prompts]


def one_by_one(model: Any, tok: Any, convs: list, max_new: int) -> list[str]:
    import torch
    from fibreflow.eval.generate import chat_prompts

    out = []
    for ids in chat_prompts(tok, convs):
        with torch.no_grad():
            gen = model.generate(
                input_ids=torch.tensor([ids]), max_new_tokens=max_new, do_sample=False, pad_token_id=tok.pad_token_id
            )
        out.append(tok.decode(gen[0, len(ids) :], skip_special_tokens=True).strip())
    return out


def naive_batches(model: Any, tok: Any, convs: list, max_new: int, batch: int = 16) -> list[str]:
    """Batches in the given order (no length sorting), left-padded: what a first attempt at batching does."""
    import torch
    from fibreflow.eval.generate import chat_prompts

    prompts, pad, out = chat_prompts(tok, convs), tok.pad_token_id, []
    for i in range(0, len(prompts), batch):
        part = prompts[i : i + batch]
        width = max(map(len, part))
        ids = torch.tensor([[pad] * (width - len(p)) + p for p in part])
        mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in part])
        with torch.no_grad():
            gen = model.generate(
                input_ids=ids, attention_mask=mask, max_new_tokens=max_new, do_sample=False, pad_token_id=pad
            )
        out += [tok.decode(g[width:], skip_special_tokens=True).strip() for g in gen]
    return out


def timed(fn: Any, *args: Any, **kwargs: Any) -> tuple[float, list[str]]:
    start = time.perf_counter()
    answers = fn(*args, **kwargs)
    return time.perf_counter() - start, answers


def vllm_offline(model_path: str, convs: list, max_new: int) -> tuple[float, list[str]] | None:
    if not VLLM_PY.exists():
        print(f"skip vLLM: {VLLM_PY} missing (bash scripts/install_vllm.sh)", file=sys.stderr)
        return None
    args = json.dumps({"model": model_path, "conversations": convs, "max_new_tokens": max_new})
    proc = subprocess.run(
        [str(VLLM_PY), "-c", VLLM_CHILD, args], capture_output=True, text=True, env=os.environ | VLLM_ENV
    )
    line = next((x for x in proc.stdout.splitlines() if x.startswith("RESULT ")), None)
    if line is None:
        print(f"vLLM offline failed:\n{proc.stderr[-3000:]}", file=sys.stderr)
        return None
    res = json.loads(line.removeprefix("RESULT "))
    return res["seconds"], res["answers"]


def vllm_endpoint(model_path: str, convs: list, max_new: int, concurrency: int) -> tuple[float, list[str], int] | None:
    """A real vLLM OpenAI server, driven by EndpointGenerator with bounded concurrency."""
    from fibreflow.eval.generators import EndpointGenerator

    if not VLLM_PY.exists():
        return None
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cmd = [str(VLLM_PY), "-m", "vllm.entrypoints.openai.api_server", "--model", model_path, "--served-model-name",
           "base", "--dtype", "bfloat16", "--port", str(port), "--host", "127.0.0.1"]  # fmt: skip
    server = subprocess.Popen(cmd, env=os.environ | VLLM_ENV, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.time() + 240
        while time.time() < deadline:
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2)
                break
            except OSError:
                time.sleep(2)
        else:
            print("vLLM server did not become healthy in 240 s", file=sys.stderr)
            return None
        gen = EndpointGenerator("vllm", f"http://127.0.0.1:{port}/v1", "base", concurrency=concurrency,
                                max_new_tokens=max_new, timeout_s=300)  # fmt: skip
        gen.generate(convs[:4])
        seconds, answers = timed(gen.generate, convs)
        return seconds, answers, gen.peak_in_flight
    finally:
        server.terminate()
        server.wait(30)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--questions", type=int, default=64)
    ap.add_argument("--max-new-tokens", type=int, default=64)
    ap.add_argument("--batch-sizes", default="16,32,64")
    ap.add_argument("--dtypes", default="float32,bfloat16")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--no-vllm", action="store_true")
    args = ap.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import torch
    from fibreflow.eval.config import load_eval_config
    from fibreflow.eval.generate import generate_local
    from fibreflow.training.weights import Weights, load_local, weights

    convs = questions(args.questions, args.seed)
    w: Weights = weights("base", load_eval_config().base_model)
    n, max_new = len(convs), args.max_new_tokens
    print(f"{n} questions, max_new_tokens {max_new}, {torch.get_num_threads()} threads, model {w.base}", flush=True)

    rows: list[tuple[str, str, float, list[str], str]] = []  # name, dtype, seconds, answers, note
    base: dict[str, tuple[float, list[str]]] = {}
    tok = None
    for dtype in args.dtypes.split(","):
        model, tok = load_local(w, dtype)
        generate_local(model, tok, convs[:4], batch_size=4, max_new_tokens=8, progress=False)  # warm-up
        base[dtype] = timed(one_by_one, model, tok, convs, max_new)
        rows.append(("one-by-one `generate` (baseline)", dtype, *base[dtype], ""))
        print(rows[-1][:3], flush=True)
        s, a = timed(naive_batches, model, tok, convs, max_new)
        rows.append(("naive batches of 16 (file order)", dtype, s, a, ""))
        for b in (int(x) for x in args.batch_sizes.split(",")):
            s, a = timed(generate_local, model, tok, convs, batch_size=b, max_new_tokens=max_new, progress=False)
            rows.append((f"ours: length-sorted batches of {b}", dtype, s, a, ""))
            print(rows[-1][:3], flush=True)
        del model
    if not args.no_vllm:
        found = vllm_offline(w.base, convs, max_new)
        if found:
            rows.append(("vLLM offline engine (vllm-cpu) via VllmGenerator", "bfloat16", found[0], found[1], ""))
        served = vllm_endpoint(w.base, convs, max_new, concurrency=16)
        if served:
            note = f"achieved concurrency {served[2]} of 16"
            rows.append(("vLLM server via EndpointGenerator", "bfloat16", served[0], served[1], note))

    first = next(iter(base))
    print(f"\n| method | dtype | seconds | samples/s | gen tok/s | vs one-by-one, same dtype | vs one-by-one {first} "
          "| answers equal to same-dtype one-by-one | note |")  # fmt: skip
    print("|---|---|---|---|---|---|---|---|---|")
    for name, dtype, seconds, answers, note in rows:
        toks = sum(len(tok(x, add_special_tokens=False)["input_ids"]) for x in answers)
        ref_s, ref = base.get(dtype, base[first])
        same = sum(x == y for x, y in zip(answers, ref, strict=True))
        print(f"| {name} | {dtype} | {seconds:.1f} | {n / seconds:.2f} | {toks / seconds:.0f} | {ref_s / seconds:.1f}× "
              f"| {base[first][0] / seconds:.1f}× | {same}/{n} | {note} |")  # fmt: skip


if __name__ == "__main__":
    main()
