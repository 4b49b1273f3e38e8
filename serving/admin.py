"""The admin API (keys with the admin scope): the experiments served, changed at run time without a restart.

Changes are kept in Postgres (`router_experiments`): they survive a restart, and every router sharing the database
applies them within `experiments_poll_s`. A row overrides serving.yaml's experiment of the same model; a removed
experiment is a row without a spec. Without a database (a development router) they live in memory only.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import logging
from typing import TYPE_CHECKING, Any

import psycopg
from fastapi import APIRouter
from fibreflow.serving.config import Experiment
from fibreflow.serving.guard import CurrentCall, guarded
from fibreflow.serving.protocol import ApiError
from psycopg.types.json import Jsonb
from psycopg_pool import PoolTimeout
from pydantic import ValidationError

if TYPE_CHECKING:
    from fibreflow.serving.router import Router

log = logging.getLogger("fibreflow.serving")


class ExperimentStore:
    """The admin API's changes in Postgres, applied to the router's targets at start and on every poll."""

    def __init__(self, router: Router) -> None:
        self.router = router
        self.seen: dt.datetime | None = None  # the newest change applied
        self._task: asyncio.Task[None] | None = None

    async def start(self) -> None:
        if self.router.pool is None:
            return
        with contextlib.suppress(psycopg.Error, PoolTimeout):  # unreachable now: the poll catches up once it is back
            await self.sync()
        self._task = asyncio.create_task(self._poll())

    async def _poll(self) -> None:
        while True:
            await asyncio.sleep(self.router.rc.experiments_poll_s)
            try:
                await self.sync()
            except Exception as exc:  # the database is down: keep serving what we have
                log.warning("experiments: could not read router_experiments (%s)", type(exc).__name__)

    async def sync(self) -> None:
        """Apply the changes made since the last sync (by any router)."""
        async with self.router.pool.connection(timeout=3) as conn:
            cur = await conn.execute(
                # a margin: a change committed just after a later one is still seen (applying twice is harmless)
                "SELECT model, spec, updated_at FROM router_experiments WHERE updated_at > %s ORDER BY updated_at",
                (self.seen - dt.timedelta(seconds=10) if self.seen else dt.datetime.min.replace(tzinfo=dt.UTC),),
            )
            rows = await cur.fetchall()
        for model, spec, at in rows:
            self.apply(model, spec)
            self.seen = max(self.seen or at, at)

    def apply(self, model: str, spec: dict[str, Any] | None) -> None:
        targets = self.router.targets
        if spec is None:
            targets.remove(model)
            return
        try:
            exp = Experiment.model_validate(spec)
            check_upstreams(self.router, exp)
        except (ValidationError, ApiError) as exc:
            log.warning("experiments: %s is not valid on this router, skipped (%s)", model, exc)
            return
        targets.put(exp)

    async def save(self, model: str, exp: Experiment | None, by: str | None) -> None:
        if self.router.pool is None:
            self.apply(model, exp.model_dump() if exp else None)
            return
        spec = Jsonb(exp.model_dump()) if exp is not None else None
        async with self.router.pool.connection(timeout=3) as conn:
            await conn.execute(
                "INSERT INTO router_experiments (model, spec, updated_at, updated_by)"
                " VALUES (%s, %s, clock_timestamp(), %s) ON CONFLICT (model) DO UPDATE"
                " SET spec = EXCLUDED.spec, updated_at = EXCLUDED.updated_at, updated_by = EXCLUDED.updated_by",
                (model, spec, by),
            )
        await self.sync()

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)


def check_upstreams(router: Router, exp: Experiment) -> None:
    known = router.rc.upstreams
    unknown = [a.upstream for a in exp.arms if a.upstream not in known]
    if unknown:
        raise ApiError(400, f"unknown upstreams: {', '.join(unknown)} (known: {', '.join(known)})")


def admin_routes(router: Router, store: ExperimentStore) -> APIRouter:
    api = APIRouter(route_class=guarded(("admin",)))

    def local_only(call: Any) -> None:
        if router.keys is None and not call.caller.startswith("127."):
            raise ApiError(403, "the admin API needs keys (router.auth.required) when called from another host")

    @api.get("/admin/experiments", summary="The experiments now served, with each arm's current model")
    async def list_experiments(call: CurrentCall) -> dict[str, Any]:
        local_only(call)
        exps = [e.model_dump() for e in router.targets.experiments.values()]
        return {"experiments": exps, "targets": router.targets.versions()}

    @api.put("/admin/experiments/{model}", summary="Add or replace an experiment (arms, weights, salt, shadow)")
    async def put_experiment(model: str, exp: Experiment, call: CurrentCall) -> dict[str, Any]:
        local_only(call)
        if exp.model != model:
            raise ApiError(400, f"the body's model {exp.model!r} is not the path's {model!r}", param="model")
        check_upstreams(router, exp)
        await store.save(model, exp, call.key_id)
        return {"status": "updated", "targets": router.targets.versions().get(model, {})}

    @api.delete("/admin/experiments/{model}", summary="Stop serving an experiment")
    async def delete_experiment(model: str, call: CurrentCall) -> dict[str, Any]:
        local_only(call)
        if model not in router.targets.experiments:
            raise ApiError(404, f"no experiment {model!r}")
        await store.save(model, None, call.key_id)
        return {"status": "removed", "model": model}

    return api
