"""Prometheus, Alertmanager and Grafana as shipped in deploy/: promtool and amtool accept the files, every alert
fires on synthetic series that break its target and stays quiet otherwise, every dashboard query parses, and every
metric a query or rule names is exported by the real router, model server and monitor (scraped over HTTP here; vLLM's
names in tests/serving/test_vllm.py against a real vLLM). A renamed metric breaks the build, not the dashboard."""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml
from observed import DASHBOARD, DEPLOY, dashboard_exprs, exported, metric_names, promql, rules, used_names

PROM = DEPLOY / "prometheus"
# NVIDIA DCGM exporter's default counters (etc/default-counters.csv): no GPU here to scrape them from.
DCGM = {"DCGM_FI_DEV_GPU_UTIL", "DCGM_FI_DEV_FB_USED", "DCGM_FI_DEV_FB_FREE", "DCGM_FI_DEV_GPU_TEMP",
        "DCGM_FI_DEV_POWER_USAGE"}  # fmt: skip
PROMETHEUS_OWN = {"up", "ALERTS"}  # series Prometheus makes itself


def tool(name: str) -> str:
    path = shutil.which(name)
    assert path, f"{name} is missing: scripts/test.sh installs Debian's prometheus and prometheus-alertmanager"
    return path


def run(*cmd: str) -> str:
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, f"{' '.join(cmd)}:\n{out.stdout}\n{out.stderr}"
    return out.stdout


# ---- the tools accept the files --------------------------------------------------------------------------------


def test_promtool_accepts_the_config_and_its_rules() -> None:
    out = run(tool("promtool"), "check", "config", str(PROM / "prometheus.yml"))
    assert "SUCCESS: 1 rule files found" in out


def test_every_alert_fires_and_stays_quiet_under_promtool() -> None:
    run(tool("promtool"), "test", "rules", str(PROM / "tests" / "fibreflow.test.yml"))
    cases = yaml.safe_load((PROM / "tests" / "fibreflow.test.yml").read_text())["tests"]
    fired, quiet = set(), set()
    for case in cases:
        for check in case.get("alert_rule_test", []):
            (fired if check.get("exp_alerts") else quiet).add(check["alertname"])
    alerts = {r["alert"] for r in rules()}
    assert alerts - fired == set(), "alerts no test makes fire"
    assert alerts - quiet == set(), "alerts no test keeps quiet"
    for name in ("RouterLatencyP95High", "RouterErrorRateHigh", "CacheHitRateLow", "GPUSaturated"):
        assert name in alerts  # the seed's targets: p95 < 2 s, errors < 0.1%, cache hits > 60%, GPU


def test_a_broken_threshold_fails_the_rule_tests(tmp_path: Path) -> None:
    """The rule tests can fail: the p95 alert at 10 s instead of 2 s no longer fires where the tests expect it."""
    shutil.copytree(PROM, tmp_path / "prometheus")
    path = tmp_path / "prometheus" / "rules" / "fibreflow.yml"
    path.write_text(path.read_text().replace("rate(fibreflow_router_request_seconds_bucket[5m]))) > 2",
                                             "rate(fibreflow_router_request_seconds_bucket[5m]))) > 10"))  # fmt: skip
    out = subprocess.run([tool("promtool"), "test", "rules", str(tmp_path / "prometheus/tests/fibreflow.test.yml")],
                         capture_output=True, text=True, timeout=120)  # fmt: skip
    assert out.returncode != 0 and "RouterLatencyP95High" in out.stdout + out.stderr


def test_alertmanager_accepts_its_config_and_pages_on_critical() -> None:
    config = str(DEPLOY / "alertmanager" / "alertmanager.yml")
    run(tool("amtool"), "check-config", config)
    route = [tool("amtool"), "config", "routes", "test", f"--config.file={config}"]
    assert run(*route, "severity=critical", "alertname=RouterDown").strip() == "on-call"
    assert run(*route, "severity=warning", "alertname=CacheHitRateLow").strip() == "ops"


