"""Model registry: register a trained adapter with its lineage, promote it through the gates, roll back.

Aliases are the source of truth: `@challenger` is the newest registered candidate, `@champion` what serving
uses. A promotion changes exactly one thing, the `@champion` alias, in one MLflow call; everything written
before it (the candidate's `previous_champion` tag) means nothing until the alias moves, and everything written
after it (the decision record, the alias history) is a record. An interrupted promotion therefore leaves the
aliases fully old or fully new.
"""

from __future__ import annotations

import datetime as dt
import json
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from fibreflow.core.config import Strict, load_config
from fibreflow.core.errors import FibreFlowError
from fibreflow.eval.summary import EvalSummary
from fibreflow.registry.spec import TAG as SPEC_TAG
from fibreflow.registry.spec import ServingSpec, write_spec
from fibreflow.registry.watch import UNSET
from pydantic import Field

HISTORY_TAG = "alias_history"  # registered-model tag: the last HISTORY_KEEP alias moves, newest last
HISTORY_KEEP = 40
LOCK_WAIT_S = 30.0  # how long a promotion or rollback waits for one already under way


class RegistryError(FibreFlowError):
    """A registry operation that cannot go ahead as asked."""


class RegistryConfig(Strict):
    name: str = "fibreflow-assistant"
    experiment: str = "fibreflow-registry"
    headline_metrics: list[str] = Field(default_factory=list)


def load_registry_config(overrides: dict[str, Any] | None = None) -> RegistryConfig:
    return load_config(RegistryConfig, "registry", overrides)


def _client() -> Any:
    import mlflow

    return mlflow.MlflowClient()


def serving_spec(run: Any, version: str, name: str) -> ServingSpec:
    """What the serving layer needs to run this version: base, adapter, quantization, context, chat template."""
    from fibreflow.training.config import load_catalogue
    from fibreflow.training.models import load_tokenizer
    from fibreflow.training.weights import weights

    tags, params = run.data.tags, run.data.params
    catalogue = load_catalogue()
    entry = catalogue.models.get(tags.get("base_model", ""))
    trained = weights(f"runs:/{run.info.run_id}/adapter")
    return ServingSpec(
        registered_model=name,
        version=version,
        base_model=tags.get("base_model"),
        base_model_path=trained.base,
        adapter_uri=f"models:/{name}/{version}",
        merged_model_path=tags.get("merged_model_path"),
        quantization=trained.quantization,
        max_context=entry.max_context if entry else None,
        max_new_tokens=catalogue.generation.max_new_tokens,
        chat_template=load_tokenizer(trained.base).chat_template,
        dtype=params.get("dtype"),
    )


def register(
    source: str = "latest", eval_run_id: str | None = None, cfg: RegistryConfig | None = None
) -> dict[str, Any]:
    """A training run's adapter -> a new version with lineage tags and a serving spec, aliased `@challenger`."""
    import mlflow
    from fibreflow.core.tracking import setup_mlflow
    from fibreflow.training.weights import RUN_ID, latest_run

    cfg = cfg or load_registry_config()
    setup_mlflow(cfg.experiment)
    run_id = latest_run() if source == "latest" else source.removeprefix("runs:/").split("/")[0]
    if not RUN_ID.match(run_id):
        raise RegistryError(f"register: {source!r} is not a training run id, runs:/<id>/adapter or `latest`")
    client = _client()
    try:
        run = client.get_run(run_id)
    except mlflow.exceptions.MlflowException:
        raise RegistryError(f"register: no run {run_id} in {mlflow.get_tracking_uri()}") from None
    if "config_hash" not in run.data.tags:
        raise RegistryError(f"register: run {run_id} is not a `fibreflow train` run (no config_hash tag)")
    found = client.search_model_versions(f"name = '{cfg.name}' and run_id = '{run_id}'")
    if found and found[0].tags.get("training_run_id"):  # registered before: no second version, no alias move
        return {"name": cfg.name, "version": str(found[0].version), "reused": True}
    # a registration interrupted before its tags (the last step) is completed rather than duplicated
    mv = found[0] if found else mlflow.register_model(f"runs:/{run_id}/adapter", cfg.name)
    spec = serving_spec(run, str(mv.version), cfg.name)
    spec_uri = write_spec(client, run_id, spec)  # with the training run that made the weights
    tags = {
        "dataset_version": run.data.tags.get("dataset_version", ""),
        "base_model": run.data.tags.get("base_model", ""),
        "config_hash": run.data.tags["config_hash"],
        "git_sha": run.data.tags.get("git_sha", ""),
        SPEC_TAG: spec_uri,
        "quantization": spec.quantization.quant_type if spec.quantization else "none",
    }
    tags |= {f"metric.{k}": f"{run.data.metrics[k]:.4f}" for k in cfg.headline_metrics if k in run.data.metrics}
    if eval_run_id:
        tags["eval_run_id"] = eval_run_id
    for k, v in tags.items():  # the lineage first: @challenger never names a version without it
        client.set_model_version_tag(cfg.name, mv.version, k, v)
    client.set_registered_model_alias(cfg.name, "challenger", mv.version)
    _append_history(cfg.name, "challenger", str(mv.version), "registered")
    client.set_model_version_tag(cfg.name, mv.version, "training_run_id", run_id)  # marks the registration complete
    tags["training_run_id"] = run_id
    return {"name": cfg.name, "version": str(mv.version), "alias": "challenger", "tags": tags, "reused": False}


