"""Load: 50 concurrent users for 60 s through the router with everything on (keys, per-key limits, Redis cache and
limits, audit, metrics, A/B over two arms), in front of a fast fake upstream and in front of the local model
server (the bundled SmolLM2-135M-Instruct on these CPUs). Errors, p50/p95/p99 and requests/s, each beside the
same load sent to the upstream directly (the baseline). Target: 0 errors.

    python benchmarks/bench_load.py [--users 50] [--seconds 60]     # ~5 min (+ converting the bundled model once)

Every request asks a different question (no cache hits: the router's full path each time), greedy, 16 new tokens.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bench_router import ROOT, free_port, pct, redis_url, router_config, setup_keys, wait_up


async def users(url: str, headers: dict[str, str], model: str, n: int, seconds: float) -> tuple[list[float], int]:
    """`n` users, each sending its next question as soon as the last is answered: latencies (s) of the answered
    ones, and how many got anything but a 200 (or no answer)."""
    import aiohttp

    latencies: list[float] = []
    failed, asked, stop = 0, 0, time.perf_counter() + seconds
    hdrs = headers | {"Content-Type": "application/json"}

    async def user(session: aiohttp.ClientSession, me: int) -> None:
        nonlocal failed, asked
        while time.perf_counter() < stop:
            asked += 1
            question = {"role": "user", "content": f"What is BOQ line {asked} of project {me}?"}
            body = {"model": model, "max_tokens": 16, "temperature": 0, "user": f"user-{me}", "messages": [question]}
            t0 = time.perf_counter()
            try:
                async with session.post(url, data=json.dumps(body).encode(), headers=hdrs) as resp:
                    await resp.read()
                    ok = resp.status == 200
            except aiohttp.ClientError:
                ok = False
            if ok:
                latencies.append(time.perf_counter() - t0)
            else:
                failed += 1

    timeout = aiohttp.ClientTimeout(total=600)
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=n), timeout=timeout) as session:
        await asyncio.gather(*(user(session, i) for i in range(n)))
    return latencies, failed


def model_server(port: int, env: dict[str, str]) -> subprocess.Popen:
    """The local model server on the bundled base (its home: the repo, where the converted model is kept)."""
    cmd = [str(Path(sys.executable).with_name("fibreflow")), "serve-model", "--no-registry",
           "--set", f"model_server.port={port}", "--set", "model_server.max_batch=16"]  # fmt: skip
    return subprocess.Popen(cmd, env=env | {"FIBREFLOW_HOME": str(ROOT)}, stdout=subprocess.DEVNULL)


def run(name: str, url: str, headers: dict[str, str], model: str, n: int, seconds: float) -> dict:
    lat, failed = asyncio.run(users(url, headers, model, n, seconds))
    row = {"case": name, "answered": len(lat), "errors": failed, "p50": pct(lat, 0.5), "p95": pct(lat, 0.95),
           "p99": pct(lat, 0.99), "rps": len(lat) / seconds}  # fmt: skip
    print(f"{name:40s} {row['answered']:6d} answered  {failed} errors  p50 {row['p50']:8.1f} ms  "
          f"p95 {row['p95']:8.1f} ms  p99 {row['p99']:8.1f} ms  {row['rps']:7.1f} req/s", flush=True)  # fmt: skip
    return row


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--users", type=int, default=50)
    ap.add_argument("--seconds", type=float, default=60.0)
    args = ap.parse_args()
    env = os.environ | {"HF_HUB_OFFLINE": "1"}
    procs: list[subprocess.Popen] = []
    rows = []
    bench = Path(__file__).with_name("bench_router.py")
    with tempfile.TemporaryDirectory(prefix="fibreflow-bench-load-") as tmp:
        try:
            fake, local = free_port(), free_port()
            procs.append(subprocess.Popen([sys.executable, str(bench), "--fake-upstream", str(fake)], env=env))
            procs.append(model_server(local, env))
            wait_up(f"http://127.0.0.1:{fake}/v1/models")
            wait_up(f"http://127.0.0.1:{local}/health", timeout_s=600)
            key, db_url = setup_keys(Path(tmp), env)
            redis = redis_url()
            for upstream, port, model in (
                ("fake upstream", fake, "alpha"),
                ("model server", local, "smollm2-135m-instruct"),
            ):
                cfg = router_config(port)
                arms = cfg["router"]["experiments"][0]["arms"]
                for arm in arms:
                    arm["model"] = model
                (Path(tmp) / "router.json").write_text(json.dumps(cfg))
                rport = free_port()
                router = subprocess.Popen([sys.executable, str(bench), "--serve-router", str(Path(tmp) / "router.json"),
                                           str(rport), db_url, redis], env=env | {"FIBREFLOW_HOME": tmp})  # fmt: skip
                try:
                    wait_up(f"http://127.0.0.1:{rport}/health")
                    direct = f"http://127.0.0.1:{port}/v1/chat/completions"
                    rows.append(run(f"{upstream}, directly", direct, {}, model, args.users, args.seconds))
                    via = f"http://127.0.0.1:{rport}/v1/chat/completions"
                    auth = {"Authorization": f"Bearer {key}"}
                    rows.append(
                        run(f"{upstream}, through the router", via, auth, "assistant", args.users, args.seconds)
                    )
                finally:
                    router.terminate()
                    router.wait(60)
        finally:
            for p in procs:
                p.terminate()
            for p in procs:
                p.wait(timeout=60)
    print(f"\n{args.users} users, {args.seconds:.0f} s each; cache and limits: {'Redis' if redis else 'in-process'}")
    print("\n| case | answered | errors | p50 ms | p95 ms | p99 ms | req/s |\n|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['case']} | {r['answered']} | {r['errors']} | {r['p50']:.1f} | {r['p95']:.1f} | {r['p99']:.1f} | "
              f"{r['rps']:.1f} |")  # fmt: skip
    for i in (0, 2):
        direct, via = rows[i], rows[i + 1]
        print(
            f"{via['case']}: {via['rps'] / direct['rps']:.2f}x the direct req/s, p95 {via['p95'] / direct['p95']:.2f}x"
        )
    total = sum(r["errors"] for r in rows if "router" in r["case"])
    print(f"errors through the router: {total} (target 0)")


if __name__ == "__main__":
    main()
