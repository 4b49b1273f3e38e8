"""The `fibreflow` command line. Commands only parse arguments and call a stage's `main`."""

from __future__ import annotations

import json
import sys
from collections.abc import Callable
from functools import wraps
from typing import Annotated, Any, TypeVar

import typer
from fibreflow.core.errors import FibreFlowError
from pydantic import BaseModel

app = typer.Typer(help="FibreFlow LLMOps: data -> fine-tune -> evaluate -> register -> serve.", no_args_is_help=True)
db_app = typer.Typer(help="The FibreFlow database: embedded server, migrations, demo data.", no_args_is_help=True)
data_app = typer.Typer(help="Versioned datasets built from the database.", no_args_is_help=True)
app.add_typer(db_app, name="db")
app.add_typer(data_app, name="data")
keys_app = typer.Typer(help="API keys of the router (stored hashed in Postgres).", no_args_is_help=True)
app.add_typer(keys_app, name="keys")
ab_app = typer.Typer(help="Live A/B tests of the router's experiments.", no_args_is_help=True)
app.add_typer(ab_app, name="ab")

F = TypeVar("F", bound=Callable[..., Any])
GATE_REFUSED = 3  # `fibreflow promote`'s exit status when the gate refuses (errors exit 2)
REGRESSED, UNMEASURED = 3, 4  # `fibreflow regress`'s exit statuses
Overrides = Annotated[list[str] | None, typer.Option("--set", help="Config override key.path=value (repeatable).")]
ReplaceData = Annotated[
    bool, typer.Option("--replace-data", help="Seed even over data the demo seed did not write (it is deleted).")
]


def friendly(fn: F) -> F:
    """Print FibreFlowError messages without a traceback and exit 2."""

    @wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except FibreFlowError as exc:
            typer.secho(f"error: {exc}", fg=typer.colors.RED, err=True)
            sys.exit(2)

    return wrapper  # type: ignore[return-value]


def _overrides(items: list[str] | None, **flags: Any) -> dict[str, Any]:
    from fibreflow.core.config import parse_overrides

    out = parse_overrides(items or [])
    out.update({k: v for k, v in flags.items() if v is not None})
    return out


def _print(obj: Any) -> None:
    def plain(o: Any) -> Any:
        return o.model_dump(mode="json") if isinstance(o, BaseModel) else str(o)

    typer.echo(json.dumps(obj, indent=2, default=plain))


@db_app.command("up")
@friendly
def db_up() -> None:
    """Start the embedded PostgreSQL + pgvector (data under the project) and print its URL."""
    from fibreflow.core.db import embedded_up, load_db_config, redact

    typer.echo(redact(embedded_up(load_db_config())))


@db_app.command("down")
@friendly
def db_down() -> None:
    """Stop the embedded database (its data stays)."""
    from fibreflow.core.db import embedded_down, load_db_config

    typer.echo("stopped" if embedded_down(load_db_config()) else "not running")


@db_app.command("status")
@friendly
def db_status() -> None:
    """Where the database is, its schema version and row counts."""
    from fibreflow.core.db import (
        connect,
        database_url,
        latest_version,
        load_db_config,
        redact,
        schema_version,
        table_counts,
    )

    cfg = load_db_config()
    url = database_url(cfg)
    with connect(url, timeout_s=cfg.connect_timeout_s) as conn:
        version = schema_version(conn)
        status: dict[str, Any] = {"url": redact(url), "schema_version": version, "latest_version": latest_version()}
        if version is not None:
            status["rows"] = table_counts(conn)
    _print(status)


@db_app.command("migrate")
@friendly
def db_migrate(set_: Overrides = None) -> None:
    """Apply pending schema migrations (idempotent)."""
    from fibreflow.core.db import migrate, open_db

    with open_db(_overrides(set_)) as conn:
        applied = migrate(conn)
    typer.echo("\n".join(f"applied {m.version:04d}_{m.name}" for m in applied) or "schema is up to date")