def test_the_dashboard_loads_and_every_query_parses() -> None:
    dash = json.loads(DASHBOARD.read_text())
    source = yaml.safe_load((DEPLOY / "grafana/provisioning/datasources/prometheus.yml").read_text())["datasources"]
    uids = {d["uid"] for d in source}
    panels = [p for p in dash["panels"] if p["type"] != "row"]
    assert len({p["id"] for p in dash["panels"]}) == len(dash["panels"])
    for p in panels:
        assert p["targets"] and p["datasource"]["uid"] in uids, p["title"]
    titles = " | ".join(p["title"] for p in panels)
    for want in ("p95 latency per arm", "time to first token", "Tokens/s", "Cache hit rate", "Error rate",
                 "Fallbacks", "Feedback", "Live score", "GPU utilisation"):  # fmt: skip
        assert want in titles
    for expr in dashboard_exprs() + [r["expr"] for r in rules()]:
        if not expr.startswith("label_values("):
            promql(expr)  # raises on a query Prometheus would refuse


# ---- every metric name is real -----------------------------------------------------------------------------------


@pytest.fixture
def scraped(upstream: str, run_app: Any) -> set[str]:
    """Sample names from real scrapes: the router in front of the tiny model server, that model server, and the
    regression monitor's gauges served over HTTP."""
    from fibreflow.monitor.config import load_monitoring_config
    from fibreflow.monitor.scheduler import Monitor
    from fibreflow.serving.config import ServingConfig
    from fibreflow.serving.router import create_app
    from prometheus_client import make_asgi_app

    arms = [{"name": "a", "upstream": "local", "model": "alpha", "weight": 1.0}]
    cfg = ServingConfig.model_validate({"router": {
        "upstreams": {"local": {"url": f"{upstream}/v1"}},
        "experiments": [{"model": "assistant", "salt": "s", "arms": arms}],
        "auth": {"required": False}, "audit": {"enabled": False},
    }})  # fmt: skip
    router = run_app(create_app(cfg, redis_url="", watch=False))
    chat = {"model": "assistant", "messages": [{"role": "user", "content": "What is a BOQ?"}], "max_tokens": 3}
    assert httpx.post(f"{router}/v1/chat/completions", json=chat, timeout=60).status_code == 200
    monitor = Monitor(load_monitoring_config(), lambda: [])
    monitor_url = run_app(make_asgi_app(monitor.registry))
    texts = [httpx.get(f"{base}/metrics", timeout=30).text for base in (router, upstream)]
    texts.append(httpx.get(f"{monitor_url}/", timeout=30).text)
    return set().union(*(exported(t) for t in texts))


@pytest.mark.integration
def test_every_metric_the_dashboard_and_rules_name_is_exported(scraped: set[str]) -> None:
    used = used_names()
    ours = {n for n in used if n.startswith("fibreflow_")}
    assert ours - scraped == set(), "named in deploy/ but exported by no scraped /metrics"
    vllm = {n for n in used if n.startswith("vllm:")}  # checked against a real vLLM in tests/serving/test_vllm.py
    assert used - ours - vllm - DCGM - PROMETHEUS_OWN == set(), "metrics from nowhere known"
    assert {"fibreflow_router_request_seconds_bucket", "fibreflow_model_queue_wait_seconds_bucket",
            "fibreflow_monitor_last_status"} <= ours  # fmt: skip


def test_a_renamed_metric_is_caught() -> None:
    """The name check sees through PromQL: a selector inside rate() inside an aggregation inside a division."""
    expr = 'sum(rate(fibreflow_router_cache_total{result="hit"}[$__rate_interval])) / sum(rate(x_total[5m]))'
    assert metric_names(expr) == {"fibreflow_router_cache_total", "x_total"}
    text = '# TYPE a counter\na_total 1\n# TYPE h histogram\nh_bucket{le="+Inf"} 1\nh_sum 1\nh_count 1\n'
    assert {"a_total", "h_bucket", "h_count"} <= exported(text) and "fibreflow_router_cache_total" not in exported(text)
