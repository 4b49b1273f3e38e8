"""`POST /v1/embeddings`: the self-hosted embedding model behind the OpenAI API, with a per-text cache (one
round trip for all of a request's texts) and its name, revision and dimension reported, so clients never mix
vector spaces; another model's name is refused. Tokens are those the model read (the texts not found in the cache),
counted against the key's token limit like any other call.

The model runs in the router's process (`embeddings.model`), or on an upstream (`embeddings.upstream`: the model
server's `/v1/embeddings`, a dedicated embedding server, vLLM) through `RemoteEmbedder`, so that a router installed
with the `serve` extra needs no torch; either way its identity is checked against the vectors in pgvector.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import numpy as np
import orjson
from fastapi import APIRouter
from fastapi.responses import Response
from fibreflow.core.errors import ConfigError, FibreFlowError
from fibreflow.datasets.embedding import BUNDLED_NAME, EmbeddingSpec
from fibreflow.serving.config import Upstream
from fibreflow.serving.guard import CurrentCall, guarded
from fibreflow.serving.protocol import ApiError
from fibreflow.serving.upstream import auth_headers
from pydantic import BaseModel, ConfigDict, Field

if TYPE_CHECKING:
    from fibreflow.serving.fibreflow_api import Resources
    from fibreflow.serving.router import Router


class EmbeddingsUnavailable(FibreFlowError):
    """The embeddings upstream did not answer, or answered something that is not embeddings of the texts sent."""


class RemoteEmbedder:
    """An embedding model on an upstream's OpenAI `/v1/embeddings`. Its identity is the configured model name, the
    revision the upstream reports (this project's model server does) or else the configured one, and the dimension
    of the vectors it returns: checked against pgvector's records like the in-process model's."""

    def __init__(self, upstream: Upstream, model: str, revision: str | None = None) -> None:
        import httpx

        # named as the in-process model names itself: `bundled` is all-MiniLM-L6-v2, a folder its folder's name
        self.url, self.model = upstream.url.rstrip("/"), BUNDLED_NAME if model == "bundled" else Path(model).name
        self._client = httpx.Client(headers=auth_headers(upstream), timeout=upstream.timeout_s)
        vectors, _, body = self._call(["dimension probe"])
        rev = body.get("revision") or revision
        if not rev:
            raise ConfigError(
                f"router.embeddings.revision: {self.url} does not say which revision of {model} it serves; set the "
                "revision the records were embedded with (fibreflow embed records it in embedding_indexes)"
            )
        self.spec = EmbeddingSpec(self.model, str(rev), int(vectors.shape[1]))

    def embed(self, texts: list[str]) -> tuple[np.ndarray, int]:
        """L2-normalised vectors (cosine distance = 1 - dot, as in pgvector) and the tokens the upstream counted."""
        vectors, tokens, _ = self._call(texts)
        return vectors, tokens

    def encode(self, texts: list[str]) -> np.ndarray:
        return self.embed(texts)[0]

    def _call(self, texts: list[str]) -> tuple[np.ndarray, int, dict[str, Any]]:
        import httpx

        body = {"model": self.model, "input": texts, "encoding_format": "float"}
        try:
            resp = self._client.post(f"{self.url}/embeddings", json=body)
        except httpx.HTTPError as exc:
            raise EmbeddingsUnavailable(f"embeddings upstream {self.url} unreachable ({type(exc).__name__})") from None
        if resp.status_code != 200:
            raise EmbeddingsUnavailable(
                f"embeddings upstream {self.url} answered {resp.status_code}: {resp.text[:300]}"
            )
        try:
            out = resp.json()
            rows = sorted(out["data"], key=lambda d: d["index"])
            vectors = np.asarray([r["embedding"] for r in rows], dtype=np.float32)
        except (ValueError, KeyError, TypeError) as exc:
            raise EmbeddingsUnavailable(f"embeddings upstream {self.url}: not an embeddings answer ({exc})") from None
        if vectors.ndim != 2 or len(vectors) != len(texts):
            raise EmbeddingsUnavailable(
                f"embeddings upstream {self.url}: {len(vectors)} vectors for {len(texts)} texts"
            )
        vectors /= np.maximum(np.linalg.norm(vectors, axis=1, keepdims=True), 1e-12)
        return vectors, int((out.get("usage") or {}).get("prompt_tokens") or 0), out


def embeddings_response(spec: EmbeddingSpec, vectors: list[np.ndarray], tokens: int, fmt: str) -> Response:
    """The OpenAI answer, with the model's revision and dimension (in the body and as headers)."""
    data = [
        {"object": "embedding", "index": i,
         "embedding": base64.b64encode(v.tobytes()).decode() if fmt == "base64" else v.tolist()}
        for i, v in enumerate(vectors)
    ]  # fmt: skip
    body = {"object": "list", "data": data, "model": spec.name, "dimensions": spec.dim,
            "revision": spec.revision, "usage": {"prompt_tokens": tokens, "total_tokens": tokens}}  # fmt: skip
    headers = {"x-fibreflow-embedding-model": spec.name, "x-fibreflow-embedding-dim": str(spec.dim),
               "x-fibreflow-embedding-revision": spec.revision}  # fmt: skip
    return Response(orjson.dumps(body, option=orjson.OPT_SERIALIZE_NUMPY), 200, headers, media_type="application/json")


def check_request(req: EmbeddingsRequest, spec: EmbeddingSpec, limit: int) -> list[str]:
    """The texts of a request for `spec`'s model; another model, dimension or a bad input is refused."""
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
    return texts


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
        texts = check_request(req, spec, limit)
        vectors, hits, tokens = await embed_cached(router, res, spec, texts)
        call.cache = f"{hits}/{len(texts)}"
        call.usage = {"prompt_tokens": tokens}
        return embeddings_response(spec, vectors, tokens, req.encoding_format)

    return api


async def embed_cached(
    router: Router, res: Resources, spec: Any, texts: list[str]
) -> tuple[list[np.ndarray], int, int]:
    """Vectors for `texts`: from the cache where present (TTL embeddings.cache_ttl_s), the rest encoded now; with
    the cache hits and the tokens the model read."""
    keys = ["ff:emb:" + hashlib.sha256(f"{spec.name}\0{spec.revision}\0{t}".encode()).hexdigest() for t in texts]
    raw = await router.cache.get_many(keys, "embeddings")
    found: list[np.ndarray | None] = [np.frombuffer(r, dtype=np.float32) if r is not None else None for r in raw]
    hits = sum(v is not None for v in found)
    missing = [i for i, v in enumerate(found) if v is None]
    tokens = 0
    if missing:
        fresh, tokens = await asyncio.to_thread(res.embed, [texts[i] for i in missing])
        new: dict[str, bytes] = {}
        for i, vec in zip(missing, fresh, strict=True):
            found[i] = vec
            new[keys[i]] = vec.astype(np.float32).tobytes()
        await router.cache.set_many(new, router.rc.embeddings.cache_ttl_s, "embeddings")
    return [v for v in found if v is not None], hits, tokens
