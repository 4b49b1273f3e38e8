"""`fibreflow regress` on the demo champion through the live router and the local model server, against the same
rows evaluated offline, in one run.

    bash scripts/main.sh                      # once: the demo champion (the main job on embedded defaults)
    .venv/bin/python benchmarks/bench_regress.py [--concurrency 1,8]

Starts `fibreflow serve` (router + local model server, configs/serving.yaml) on free ports with a fresh `qa` key,
freezes the regression suite from the champion's promoting evaluation into a temp file, then:
  1. `regress` of the champion arm at each concurrency of `EndpointGenerator` (the router forwards each request to
     the model server, whose engine batches what is in flight): wall time of the whole run (suite, generation
     through HTTP, scoring, bootstrap CIs, the MLflow run) and rows/s, with the decision it reached;
  2. the same rows asked offline, in this process, as `fibreflow eval` asks them (`LocalGenerator`, batched).
Prints rows/s for each and the ratio to offline.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait(url: str, proc: subprocess.Popen[bytes], timeout_s: float = 600) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"fibreflow serve exited with {proc.returncode}")
        try:
            with urllib.request.urlopen(url, timeout=2) as r:
                if r.status == 200:
                    return
        except OSError:
            time.sleep(1)
    raise SystemExit(f"{url} did not answer within {timeout_s} s")


def offline(version: str, suite: list, rag: dict[str, str], max_new_tokens: int) -> tuple[float, int]:
    """Seconds to answer the suite offline as the evaluation did (the eval config's local generator)."""
    from fibreflow.datasets.build import load_data_config
    from fibreflow.eval.config import Rag, load_eval_config
    from fibreflow.eval.models import generator
    from fibreflow.eval.rag import build_prompts

    cfg = load_eval_config({"generation.max_new_tokens": max_new_tokens})
    gen = generator(f"models:/fibreflow-assistant/{version}", cfg)
    prompts = build_prompts(suite, load_data_config().system_prompt, Rag(mode=rag["mode"], k=int(rag["k"])))
    conversations = [p.conversation for p in prompts]
    gen.generate(conversations[:2])  # warm-up, as the server had one
    start = time.perf_counter()
    answers = gen.generate(conversations)
    return time.perf_counter() - start, len(answers)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--concurrency", default="1,8", help="EndpointGenerator concurrencies to time")
    args = ap.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
    os.chdir(ROOT)

    import mlflow
    import psycopg
    from fibreflow.core.db import database_url, load_db_config
    from fibreflow.core.tracking import setup_mlflow
    from fibreflow.monitor.config import load_monitoring_config
    from fibreflow.monitor.regress import baseline, load_suite
    from fibreflow.monitor.regress import main as regress
    from fibreflow.serving.keys import create

    setup_mlflow("fibreflow-regression")
    try:
        version = str(mlflow.MlflowClient().get_model_version_by_alias("fibreflow-assistant", "champion").version)
    except mlflow.exceptions.MlflowException:
        raise SystemExit("no @champion here: run the main job first (bash scripts/main.sh)") from None
    db = database_url(load_db_config())
    with psycopg.connect(db, autocommit=True) as conn:
        key = create(conn, "bench-regress", ["chat", "qa"])[0]
    tmp = Path(tempfile.mkdtemp(prefix="bench-regress-"))
    port, upstream_port = free_port(), free_port()
    common = {"suite.path": str(tmp / "suite.jsonl"), "suite.sha256": None, "router.arms": ["champion"],
              "router.base_url": f"http://127.0.0.1:{port}/v1", "alert.webhook_url": None}  # fmt: skip
    suite, _ = load_suite(load_monitoring_config(common))  # frozen from the champion's promoting evaluation
    base = baseline("fibreflow-assistant", version)
    print(f"@champion v{version}; suite: {len(suite)} rows from evaluation {base.run_id} "
          f"(rag {base.rag['mode']}, k {base.rag['k']}, max_new_tokens {base.max_new_tokens})")  # fmt: skip

    env = os.environ | {"DATABASE_URL": db, "FIBREFLOW_QA_KEY": key}
    overrides = [f"router.port={port}", f"model_server.port={upstream_port}",
                 f"router.upstreams.primary.url=http://127.0.0.1:{upstream_port}/v1", "router.cache.enabled=false",
                 "router.limits.requests_per_minute=100000", "router.limits.tokens_per_minute=100000000"]  # fmt: skip
    cli = Path(sys.executable).with_name("fibreflow")
    log = (tmp / "serve.log").open("wb")
    serve = subprocess.Popen([str(cli), "serve", *(a for o in overrides for a in ("--set", o))], env=env,
                             stdout=log, stderr=subprocess.STDOUT)  # fmt: skip
    os.environ["FIBREFLOW_QA_KEY"] = key
    rows = []
    try:
        wait(f"http://127.0.0.1:{port}/health", serve)
        warm = {"model": "fibreflow-assistant", "max_tokens": 8, "messages": [{"role": "user", "content": "BOQ?"}]}
        request = urllib.request.Request(f"http://127.0.0.1:{port}/v1/chat/completions", json.dumps(warm).encode(),
                                         {"Authorization": f"Bearer {key}", "Content-Type": "application/json",
                                          "x-fibreflow-arm": "champion"})  # fmt: skip
        urllib.request.urlopen(request, timeout=300).read()  # warm-up: the champion's adapter loaded, the path hot
        for c in [int(x) for x in args.concurrency.split(",")]:
            start = time.perf_counter()
            [result] = regress(common | {"router.concurrency": c}, actions=False)
            seconds = time.perf_counter() - start
            acc = {m: f"{result.scores[m]:.3f} (offline {result.baseline[m]:.3f})" for m in result.scores}
            rows.append((f"regress through the router, concurrency {c}", seconds, result.status, acc))
    finally:
        serve.terminate()
        serve.wait(60)
    seconds, n = offline(version, suite, base.rag, base.max_new_tokens)
    rows.append(("offline, LocalGenerator (as `fibreflow eval`)", seconds, "-", {}))

    print(f"\n{'method':<48}{'wall s':>8}{'rows/s':>8}{'vs offline':>11}  decision / live accuracy")
    for name, s, status, acc in rows:
        extra = f"{status}  {acc.get('accuracy', '')}" if acc else status
        print(f"{name:<48}{s:>8.1f}{len(suite) / s:>8.2f}{seconds / s:>10.2f}x  {extra}")
    print(f"({n} rows; the router's log: {tmp / 'serve.log'})")


if __name__ == "__main__":
    main()