def _alias(name: str, alias: str) -> Any | None:
    """The version `alias` names, None when it is unset; a registry that cannot be read is an error (never taken
    for "unset": a promotion would then judge against the base model and move @champion)."""
    import mlflow

    try:
        return _client().get_model_version_by_alias(name, alias)
    except mlflow.exceptions.MlflowException as exc:
        if exc.error_code in UNSET:
            return None
        raise RegistryError(f"the registry could not be read ({str(exc).splitlines()[0][:200]}); try again") from None


def _exclusive(name: str) -> Any:
    """One promotion or rollback of `name` at a time, across processes and machines: a Postgres advisory lock on
    the project database (released by the server if the holder is killed)."""
    from fibreflow.core.db import advisory_lock, open_db

    @contextmanager
    def held() -> Iterator[None]:
        with open_db() as conn, advisory_lock(conn, f"fibreflow-registry:{name}", LOCK_WAIT_S,
                                              f"a promotion or rollback of {name}"):  # fmt: skip
            yield

    return held()


def _version(mv: Any | None) -> str | None:
    return str(mv.version) if mv is not None else None


def _append_history(name: str, alias: str, version: str, action: str, **extra: str) -> None:
    client = _client()
    model = client.get_registered_model(name)
    history = json.loads(model.tags.get(HISTORY_TAG, "[]"))
    at = dt.datetime.now(dt.UTC).isoformat(timespec="seconds")
    history.append({"alias": alias, "version": version, "action": action, "at": at, **extra})
    client.set_registered_model_tag(name, HISTORY_TAG, json.dumps(history[-HISTORY_KEEP:]))


def history(cfg: RegistryConfig | None = None) -> list[dict[str, str]]:
    cfg = cfg or load_registry_config()
    return json.loads(_client().get_registered_model(cfg.name).tags.get(HISTORY_TAG, "[]"))


def promote(
    *,
    force: bool = False,
    reason: str | None = None,
    eval_overrides: dict[str, Any] | None = None,
    eval_run_id: str | None = None,
    expected: str | None = None,
    cfg: RegistryConfig | None = None,
) -> dict[str, Any]:
    """Gate `@challenger` against `@champion` (the first time: against the base model) and move `@champion` only
    if the gate passes, or if forced with a reason. The decision is an MLflow run and tags on the version.
    `eval_run_id` (default: the version's `eval_run_id` tag): an evaluation of exactly this pair, judged again
    with the current gates instead of evaluating again. `expected`: refuse unless @challenger is that version (a
    caller that chose it, e.g. a live A/B test, never promotes a version moved in after its choice).

    One promotion or rollback at a time (`_exclusive`); @champion is compared before it is moved (a move made
    meanwhile by anyone else refuses this one); a version rolled back before is promoted again only by force."""
    from fibreflow.core.tracking import setup_mlflow

    cfg = cfg or load_registry_config()
    if force and not (reason and reason.strip()):
        raise RegistryError('promote --force needs --reason "…" (it is recorded with the decision)')
    setup_mlflow(cfg.experiment)
    with _exclusive(cfg.name):
        challenger = _alias(cfg.name, "challenger")
        if challenger is None:
            raise RegistryError(f"{cfg.name} has no @challenger: run `fibreflow register` first")
        if expected is not None and str(challenger.version) != str(expected):
            raise RegistryError(f"@challenger is v{challenger.version}, not v{expected} as expected: nothing was "
                                "changed")  # fmt: skip
        champion = _alias(cfg.name, "champion")
        if champion is not None and champion.version == challenger.version:
            reasons = ["@challenger is already @champion"]
            return {"promoted": False, "decision": "unchanged", "version": str(champion.version), "reasons": reasons}
        if (why := challenger.tags.get("rolled_back")) is not None and not force:
            raise RegistryError(f"{cfg.name} v{challenger.version} was rolled back ({why}); promote it again only with "
                                '--force --reason "…"')  # fmt: skip
        return _promote(cfg, challenger, champion, force, reason, eval_overrides, eval_run_id)


