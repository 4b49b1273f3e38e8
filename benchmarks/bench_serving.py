"""End to end with the real model: users -> router (keys, limits, metrics, audit on; cache off) -> local model
server (bundled SmolLM2-135M + the @champion adapter when the registry has one, as `fibreflow serve` runs it).

    python benchmarks/bench_serving.py [--seconds 30]     # ~4 min on 2 cores

At 1, 4 and 8 concurrent users, each streaming one question after another (terminology questions from the
built test set, max 64 new tokens, greedy) for `--seconds`: completion tokens/s over all users, p50/p95 of the
whole answer and of the first token. The baseline is the same server with batching off (max_batch 1) at 8 users.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_router import free_port, pct, wait_up

ROOT = Path(__file__).resolve().parents[1]
FIBREFLOW = Path(sys.executable).parent / "fibreflow"


def questions() -> list[str]:
    from fibreflow.eval.config import load_eval_config
    from fibreflow.eval.run import test_set_path
    from fibreflow.eval.testset import load_test_set

    path = test_set_path(load_eval_config())
    return [s.question for s in load_test_set(path) if "terminology" in s.tags][:64]


async def users(url: str, key: str, model: str, qs: list[str], n: int, seconds: float) -> dict[str, float]:
    import openai

    client = openai.AsyncOpenAI(base_url=url, api_key=key, timeout=300, max_retries=0)
    whole, first, tokens, stop = [], [], 0, time.perf_counter() + seconds
    start = time.perf_counter()

    async def user(i: int) -> None:
        nonlocal tokens
        j = i
        while time.perf_counter() < stop:
            t0 = time.perf_counter()
            ttft = None
            stream = await client.chat.completions.create(
                model=model,
                messages=[{"role": "user", "content": qs[j % len(qs)]}],
                max_tokens=64,
                temperature=0,
                stream=True,
                stream_options={"include_usage": True},
                user=f"user-{i}",
            )
            async for chunk in stream:
                if ttft is None and chunk.choices and chunk.choices[0].delta.content:
                    ttft = time.perf_counter() - t0
                if chunk.usage:
                    tokens += chunk.usage.completion_tokens
            whole.append(time.perf_counter() - t0)
            first.append(ttft or whole[-1])
            j += n

    await asyncio.gather(*(user(i) for i in range(n)))
    wall = time.perf_counter() - start
    await client.close()
    return {
        "users": n,
        "answers": len(whole),
        "tok_s": tokens / wall,
        "p50": pct(whole, 0.5) / 1000,
        "p95": pct(whole, 0.95) / 1000,
        "ttft_p50": pct(first, 0.5) / 1000,
        "ttft_p95": pct(first, 0.95) / 1000,
    }


def start(cmd: list[str], env: dict[str, str], health: str) -> subprocess.Popen:
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL)
    try:
        wait_up(health, timeout_s=600)
    except RuntimeError:
        proc.terminate()
        raise
    return proc


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--seconds", type=float, default=30.0)
    args = ap.parse_args()
    from fibreflow.core.db import connect, database_url, load_db_config, migrate
    from fibreflow.serving import keys

    with connect(database_url(load_db_config())) as conn:
        migrate(conn)
        key, _ = keys.create(conn, "bench-serving", ["chat"], requests_per_minute=10**6, tokens_per_minute=10**9)
    qs = questions()
    env = os.environ | {"HF_HUB_OFFLINE": "1"}
    rows = []
    for max_batch, levels in ((16, (1, 4, 8)), (1, (8,))):
        mport, rport = free_port(), free_port()
        server = start(
            [
                str(FIBREFLOW),
                "serve-model",
                "--set",
                f"model_server.port={mport}",
                "--set",
                f"model_server.max_batch={max_batch}",
            ],
            env,
            f"http://127.0.0.1:{mport}/health",
        )
        router = start(
            [
                str(FIBREFLOW),
                "serve",
                "--set",
                f"router.port={rport}",
                "--set",
                f"router.upstreams.primary.url=http://127.0.0.1:{mport}/v1",
                "--set",
                "router.cache.enabled=false",
                "--set",
                "router.schedule.periods=[]",
            ],
            env,
            f"http://127.0.0.1:{rport}/health",
        )
        try:
            served = httpx.get(f"http://127.0.0.1:{rport}/health").json()
            for n in levels:
                r = asyncio.run(users(f"http://127.0.0.1:{rport}/v1", key, "fibreflow-assistant", qs, n, args.seconds))
                r["max_batch"] = max_batch
                rows.append(r)
                print(json.dumps(r), flush=True)
        finally:
            router.terminate()
            server.terminate()
            router.wait()
            server.wait()
    print(f"\narms served: {served['arms']}")
    print("\n| batching | users | answers | tokens/s | p50 s | p95 s | first token p50 s | p95 s |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(
            f"| max_batch {r['max_batch']} | {r['users']} | {r['answers']} | {r['tok_s']:.1f} | {r['p50']:.2f} |"
            f" {r['p95']:.2f} | {r['ttft_p50']:.2f} | {r['ttft_p95']:.2f} |"
        )
    base = next(r for r in rows if r["max_batch"] == 1)
    best = next(r for r in rows if r["max_batch"] == 16 and r["users"] == 8)
    print(
        f"\n8 users, batched vs one at a time: {best['tok_s'] / base['tok_s']:.1f}x tokens/s, "
        f"p95 {best['p95']:.2f} s vs {base['p95']:.2f} s"
    )


if __name__ == "__main__":
    main()
