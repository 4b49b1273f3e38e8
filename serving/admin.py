"""The admin API (keys with the admin scope): the experiments served, changed at run time without a restart."""

from __future__ import annotations

from typing import TYPE_CHECKING

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response
from fibreflow.serving.audit import Call
from fibreflow.serving.config import Experiment
from fibreflow.serving.protocol import ApiError

if TYPE_CHECKING:
    from fibreflow.serving.router import Router


def add_admin_routes(app: FastAPI, router: Router) -> None:
    upstreams = router.rc.upstreams

    async def admin(request: Request, call: Call) -> None:
        if router.keys is not None:
            await router.authenticate(request, "admin", call)
        elif not call.caller.startswith("127."):
            raise ApiError(403, "the admin API needs keys (router.auth.required) when called from another host")

    @app.get("/admin/experiments", summary="The experiments now served, with each arm's current model")
    async def list_experiments(request: Request) -> Response:
        async def work(request: Request, call: Call) -> Response:
            await admin(request, call)
            exps = [e.model_dump() for e in router.targets.experiments.values()]
            return JSONResponse({"experiments": exps, "targets": router.targets.versions()})

        return await router.handle(request, "/admin/experiments", work)

    @app.put("/admin/experiments/{model}", summary="Add or replace an experiment (arms, weights, salt, shadow)")
    async def put_experiment(model: str, exp: Experiment, request: Request) -> Response:
        async def work(request: Request, call: Call) -> Response:
            await admin(request, call)
            if exp.model != model:
                raise ApiError(400, f"the body's model {exp.model!r} is not the path's {model!r}", param="model")
            unknown = [a.upstream for a in exp.arms if a.upstream not in upstreams]
            if unknown:
                raise ApiError(400, f"unknown upstreams: {', '.join(unknown)} (known: {', '.join(upstreams)})")
            versions = dict(router.watcher.versions) if router.watcher is not None else {}
            router.targets.put(exp, versions)
            return JSONResponse({"status": "updated", "targets": router.targets.versions().get(model, {})})

        return await router.handle(request, "/admin/experiments", work)

    @app.delete("/admin/experiments/{model}", summary="Stop serving an experiment")
    async def delete_experiment(model: str, request: Request) -> Response:
        async def work(request: Request, call: Call) -> Response:
            await admin(request, call)
            if model not in router.targets.experiments:
                raise ApiError(404, f"no experiment {model!r}")
            router.targets.remove(model)
            return JSONResponse({"status": "removed", "model": model})

        return await router.handle(request, "/admin/experiments", work)