def _promote(
    cfg: RegistryConfig,
    challenger: Any,
    champion: Any | None,
    force: bool,
    reason: str | None,
    eval_overrides: dict[str, Any] | None,
    eval_run_id: str | None,
) -> dict[str, Any]:
    import mlflow
    from fibreflow.eval.gates import decide, load_gates
    from fibreflow.eval.run import main as evaluate

    against = f"models:/{cfg.name}/{champion.version}" if champion else "base"
    # the first time: against the base model the challenger was trained from
    eval_overrides = (eval_overrides or {}) | ({} if champion else {"base_model": challenger.tags["base_model"]})
    version, nested = str(challenger.version), mlflow.active_run() is not None
    with mlflow.start_run(run_name=f"promote-v{version}", nested=nested) as run:
        summary = _same_pair(eval_run_id or challenger.tags.get("eval_run_id"), champion, challenger)
        if summary is None:
            summary = evaluate(eval_overrides, models=[against, f"models:/{cfg.name}/{version}"], progress=False)
        gate = decide(load_gates(), summary.diffs())
        decision = "passed" if gate.passed else ("forced" if force else "refused")
        promoted = gate.passed or force
        mlflow.set_tags({"decision": decision, "challenger_version": version,
                         "champion_version": _version(champion) or "base",
                         "eval_run_id": summary.run_id} | ({"force_reason": reason} if force else {}))  # fmt: skip
        mlflow.log_dict({"passed": gate.passed, "reasons": gate.reasons, "decision": decision, "reason": reason},
                        "promotion/decision.json")  # fmt: skip
        client = _client()
        if promoted:
            now = _alias(cfg.name, "champion")
            if _version(now) != _version(champion):  # compare, then set: someone moved it while we evaluated
                raise RegistryError(f"@champion moved from v{_version(champion)} to v{_version(now)} while v{version} "
                                    "was being judged; nothing was changed: run the promotion again")  # fmt: skip
            client.set_model_version_tag(cfg.name, version, "previous_champion", _version(champion) or "")  # inert
            client.set_registered_model_alias(cfg.name, "champion", version)  # the one atomic switch
        record = {"decision": decision, "decision_run_id": run.info.run_id, "eval_run_id": summary.run_id,
                  "reasons": " | ".join(gate.reasons)[:4000]}  # fmt: skip
        if force:
            record["force_reason"] = reason or ""
        for k, v in record.items():
            client.set_model_version_tag(cfg.name, version, f"promotion.{k}", v)
        if promoted:
            _append_history(cfg.name, "champion", version, decision, run_id=run.info.run_id)
    return {
        "promoted": promoted,
        "decision": decision,
        "version": version,
        "previous_champion": _version(champion),
        "reasons": gate.reasons,
        "decision_run_id": run.info.run_id,
        "eval_run_id": summary.run_id,
    }


def _same_pair(eval_run_id: str | None, champion: Any | None, challenger: Any) -> EvalSummary | None:
    """The summary of an earlier evaluation of exactly this champion (or the challenger's base) vs the
    challenger's weights, or None."""
    import mlflow
    from fibreflow.eval.summary import load_summary

    if not eval_run_id:
        return None
    try:
        tags = mlflow.get_run(eval_run_id).data.tags
    except mlflow.exceptions.MlflowException:
        return None
    if tags.get("challenger.run_id") != challenger.run_id:
        return None
    if champion is None:
        ok = tags.get("champion.kind") == "base" and tags.get("champion.base_model") == challenger.tags["base_model"]
    else:
        ok = tags.get("champion.run_id") == champion.run_id
    if not ok:
        return None
    return load_summary(eval_run_id)


def rollback(cfg: RegistryConfig | None = None, reason: str = "", expected: str | None = None) -> dict[str, Any]:
    """Move `@champion` back to the version it replaced (kept in the version's `previous_champion` tag), under the
    same lock as promotions; with `expected`, only if @champion still names that version (a monitor rolling back
    what it measured, not whatever was promoted since)."""
    from fibreflow.core.tracking import setup_mlflow

    cfg = cfg or load_registry_config()
    setup_mlflow(cfg.experiment)
    with _exclusive(cfg.name):
        current = _alias(cfg.name, "champion")
        if current is None:
            raise RegistryError(f"{cfg.name} has no @champion to roll back")
        if expected is not None and str(current.version) != expected:
            raise RegistryError(f"@champion is v{current.version}, no longer v{expected}: nothing was rolled back")
        previous = current.tags.get("previous_champion", "")
        if not previous:
            raise RegistryError(
                f"{cfg.name} v{current.version} was the first champion: there is nothing to roll back to"
            )
        client = _client()
        client.set_registered_model_alias(cfg.name, "champion", previous)  # the one atomic switch
        client.set_model_version_tag(cfg.name, current.version, "rolled_back", reason or "yes")
        _append_history(cfg.name, "champion", previous, "rollback", **{"from": str(current.version), "reason": reason})
    return {"champion": previous, "was": str(current.version)}
