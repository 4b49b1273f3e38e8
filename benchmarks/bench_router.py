"""Router overhead vs calling the upstream directly vs the LiteLLM proxy, against a fast fake upstream.

    python benchmarks/bench_router.py [--seconds 8]     # ~3 min (+ ~2 min once to install LiteLLM)

Three processes on loopback: a fake OpenAI upstream (aiohttp, a fixed answer), the server under test (our router
with A/B over two arms, API keys, per-key limits, metrics, audit and the response cache all on; or the LiteLLM
proxy with the same two weighted upstreams, installed into .venv-litellm on first use, started offline), and
this asyncio load generator. Each case runs `--seconds` at 1 and at 16 connections and prints p50/p95 latency
and requests/s; the router's cache-miss case sends a different question every time (a cache lookup and a store
per request, through Redis when one answers on 127.0.0.1:6379), the cache-hit case the same one.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
LITELLM = ROOT / ".venv-litellm"
LITELLM_VERSION = "1.108.7"  # the newest whose proxy extra resolves from PyPI alone (later ones need litellm-proxy)
ANSWER = {
    "id": "chatcmpl-fake",
    "object": "chat.completion",
    "created": 0,
    "model": "x",
    "choices": [
        {
            "index": 0,
            "message": {"role": "assistant", "content": "A BOQ is a bill of quantities."},
            "finish_reason": "stop",
        }
    ],
    "usage": {"prompt_tokens": 20, "completion_tokens": 8, "total_tokens": 28},
}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_up(url: str, timeout_s: float = 120, headers: dict[str, str] | None = None) -> None:
    import httpx

    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            if httpx.get(url, headers=headers, timeout=2).status_code < 500:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.3)
    raise RuntimeError(f"{url} did not come up in {timeout_s} s")


def fake_upstream(port: int) -> None:
    """The upstream: answers every chat completion at once with the same small JSON."""
    from aiohttp import web

    body = json.dumps(ANSWER).encode()

    async def chat(_: web.Request) -> web.Response:
        return web.Response(body=body, content_type="application/json")

    async def models(_: web.Request) -> web.Response:
        return web.json_response({"object": "list", "data": [{"id": "alpha"}, {"id": "beta"}]})

    app = web.Application()
    app.router.add_post("/v1/chat/completions", chat)
    app.router.add_get("/v1/models", models)
    web.run_app(app, host="127.0.0.1", port=port, print=None, access_log=None)


def serve_router(config_file: str, port: int, database_url: str, redis_url: str) -> None:
    import uvicorn
    from fibreflow.serving.config import ServingConfig
    from fibreflow.serving.router import create_app

    cfg = ServingConfig.model_validate(json.loads(Path(config_file).read_text()))
    app = create_app(cfg, redis_url=redis_url, database_url=database_url, watch=False)
    uvicorn.run(
        app,
        host="127.0.0.1",
        port=port,
        log_level="warning",
        loop="uvloop",
        http="httptools",
        access_log=False,
        proxy_headers=False,
    )


async def load(
    url: str, headers: dict[str, str], body: dict, connections: int, seconds: float, vary: bool
) -> tuple[list[float], int]:
    """Latencies (s) of all requests that succeeded, and how many failed."""
    import aiohttp

    latencies: list[float] = []
    failed = 0
    stop = time.perf_counter() + seconds
    counter = 0
    hdrs = headers | {"Content-Type": "application/json"}

    async def worker(session: aiohttp.ClientSession) -> None:
        nonlocal failed, counter
        while time.perf_counter() < stop:
            counter += 1
            payload = body
            if vary:
                payload = body | {"messages": [{"role": "user", "content": f"What is BOQ line {counter}?"}]}
            data = json.dumps(payload).encode()
            t0 = time.perf_counter()
            async with session.post(url, data=data, headers=hdrs) as resp:
                await resp.read()
                ok = resp.status == 200
            if ok:
                latencies.append(time.perf_counter() - t0)
            else:
                failed += 1

    connector = aiohttp.TCPConnector(limit=connections)
    async with aiohttp.ClientSession(connector=connector) as session:
        await asyncio.gather(*(worker(session) for _ in range(connections)))
    return latencies, failed


def pct(xs: list[float], q: float) -> float:
    s = sorted(xs)
    return s[min(len(s) - 1, int(q * len(s)))] * 1000 if s else float("nan")


def install_litellm() -> Path:
    python = LITELLM / "bin/python"
    if not (LITELLM / "bin/litellm").exists():
        print(f"installing litellm[proxy]=={LITELLM_VERSION} into {LITELLM} (once) ...", flush=True)
        subprocess.run([sys.executable, "-m", "venv", str(LITELLM)], check=True)
        subprocess.run([str(python), "-m", "pip", "install", "-q", f"litellm[proxy]=={LITELLM_VERSION}"], check=True)
    return LITELLM / "bin/litellm"


def redis_url() -> str:
    try:
        with socket.create_connection(("127.0.0.1", 6379), timeout=0.5):
            return "redis://127.0.0.1:6379/14"
    except OSError:
        return ""


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--seconds", type=float, default=8.0)
    ap.add_argument("--skip-litellm", action="store_true")
    ap.add_argument("--no-redis", action="store_true", help="cache and limits in-process even if Redis answers")
    args = ap.parse_args()
    procs: list[subprocess.Popen] = []
    env = os.environ | {"HF_HUB_OFFLINE": "1"}
    with tempfile.TemporaryDirectory(prefix="fibreflow-bench-router-") as tmp:
        try:
            up = free_port()
            procs.append(subprocess.Popen([sys.executable, __file__, "--fake-upstream", str(up)], env=env))
            wait_up(f"http://127.0.0.1:{up}/v1/models")
            key, db_url = setup_keys(Path(tmp), env)
            redis = "" if args.no_redis else redis_url()
            if redis:
                import redis as redis_lib

                redis_lib.Redis.from_url(redis).flushdb()
            cfg = router_config(up)
            (Path(tmp) / "router.json").write_text(json.dumps(cfg))
            rport = free_port()
            procs.append(
                subprocess.Popen(
                    [
                        sys.executable,
                        __file__,
                        "--serve-router",
                        str(Path(tmp) / "router.json"),
                        str(rport),
                        db_url,
                        redis,
                    ],
                    env=env | {"FIBREFLOW_HOME": tmp},
                )
            )
            wait_up(f"http://127.0.0.1:{rport}/health")
            cases = [
                ("upstream directly", f"http://127.0.0.1:{up}/v1/chat/completions", {}, "alpha", True),
                (
                    "router, cache miss",
                    f"http://127.0.0.1:{rport}/v1/chat/completions",
                    {"Authorization": f"Bearer {key}"},
                    "assistant",
                    True,
                ),
                (
                    "router, cache hit",
                    f"http://127.0.0.1:{rport}/v1/chat/completions",
                    {"Authorization": f"Bearer {key}"},
                    "assistant",
                    False,
                ),
            ]
            if not args.skip_litellm:
                lport = free_port()
                procs.append(start_litellm(Path(tmp), up, lport))
                cases.append(
                    (
                        "LiteLLM proxy",
                        f"http://127.0.0.1:{lport}/v1/chat/completions",
                        {"Authorization": "Bearer sk-bench"},
                        "assistant",
                        True,
                    )
                )
            results = run_cases(cases, args.seconds)
        finally:
            for p in procs:
                p.terminate()
            for p in procs:
                p.wait(timeout=30)
    report(results, redis)


def setup_keys(home: Path, env: dict[str, str]) -> tuple[str, str]:
    """An embedded database in `home`, migrated, with one chat key (limits high enough never to refuse)."""
    os.environ["FIBREFLOW_HOME"] = str(home)
    (home / "configs").symlink_to(ROOT / "configs")
    from fibreflow.core.db import connect, database_url, load_db_config, migrate
    from fibreflow.serving import keys

    url = os.environ.get("DATABASE_URL") or database_url(load_db_config())
    with connect(url) as conn:
        migrate(conn)
        key, _ = keys.create(conn, "bench", ["chat"], requests_per_minute=10**9, tokens_per_minute=10**9)
    return key, url


def router_config(upstream_port: int) -> dict:
    from fibreflow.serving.config import load_serving_config

    cfg = load_serving_config().model_dump()
    r = cfg["router"]
    r["upstreams"] = {"fake": {"url": f"http://127.0.0.1:{upstream_port}/v1", "timeout_s": 30}}
    r["experiments"] = [
        {
            "model": "assistant",
            "salt": "bench",
            "shadow": None,
            "arms": [
                {"name": "champion", "upstream": "fake", "model": "alpha", "weight": 0.9},
                {"name": "challenger", "upstream": "fake", "model": "beta", "weight": 0.1},
            ],
        }
    ]
    r["fallback"] = None
    r["schedule"] = {"timezone": "UTC", "periods": []}
    return cfg


def start_litellm(home: Path, upstream_port: int, port: int) -> subprocess.Popen:
    import yaml

    exe = install_litellm()
    base = f"http://127.0.0.1:{upstream_port}/v1"
    conf = {
        "model_list": [
            {
                "model_name": "assistant",
                "litellm_params": {"model": "openai/alpha", "api_base": base, "api_key": "x", "weight": 9},
            },
            {
                "model_name": "assistant",
                "litellm_params": {"model": "openai/beta", "api_base": base, "api_key": "x", "weight": 1},
            },
        ],
        "router_settings": {"routing_strategy": "simple-shuffle"},
        "litellm_settings": {"telemetry": False, "drop_params": True},
    }
    (home / "litellm.yaml").write_text(yaml.safe_dump(conf))
    env = os.environ | {
        "LITELLM_MASTER_KEY": "sk-bench",
        "LITELLM_LOCAL_MODEL_COST_MAP": "True",
        "LITELLM_LOG": "ERROR",
        "LITELLM_TELEMETRY": "False",
        "DISABLE_SCHEMA_UPDATE": "True",
    }
    env.pop("DATABASE_URL", None)
    cmd = [str(exe), "--config", str(home / "litellm.yaml"), "--host", "127.0.0.1", "--port", str(port)]
    with open(home / "litellm.log", "w") as log:  # the child keeps its own copy of the descriptor
        proc = subprocess.Popen([*cmd, "--num_workers", "1"], env=env, stdout=subprocess.DEVNULL, stderr=log)
    wait_up(f"http://127.0.0.1:{port}/health/liveliness", timeout_s=180)
    return proc


def run_cases(cases: list, seconds: float) -> list[tuple[str, int, float, float, float, int]]:
    out = []
    for name, url, headers, model, vary in cases:
        body = {
            "model": model,
            "messages": [{"role": "user", "content": "What is a BOQ?"}],
            "max_tokens": 16,
            "temperature": 0,
        }
        asyncio.run(load(url, headers, body, 4, 1.0, vary))  # warm up
        for conns in (1, 16):
            lat, failed = asyncio.run(load(url, headers, body, conns, seconds, vary))
            out.append((name, conns, pct(lat, 0.5), pct(lat, 0.95), len(lat) / seconds, failed))
            print(
                f"{name:20s} {conns:2d} conn  p50 {out[-1][2]:7.2f} ms  p95 {out[-1][3]:7.2f} ms  "
                f"{out[-1][4]:8.1f} req/s  failed {failed}",
                flush=True,
            )
    return out


def report(results: list, redis: str) -> None:
    by = {(r[0], r[1]): r for r in results}
    print(f"\ncache and limits backend: {'Redis ' + redis if redis else 'in-process'}")
    print("\n| case | connections | p50 ms | p95 ms | req/s | failed |\n|---|---|---|---|---|---|")
    for r in results:
        print(f"| {r[0]} | {r[1]} | {r[2]:.2f} | {r[3]:.2f} | {r[4]:.0f} | {r[5]} |")
    direct, miss, hit = by[("upstream directly", 1)], by[("router, cache miss", 1)], by[("router, cache hit", 1)]
    print(f"\nrouter added p50 at 1 connection (cache miss): {miss[2] - direct[2]:.2f} ms (target <= 1 ms)")
    print(f"router cache hit p50 at 1 connection: {hit[2]:.2f} ms (target <= 1 ms)")
    if ("LiteLLM proxy", 16) in by:
        for c in (1, 16):
            ratio = by[("router, cache miss", c)][4] / by[("LiteLLM proxy", c)][4]
            print(f"router req/s vs LiteLLM at {c} connection(s): {ratio:.1f}x (target >= 10x)")


if __name__ == "__main__":
    if len(sys.argv) > 2 and sys.argv[1] == "--fake-upstream":
        fake_upstream(int(sys.argv[2]))
    elif len(sys.argv) > 2 and sys.argv[1] == "--serve-router":
        serve_router(sys.argv[2], int(sys.argv[3]), sys.argv[4], sys.argv[5])
    else:
        main()
