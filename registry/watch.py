"""Alias changes for the serving layer: poll `@champion` / `@challenger` and call back when one moves.

Polling works with every MLflow backend (a sqlite file, a tracking server); each poll is one registry read per
alias, so a change is seen within `interval_s`. Only a registry that answers "no such alias" (or no such model)
means unset. A move the callback could not apply (it raised) is not recorded, so the next poll offers it again.
A read that fails (the tracking server down, sqlite locked) keeps the last known version, so an
outage never moves traffic between arms; failures are counted (`on_error`) and logged once per outage. Each read
against a tracking server is one HTTP request with a short timeout and no retries, so a poll never hangs for
minutes and `stop()` returns promptly.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from typing import Any

Change = Callable[[str, str | None, str | None], None]  # (alias, old version, new version)
log = logging.getLogger("fibreflow.registry")
# What MLflow answers for an alias (or a registered model) that does not exist: sqlite and the REST API say
# INVALID_PARAMETER_VALUE for a missing alias, RESOURCE_DOES_NOT_EXIST for a missing model.
UNSET = ("RESOURCE_DOES_NOT_EXIST", "INVALID_PARAMETER_VALUE")


class AliasReadError(Exception):
    """The registry could not be read (not: the alias is unset)."""


class AliasWatcher:
    """Polls the aliases of one registered model on a daemon thread; `stop()` ends it."""

    def __init__(
        self,
        name: str,
        aliases: tuple[str, ...],
        on_change: Change,
        interval_s: float = 5.0,
        timeout_s: float = 5.0,
        on_error: Callable[[Exception], None] | None = None,
    ) -> None:
        import mlflow

        self.name, self.aliases, self.on_change, self.interval_s = name, aliases, on_change, interval_s
        self.timeout_s, self.on_error = timeout_s, on_error
        self._client = mlflow.MlflowClient()
        self._stop = threading.Event()
        self.failing = False
        self.versions: dict[str, str | None] = {}  # alias -> version; absent until first read
        self._thread = threading.Thread(target=self._run, name=f"alias-watch-{name}", daemon=True)

    def read(self, alias: str) -> str | None:
        """The version `alias` names now; None when it is unset; AliasReadError when the registry cannot say."""
        import mlflow
        from mlflow.store.model_registry.rest_store import RestStore

        store = self._client._get_registry_client().store
        try:
            if isinstance(store, RestStore):  # one bounded request: no multi-minute retry inside a poll
                return self._read_rest(store, alias)
            return str(self._client.get_model_version_by_alias(self.name, alias).version)
        except mlflow.exceptions.MlflowException as exc:
            if exc.error_code in UNSET:
                return None
            raise AliasReadError(f"@{alias}: {str(exc).splitlines()[0][:300]}") from None
        except Exception as exc:  # the store's own errors (sqlite locked, a dropped connection)
            raise AliasReadError(f"@{alias}: {type(exc).__name__}: {str(exc)[:300]}") from None

    def _read_rest(self, store: Any, alias: str) -> str | None:
        from mlflow.exceptions import MlflowException
        from mlflow.utils.rest_utils import http_request, verify_rest_response

        try:
            resp = http_request(
                store.get_host_creds(),
                "/api/2.0/mlflow/registered-models/alias",
                "GET",
                params={"name": self.name, "alias": alias},
                max_retries=0,
                timeout=self.timeout_s,
            )
        except MlflowException:
            raise
        except Exception as exc:  # requests' connection errors and timeouts
            raise AliasReadError(f"@{alias}: {type(exc).__name__}") from None
        return str(verify_rest_response(resp, "registered-models/alias").json()["model_version"]["version"])

    def poll(self) -> list[tuple[str, str | None, str | None]]:
        """Read every alias once; report (and call back for) the ones that moved since the last read. An alias
        that cannot be read keeps its last known version."""
        moved, failed = [], False
        for alias in self.aliases:
            try:
                now = self.read(alias)
            except AliasReadError as exc:
                failed = True
                if self.on_error is not None:
                    self.on_error(exc)
                if not self.failing:
                    log.warning("registry unreadable (%s): the arms keep their versions until it is back", exc)
                continue
            old, first = self.versions.get(alias), alias not in self.versions
            if now != old or (first and now is not None):  # the first read reports what is set
                try:
                    self.on_change(alias, old, now)
                except Exception as exc:  # not applied (a new vLLM that did not start): the next poll tries again
                    log.warning("@%s -> v%s not applied, tried again at the next poll: %s", alias, now, exc)
                    continue
                moved.append((alias, old, now))
            self.versions[alias] = now
        if self.failing and not failed:
            log.warning("registry readable again")
        self.failing = failed
        return moved

    def _run(self) -> None:
        while not self._stop.wait(self.interval_s):
            self.poll()

    def start(self) -> AliasWatcher:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout=self.timeout_s * len(self.aliases) + 1)
