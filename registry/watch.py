"""Alias changes for the serving layer: poll `@champion` / `@challenger` and call back when one moves.

Polling works with every MLflow backend (a sqlite file, a tracking server); each poll is one registry read per
alias, so a change is seen within `interval_s`. The serving layer (#6) reloads its upstream in the callback.
"""

from __future__ import annotations

import threading
from collections.abc import Callable

Change = Callable[[str, str | None, str | None], None]  # (alias, old version, new version)


class AliasWatcher:
    """Polls the aliases of one registered model on a daemon thread; `stop()` ends it."""

    def __init__(self, name: str, aliases: tuple[str, ...], on_change: Change, interval_s: float = 5.0) -> None:
        import mlflow

        self.name, self.aliases, self.on_change, self.interval_s = name, aliases, on_change, interval_s
        self._client = mlflow.MlflowClient()
        self._stop = threading.Event()
        self.versions: dict[str, str | None] = {a: self._read(a) for a in aliases}
        self._thread = threading.Thread(target=self._run, name=f"alias-watch-{name}", daemon=True)

    def _read(self, alias: str) -> str | None:
        import mlflow

        try:
            return str(self._client.get_model_version_by_alias(self.name, alias).version)
        except mlflow.exceptions.MlflowException:
            return None

    def poll(self) -> list[tuple[str, str | None, str | None]]:
        """Read every alias once; report (and call back for) the ones that moved since the last read."""
        moved = []
        for alias in self.aliases:
            now = self._read(alias)
            if now != self.versions[alias]:
                moved.append((alias, self.versions[alias], now))
                self.versions[alias] = now
                self.on_change(alias, moved[-1][1], now)
        return moved

    def _run(self) -> None:
        while not self._stop.wait(self.interval_s):
            self.poll()

    def start(self) -> AliasWatcher:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=self.interval_s + 5)
