"""Pooled HTTP to the upstreams (aiohttp: keep-alive connections, per-upstream limits and timeouts), and keeping
their adapters in step with the registry (vLLM's `/v1/load_lora_adapter`, which the local model server has too).
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from typing import Any

import aiohttp
from fibreflow.serving.config import Upstream

log = logging.getLogger("fibreflow.serving")


UNAVAILABLE = (502, 503, 504)  # an upstream answering these is down or overloaded, not refusing the request


class UpstreamUnavailable(Exception):
    """The upstream could not answer: refused connection, timeout, or 502/503/504. Retried, counted by its breaker,
    then the fallback answers. (A 4xx or a 500 is the upstream's answer to this request: passed on, not retried.)"""

    def __init__(self, kind: str, status: int) -> None:
        super().__init__(f"{kind} ({status})")
        self.kind, self.status = kind, status


@dataclass
class Answer:
    status: int
    body: bytes
    content_type: str


JSON = {"Content-Type": "application/json"}


def auth_headers(upstream: Upstream) -> dict[str, str]:
    """The upstream's shared token (`api_key_env` names the variable holding it), if it has one."""
    key = os.environ.get(upstream.api_key_env, "") if upstream.api_key_env else ""
    return {"Authorization": f"Bearer {key}"} if key else {}


class Upstreams:
    def __init__(self, cfg: dict[str, Upstream]) -> None:
        self.cfg = cfg
        self._sessions: dict[str, aiohttp.ClientSession] = {}

    async def start(self) -> None:
        for name, up in self.cfg.items():
            self._sessions[name] = aiohttp.ClientSession(
                connector=aiohttp.TCPConnector(limit=up.max_connections, keepalive_timeout=60),
                headers=auth_headers(up),
                skip_auto_headers=("User-Agent",),
            )

    async def close(self) -> None:
        for s in self._sessions.values():
            await s.close()

    def url(self, name: str, path: str) -> str:
        return self.cfg[name].url.rstrip("/") + path

    async def post(self, name: str, path: str, body: bytes) -> Answer:
        """One non-streamed call, within the upstream's `timeout_s` in all."""
        up = self.cfg[name]
        timeout = aiohttp.ClientTimeout(total=up.timeout_s, sock_connect=up.connect_timeout_s)
        try:
            async with self._sessions[name].post(
                self.url(name, path), data=body, headers=JSON, timeout=timeout
            ) as resp:
                data = await resp.read()
        except TimeoutError:
            raise UpstreamUnavailable("timeout", 504) from None
        except aiohttp.ClientError as exc:
            raise UpstreamUnavailable(f"unreachable: {type(exc).__name__}", 502) from None
        if resp.status in UNAVAILABLE:
            raise UpstreamUnavailable(f"unavailable: answered {resp.status}", resp.status)
        return Answer(resp.status, data, resp.headers.get("Content-Type", "application/json"))

    async def open_stream(self, name: str, path: str, body: bytes) -> aiohttp.ClientResponse:
        """A streamed call's response (status checked, body unread): the caller reads it and closes it. Every read
        must come within the upstream's `stream_read_timeout_s` (no limit on the stream's whole length)."""
        up = self.cfg[name]
        timeout = aiohttp.ClientTimeout(sock_connect=up.connect_timeout_s, sock_read=up.stream_read_timeout_s)
        try:
            resp = await self._sessions[name].post(self.url(name, path), data=body, headers=JSON, timeout=timeout)
        except TimeoutError:
            raise UpstreamUnavailable("timeout", 504) from None
        except aiohttp.ClientError as exc:
            raise UpstreamUnavailable(f"unreachable: {type(exc).__name__}", 502) from None
        if resp.status in UNAVAILABLE:
            resp.close()
            raise UpstreamUnavailable(f"unavailable: answered {resp.status}", resp.status)
        return resp


def ensure_adapter(upstream: Upstream, served: str, registered_model: str, version: str) -> None:
    """Make sure `upstream` serves version `version` as `served`: load the registered adapter if it does not.
    Blocking (runs on the alias watcher's thread or at start-up)."""
    import httpx

    base = upstream.url.rstrip("/")
    headers = auth_headers(upstream)
    listed = httpx.get(f"{base}/models", headers=headers, timeout=upstream.connect_timeout_s + 10)
    listed.raise_for_status()
    if served in {m["id"] for m in listed.json()["data"]}:
        return
    path = adapter_folder(registered_model, version)
    resp = httpx.post(
        f"{base}/load_lora_adapter",
        json={"lora_name": served, "lora_path": path},
        headers=headers,
        timeout=upstream.timeout_s,
    )
    if resp.status_code >= 400:
        raise RuntimeError(f"{base}: loading {served} from {path} failed: {resp.status_code} {resp.text[:300]}")
    log.info("loaded %s (%s) on %s", served, path, base)


def adapter_folder(registered_model: str, version: str) -> str:
    """The registered version's adapter, downloaded from MLflow to a local folder."""
    from fibreflow.training.weights import weights

    w = weights(f"models:/{registered_model}/{version}")
    assert w.adapter is not None
    return w.adapter


def usage_of(body: bytes) -> dict[str, Any]:
    """`usage` and `id` of a non-streamed OpenAI answer (empty when it has none)."""
    import orjson

    try:
        obj = orjson.loads(body)
    except orjson.JSONDecodeError:
        return {}
    return {"id": obj.get("id"), **(obj.get("usage") or {})} if isinstance(obj, dict) else {}