@db_app.command("seed")
@friendly
def db_seed(
    scale: Annotated[int | None, typer.Option(help="Size: 10 projects (~10k rows) per unit.")] = None,
    seed: Annotated[int | None, typer.Option(help="Random seed.")] = None,
    replace_data: ReplaceData = False,
    set_: Overrides = None,
) -> None:
    """Replace the data with deterministic demo FibreFlow data (COPY, one transaction). Refuses a database
    holding data the seed did not write, unless --replace-data."""
    from fibreflow.core.db import open_db
    from fibreflow.datasets.seed import load_seed_config
    from fibreflow.datasets.seed import seed as run_seed

    cfg = load_seed_config(_overrides(set_, scale=scale, seed=seed))
    with open_db() as conn:
        _print(run_seed(conn, cfg, replace_data=replace_data))


@data_app.command("build")
@friendly
def data_build(set_: Overrides = None) -> None:
    """Build the terminology, grounded-QA and accuracy-test datasets (versioned by content hash)."""
    from fibreflow.datasets.build import main

    _print(main(_overrides(set_)))


@app.command("embed")
@friendly
def embed(set_: Overrides = None) -> None:
    """Embed changed records into pgvector with the self-hosted embedding model."""
    from fibreflow.datasets.embed import main

    _print(main(_overrides(set_)))


TrainConfigPath = Annotated[
    str | None, typer.Option("--config", help="Train config YAML (default: the SmolLM2 QLoRA demo).")
]


@app.command("train")
@friendly
def train(
    config: TrainConfigPath = None,
    set_: Overrides = None,
    resume: Annotated[bool, typer.Option(help="Continue from the last complete checkpoint of this config.")] = False,
    merge: Annotated[bool, typer.Option(help="Also write a merged (LoRA folded in) model for serving.")] = False,
) -> None:
    """QLoRA fine-tune a catalogue model on a built dataset (MLflow-tracked; works under accelerate/torchrun)."""
    from fibreflow.eval.heldout import check
    from fibreflow.training.config import default_train_config
    from fibreflow.training.train import main

    overrides = _overrides(set_) | ({"merge": True} if merge else {})
    _print(main(config or default_train_config(), overrides, resume=resume, after=[check]))


@app.command("tune")
@friendly
def tune(
    config: TrainConfigPath = None,
    set_: Overrides = None,
) -> None:
    """Optuna search over a train config (space, trials, storage in configs/tune.yaml); writes the best config."""
    from fibreflow.training.tune import main

    _print(main(_overrides(set_), train_config=config))


@app.command("eval")
@friendly
def evaluate(
    test_set: Annotated[
        str | None, typer.Option("--test-set", help="JSONL test set (default: the built dataset's).")
    ] = None,
    models: Annotated[
        str | None, typer.Option("--models", help="champion[,challenger]: base, latest, run ids, models:/…, folders.")
    ] = None,
    set_: Overrides = None,
) -> None:
    """Score one model, or champion vs challenger with paired CIs and the promotion gates (MLflow-tracked)."""
    from fibreflow.eval.run import main

    specs = [m.strip() for m in models.split(",") if m.strip()] if models else None
    _print(main(_overrides(set_), test_set=test_set, models=specs))


@app.command("register")
@friendly
def register(
    run: Annotated[
        str, typer.Option(help="Training run id (or runs:/<id>/adapter); `latest` = the newest.")
    ] = "latest",
    eval_run: Annotated[str | None, typer.Option(help="The evaluation run to record with it.")] = None,
) -> None:
    """Register a training run's adapter as a new version (lineage tags, serving spec), aliased @challenger."""
    from fibreflow.registry.registry import register as run_register

    _print(run_register(run, eval_run))


@app.command("promote")
@friendly
def promote(
    force: Annotated[bool, typer.Option(help="Promote even if the gate fails (needs --reason).")] = False,
    reason: Annotated[str | None, typer.Option(help="Why (recorded with the decision).")] = None,
    eval_run: Annotated[str | None, typer.Option(help="An evaluation of this exact pair to judge again.")] = None,
    set_: Overrides = None,
) -> None:
    """Gate @challenger against @champion (first time: the base model); move @champion only if it passes.
    Exit status: 0 promoted or nothing to do, 3 the gate refused, 2 an error (CI and cron can act on it)."""
    from fibreflow.registry.registry import promote as run_promote

    out = run_promote(force=force, reason=reason, eval_overrides=_overrides(set_), eval_run_id=eval_run)
    _print(out)
    if out["decision"] == "refused":
        sys.exit(GATE_REFUSED)


