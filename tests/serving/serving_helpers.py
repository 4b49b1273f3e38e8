"""Helpers shared by the serving tests (imported by name: pytest puts this folder on sys.path)."""

from __future__ import annotations

from typing import Any

import httpx
from fibreflow.serving.config import ServingConfig


def config(upstream: str, **router: Any) -> ServingConfig:
    """A router in front of `upstream` (the tiny model server): experiment `assistant` = arms a (alpha), b (beta)."""
    arms = [
        {"name": "a", "upstream": "local", "model": "alpha", "weight": 0.5},
        {"name": "b", "upstream": "local", "model": "beta", "weight": 0.5},
    ]
    tree = {
        "upstreams": {"local": {"url": f"{upstream}/v1", "timeout_s": 30}},
        "experiments": [{"model": "assistant", "salt": "s1", "arms": arms}],
        "auth": {"required": False},
        "audit": {"enabled": False},
    } | router
    return ServingConfig.model_validate({"router": tree})


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def metric(base: str, name: str, **labels: str) -> float:
    """A sample's value from the router's /metrics (0 when absent)."""
    from prometheus_client.parser import text_string_to_metric_families

    for family in text_string_to_metric_families(httpx.get(f"{base}/metrics").text):
        for s in family.samples:
            if s.name == name and all(s.labels.get(k) == v for k, v in labels.items()):
                return s.value
    return 0.0
