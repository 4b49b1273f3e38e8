"""`POST /v1/embeddings`: the self-hosted embedding model behind the OpenAI API, with a per-text cache (one
round trip for all of a request's texts) and its name, revision and dimension reported, so clients never mix
vector spaces; another model's name is refused. Tokens are the model's own tokenizer's, counted against the key's
token limit like any other call."""

from __future__ import annotations

import asyncio
import base64
import hashlib
from typing import TYPE_CHECKING, Any, Literal

import numpy as np
import orjson
from fastapi import APIRouter
from fastapi.responses import Response
from fibreflow.serving.guard import CurrentCall, guarded
from fibreflow.serving.protocol import ApiError
from pydantic import BaseModel, ConfigDict, Field

if TYPE_CHECKING:
    from fibreflow.serving.fibreflow_api import Resources
    from fibreflow.serving.router import Router


class EmbeddingsRequest(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)
    model: str
    input: str | list[str]
    encoding_format: Literal["float", "base64"] = "float"
    dimensions: int | None = Field(default=None, ge=1)
    user: str | None = None


def embeddings_routes(router: Router, res: Resources) -> APIRouter:
    api = APIRouter(route_class=guarded(("chat",)))
    limit = router.rc.embeddings.max_inputs

    @api.post("/v1/embeddings", summary="Embeddings from the self-hosted model (OpenAI API)")
    async def embeddings(req: EmbeddingsRequest, call: CurrentCall) -> Response:
        embedder = await asyncio.to_thread(res.embedder)
        spec = embedder.spec
        call.model, call.arm, call.version = req.model, "embeddings", f"{spec.name}@{spec.revision}"
        if req.model not in (spec.name, "default"):
            raise ApiError(
                404,
                f"embedding model {req.model!r} is not served here: {spec.name} ({spec.dim}-d); "
                "vectors from different models must never be mixed",
                param="model",
            )
        if req.dimensions is not None and req.dimensions != spec.dim:
            raise ApiError(400, f"{spec.name} makes {spec.dim}-d vectors, not {req.dimensions}", param="dimensions")
        texts = [req.input] if isinstance(req.input, str) else req.input
        if not texts or len(texts) > limit or not all(texts):
            raise ApiError(400, f"input: 1 to {limit} non-empty strings", param="input")
        vectors, hits = await embed_cached(router, res, spec, texts)
        call.cache = f"{hits}/{len(texts)}"
        tokens = embedder.count_tokens(texts)
        call.usage = {"prompt_tokens": tokens}
        data = [
            {"object": "embedding", "index": i,
             "embedding": base64.b64encode(v.tobytes()).decode() if req.encoding_format == "base64" else v.tolist()}
            for i, v in enumerate(vectors)
        ]  # fmt: skip
        body = {"object": "list", "data": data, "model": spec.name, "dimensions": spec.dim,
                "revision": spec.revision, "usage": {"prompt_tokens": tokens, "total_tokens": tokens}}  # fmt: skip
        headers = {"x-fibreflow-embedding-model": spec.name, "x-fibreflow-embedding-dim": str(spec.dim),
                   "x-fibreflow-embedding-revision": spec.revision}  # fmt: skip
        return Response(
            orjson.dumps(body, option=orjson.OPT_SERIALIZE_NUMPY), 200, headers, media_type="application/json"
        )

    return api


async def embed_cached(router: Router, res: Resources, spec: Any, texts: list[str]) -> tuple[list[np.ndarray], int]:
    """Vectors for `texts`: from the cache where present (TTL embeddings.cache_ttl_s), the rest encoded now."""
    keys = ["ff:emb:" + hashlib.sha256(f"{spec.name}\0{spec.revision}\0{t}".encode()).hexdigest() for t in texts]
    raw = await router.cache.get_many(keys, "embeddings")
    found: list[np.ndarray | None] = [np.frombuffer(r, dtype=np.float32) if r is not None else None for r in raw]
    hits = sum(v is not None for v in found)
    missing = [i for i, v in enumerate(found) if v is None]
    if missing:
        fresh = await asyncio.to_thread(res.encode, [texts[i] for i in missing])
        new: dict[str, bytes] = {}
        for i, vec in zip(missing, fresh, strict=True):
            found[i] = vec
            new[keys[i]] = vec.astype(np.float32).tobytes()
        await router.cache.set_many(new, router.rc.embeddings.cache_ttl_s, "embeddings")
    return [v for v in found if v is not None], hits