@app.command("rollback")
@friendly
def rollback(
    reason: Annotated[str, typer.Option(help="Why (recorded in the alias history).")] = "",
    expected: Annotated[str | None, typer.Option(help="Only if @champion is still this version.")] = None,
) -> None:
    """Move @champion back to the version it replaced."""
    from fibreflow.registry.registry import rollback as run_rollback

    _print(run_rollback(reason=reason, expected=expected))


@app.command("main")
@friendly
def main_job(
    scale: Annotated[int | None, typer.Option(help="Demo data scale.")] = None,
    train_config: TrainConfigPath = None,
    train_set: Annotated[list[str] | None, typer.Option("--train-set", help="Train config override k=v.")] = None,
    eval_set: Annotated[list[str] | None, typer.Option("--eval-set", help="Eval config override k=v.")] = None,
    replace_data: ReplaceData = False,
) -> None:
    """The whole pipeline on embedded defaults: demo data -> datasets -> embeddings -> fine-tune -> evaluate ->
    register -> promote (one MLflow parent run; unchanged steps are reused)."""
    from fibreflow.cli.pipeline import main

    steps = main(scale, train_config=train_config, train_overrides=_overrides(train_set),
                 eval_overrides=_overrides(eval_set), replace_data=replace_data)  # fmt: skip
    report = steps.pop("report")
    _print(steps)
    typer.echo("\n" + report)


@app.command("regress")
@friendly
def regress(
    arm: Annotated[list[str] | None, typer.Option(help="Only these arms (default: monitoring.yaml's).")] = None,
    actions: Annotated[bool, typer.Option(help="Alert and roll back as the policy says (off: measure only).")] = True,
    set_: Overrides = None,
) -> None:
    """The frozen regression suite through the live router, per arm, against the offline evaluation of the version
    it serves: ok | regressed | unmeasured, alerts and rollback per configs/monitoring.yaml.
    Exit status: 0 every arm ok, 3 one regressed, 4 one unmeasured (none regressed), 2 an error."""
    from fibreflow.monitor.regress import dumps, main

    results = main(_overrides(set_), arms=arm, actions=actions)
    typer.echo(dumps(results))
    statuses = {r.status for r in results}
    if "regressed" in statuses:
        sys.exit(REGRESSED)
    if "unmeasured" in statuses:
        sys.exit(UNMEASURED)


@app.command("freeze-suite")
@friendly
def freeze_suite(
    eval_run: Annotated[str | None, typer.Option(help="The evaluation to take (default: @champion's).")] = None,
    set_: Overrides = None,
) -> None:
    """Write the regression suite from an evaluation's rows; prints its sha256 to pin in configs/monitoring.yaml."""
    from fibreflow.core.tracking import setup_mlflow
    from fibreflow.monitor.config import load_monitoring_config
    from fibreflow.monitor.regress import freeze

    cfg = load_monitoring_config(_overrides(set_))
    setup_mlflow(cfg.experiment)
    path, sha = freeze(cfg, eval_run)
    _print({"suite": str(path), "sha256": sha})


@app.command("monitor")
@friendly
def monitor(set_: Overrides = None) -> None:
    """Run `regress` on the cron schedule in configs/monitoring.yaml and soon after every alias move, one run at a
    time, until SIGTERM; its Prometheus gauges on schedule.metrics_listen."""
    from fibreflow.monitor.scheduler import main

    main(_overrides(set_))


