"""Configs: YAML in configs/ (the one source of defaults) -> typed pydantic models.

Overrides are dotted keys (`seed.scale=5`); errors name the key at fault.
"""

from __future__ import annotations

import functools
import os
import shutil
import tempfile
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, TypeVar

import yaml
from fibreflow.core.errors import ConfigError
from pydantic import BaseModel, ConfigDict, ValidationError

M = TypeVar("M", bound=BaseModel)


class Strict(BaseModel):
    """Base for config sections: unknown keys are errors, not silently ignored."""

    model_config = ConfigDict(extra="forbid", frozen=True)


def project_root() -> Path:
    """The project folder: $FIBREFLOW_HOME, else the checkout this package runs from, else the cwd."""
    if home := os.environ.get("FIBREFLOW_HOME"):
        return Path(home).resolve()
    checkout = Path(__file__).resolve().parents[1]
    if (checkout / "configs").is_dir():
        return checkout
    return Path.cwd()


def resolve_path(path: str | Path) -> Path:
    """Relative config paths are relative to the project root."""
    p = Path(path)
    return p if p.is_absolute() else project_root() / p


@contextmanager
def atomic_folder(dest: Path) -> Iterator[Path]:
    """A temp folder beside `dest` to write into; when the block ends without error it replaces `dest` (else it is
    removed): readers find the old folder or the whole new one, never half of one."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{dest.name}-", dir=dest.parent))
    try:
        yield tmp
        old = dest.with_name(f".{dest.name}-old-{uuid.uuid4().hex[:8]}")
        if dest.exists():
            dest.rename(old)
        tmp.rename(dest)
        shutil.rmtree(old, ignore_errors=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def atomic_write(path: Path, text: str) -> None:
    """`text` into `path` whole or not at all (a temp file beside it, then renamed over it)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex[:8]}")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


def _set_dotted(tree: dict[str, Any], dotted: str, value: Any) -> None:
    keys = dotted.split(".")
    node = tree
    for i, key in enumerate(keys[:-1]):
        child = node.get(key)
        if not isinstance(child, dict):
            raise ConfigError(f"override {dotted!r}: {'.'.join(keys[: i + 1])!r} is not a section")
        node = child
    node[keys[-1]] = value


def parse_overrides(items: list[str]) -> dict[str, Any]:
    """`["a.b=3", "c=x"]` -> `{"a.b": 3, "c": "x"}`; values are parsed as YAML scalars/lists."""
    out: dict[str, Any] = {}
    for item in items:
        key, sep, raw = item.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"override {item!r} must look like key.path=value")
        out[key.strip()] = yaml.safe_load(raw) if raw.strip() else None
    return out


def load_config(
    model: type[M], name: str, overrides: dict[str, Any] | None = None, path: str | Path | None = None
) -> M:
    """Read `configs/<name>.yaml` (or `path`), apply dotted overrides, validate into `model`."""
    file = resolve_path(path) if path else project_root() / "configs" / f"{name}.yaml"
    if not file.is_file():
        raise ConfigError(f"config file {file} not found")
    tree = yaml.safe_load(file.read_text()) or {}
    if not isinstance(tree, dict):
        raise ConfigError(f"{file}: top level must be a mapping")
    for dotted, value in (overrides or {}).items():
        _set_dotted(tree, dotted, value)
    try:
        return model.model_validate(tree)
    except ValidationError as exc:
        problems = "; ".join(
            f"{'.'.join(str(p) for p in err['loc']) or '<root>'}: {err['msg']}" for err in exc.errors()
        )
        raise ConfigError(f"{file.name}: {problems}") from None


def torch_dtype(name: str) -> Any:
    """The torch dtype of a config's name; "auto" is resolved on the machine that loads the model, so a config (and
    its hash, and a recorded quantization) means the same everywhere."""
    import torch

    if name == "auto":
        return torch.bfloat16 if bf16_is_native() else torch.float32
    return getattr(torch, name)


def dtype_name(name: str) -> str:
    """A config's dtype name with "auto" resolved on this machine ("bfloat16" or "float32")."""
    return str(torch_dtype(name)).removeprefix("torch.")


@functools.cache
def bf16_is_native() -> bool:
    """bfloat16 runs in hardware here: a CUDA device that has it, or a CPU oneDNN computes bf16 on (AVX512 / AMX).
    Elsewhere (AVX2-only CPUs) bf16 matmuls are emulated: 25-70x slower than float32 at SmolLM2's shapes."""
    import torch

    if torch.cuda.is_available():
        return bool(torch.cuda.is_bf16_supported())
    return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
