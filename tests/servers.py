"""Real servers for tests: an ASGI app under uvicorn on a free loopback port (imported by name: pytest puts tests/
on sys.path)."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any


class Served:
    """An ASGI app served by uvicorn on a free loopback port, in a thread, until `stop()`."""

    def __init__(self, app: Any) -> None:
        import threading

        import uvicorn

        port = free_port()
        self.url = f"http://127.0.0.1:{port}"
        self.server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.thread.start()
        deadline = time.monotonic() + 30
        while not self.server.started:
            if time.monotonic() > deadline or not self.thread.is_alive():
                raise RuntimeError("uvicorn did not start")
            time.sleep(0.02)

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=10)


def until(check: Callable[[], bool], timeout_s: float, what: str) -> None:
    """Wait for `check()` to hold, polling every 0.1 s; fail saying `what` did not happen within `timeout_s`."""
    deadline = time.monotonic() + timeout_s
    while not check():
        assert time.monotonic() < deadline, f"{what}: not within {timeout_s} s"
        time.sleep(0.1)


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