@app.command("capacity")
@friendly
def capacity(
    endpoint: Annotated[
        list[str] | None,
        typer.Option(
            help="NAME=BASE_URL[@MODEL] (repeatable): these endpoints instead of capacity.yaml's, side by side."
        ),
    ] = None,
    concurrency: Annotated[str | None, typer.Option(help="Comma-separated users per step, e.g. 1,2,4,8.")] = None,
    duration: Annotated[float | None, typer.Option(help="Seconds per step.")] = None,
    plan_only: Annotated[bool, typer.Option(help="Costs and the VRAM plan only: drive no endpoint.")] = False,
    json_: Annotated[bool, typer.Option("--json", help="Machine-readable: every step, cost and fit.")] = False,
    set_: Overrides = None,
) -> None:
    """Concurrent users held at p95 < target by OpenAI-compatible endpoints (the router, vLLM, the model server),
    tokens/s and time to first token per step; the seed's phases costed against API prices; which hardware fits the
    models (configs/capacity.yaml). One MLflow run with a plot."""
    from fibreflow.monitor.capacity import main, render

    extra: dict[str, Any] = {}
    if endpoint:
        eps = []
        for spec in endpoint:
            name, sep, rest = spec.partition("=")
            url, _, model = rest.partition("@")
            if not sep or not name or not url:
                raise typer.BadParameter(f"{spec!r}: NAME=BASE_URL[@MODEL]", param_hint="--endpoint")
            eps.append({"name": name, "base_url": url, "model": model or "fibreflow-assistant"})
        extra["endpoints"] = eps
    if concurrency:
        extra["load.concurrency"] = [int(c) for c in concurrency.split(",") if c.strip()]
    report = main(_overrides(set_, **extra, **{"load.duration_s": duration}), plan_only=plan_only)
    typer.echo(json.dumps(report.summary(), indent=2) if json_ else render(report))


@app.command("trace")
@friendly
def trace(
    what: Annotated[str, typer.Argument(help="A response id (chatcmpl-...) or a model version (3, v3, @champion).")],
    json_: Annotated[bool, typer.Option("--json", help="Machine-readable: every hop in full.")] = False,
) -> None:
    """Walk the lineage: audit row -> registered version -> training run -> dataset manifest -> the evaluation that
    promoted it -> later regression runs, with a link for each in the MLflow UI."""
    import os

    from fibreflow.monitor.trace import render, trace

    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")  # a few small reads: no bars
    found = trace(what)
    typer.echo(found.model_dump_json(indent=2) if json_ else render(found))


@ab_app.command("report")
@friendly
def ab_report(
    experiment: Annotated[str | None, typer.Option(help="The model clients ask for (default: the first).")] = None,
    since: Annotated[str, typer.Option(help="Window start: an ISO time or a span back (7d, 12h).")] = "30d",
    control: Annotated[str | None, typer.Option(help="The arm others are compared with (default: champion).")] = None,
    promote: Annotated[bool, typer.Option(help="Promote a live winner through the offline gate.")] = False,
    json_: Annotated[bool, typer.Option("--json", help="Machine-readable.")] = False,
    set_: Overrides = None,
) -> None:
    """Per arm: feedback score, thumbs-up rate, error rate, p95 latency and shadow similarity with CIs; the
    sequential test's decision (winner / no difference yet / stop: futility) and the false-winner rate it controls.
    Logged to MLflow (fibreflow-ab) with a plot per arm over time."""
    from fibreflow.monitor.ab import main, render

    out = main(experiment, _since(since), control=control, promote=promote, overrides=_overrides(set_))
    typer.echo(out.model_dump_json(indent=2) if json_ else render(out))


def _since(text: str) -> Any:
    import datetime as dt
    import re

    from fibreflow.core.errors import ConfigError

    if m := re.fullmatch(r"(\d+)([dhm])", text.strip()):
        unit = {"d": "days", "h": "hours", "m": "minutes"}[m[2]]
        return dt.datetime.now(dt.UTC) - dt.timedelta(**{unit: int(m[1])})
    try:
        when = dt.datetime.fromisoformat(text)
    except ValueError:
        raise ConfigError(f"--since {text!r}: give an ISO time (2026-11-30T08:00) or a span (7d, 12h, 30m)") from None
    return when if when.tzinfo else when.replace(tzinfo=dt.UTC)


@app.command("serve-model")
@friendly
def serve_model(
    model: Annotated[str | None, typer.Option(help="Base model: catalogue name or folder (default: config).")] = None,
    lora: Annotated[list[str] | None, typer.Option(help="Also serve an adapter: name=folder (repeatable).")] = None,
    registry: Annotated[bool, typer.Option(help="Load the registry aliases' adapters (config).")] = True,
    set_: Overrides = None,
) -> None:
    """The local OpenAI-compatible model server (CPU upstream): one base, several LoRA adapters, batching."""
    from fibreflow.core.config import parse_overrides
    from fibreflow.serving.config import load_serving_config
    from fibreflow.serving.model_server import serve_model as run_serve_model

    loras = {k: str(v) for k, v in parse_overrides(lora or []).items()}
    run_serve_model(load_serving_config(_overrides(set_)), model, loras, registry)


@app.command("serve")
@friendly
def serve(
    backend: Annotated[str, typer.Option(help="Upstream to start first: local (model server), vllm, none.")] = "local",
    upstream_url: Annotated[str | None, typer.Option(help="Use this running upstream (…/v1) instead.")] = None,
    dry_run: Annotated[bool, typer.Option(help="With --backend vllm: print its command line, start nothing.")] = False,
    set_: Overrides = None,
) -> None:
    """The OpenAI-compatible A/B router (configs/serving.yaml `router`); REDIS_URL backs its cache and limits."""
    from fibreflow.core.errors import ConfigError
    from fibreflow.serving.config import load_serving_config
    from fibreflow.serving.launch import serve as run_serve

    if backend not in ("local", "vllm", "none"):
        raise ConfigError(f"--backend must be local, vllm or none, not {backend!r}")
    run_serve(load_serving_config(_overrides(set_)), backend, upstream_url, dry_run)  # type: ignore[arg-type]


@keys_app.command("create")
@friendly
def keys_create(
    name: Annotated[str, typer.Option(help="Who or what uses it (shown in listings and audit).")],
    scopes: Annotated[str, typer.Option(help="Comma-separated: chat, admin, qa (forces an arm), metrics.")] = "chat",
    expires_days: Annotated[float | None, typer.Option(help="Expire after this many days.")] = None,
    rpm: Annotated[int | None, typer.Option(help="Own requests-per-minute limit (else the config's).")] = None,
    tpm: Annotated[int | None, typer.Option(help="Own tokens-per-minute limit (else the config's).")] = None,
) -> None:
    """Create a key; it is printed once (only its hash is stored)."""
    import datetime as dt

    from fibreflow.serving import keys

    expires = dt.timedelta(days=expires_days) if expires_days else None
    with keys.open_keys_db() as conn:
        key, record = keys.create(
            conn,
            name,
            [s.strip() for s in scopes.split(",") if s.strip()],
            expires_in=expires,
            requests_per_minute=rpm,
            tokens_per_minute=tpm,
        )
    _print({"key": key, "id": record.id, "scopes": list(record.scopes), "expires_at": record.expires_at})


@keys_app.command("rotate")
@friendly
def keys_rotate(
    key_id: Annotated[str, typer.Argument(help="The key to replace (ffk_...).")],
    overlap_hours: Annotated[float, typer.Option(help="How long the old key keeps working.")] = 24.0,
) -> None:
    """A new key with the same name, scopes and limits; the old one works for the overlap window, then expires."""
    import datetime as dt

    from fibreflow.serving import keys

    with keys.open_keys_db() as conn:
        key, record = keys.rotate(conn, key_id, dt.timedelta(hours=overlap_hours))
    _print({"key": key, "id": record.id, "replaces": key_id, "old_key_works_for_hours": overlap_hours})


@keys_app.command("revoke")
@friendly
def keys_revoke(key_id: Annotated[str, typer.Argument(help="The key to revoke (ffk_...).")]) -> None:
    """Revoke a key now (routers stop accepting it within auth.cache_s seconds)."""
    from fibreflow.serving import keys

    with keys.open_keys_db() as conn:
        keys.revoke(conn, key_id)
    typer.echo(f"revoked {key_id}")


@keys_app.command("list")
@friendly
def keys_list() -> None:
    """Every key (never its secret or hash)."""
    from fibreflow.serving import keys

    with keys.open_keys_db() as conn:
        _print(keys.listing(conn))


if __name__ == "__main__":
    app()
