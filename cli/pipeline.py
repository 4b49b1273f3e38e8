"""The main job on embedded defaults, as one MLflow parent run with a child run per stage:

seed the demo database -> build datasets -> embed -> QLoRA fine-tune -> evaluate base vs fine-tuned -> register
-> promote, ending with a short report. A second run reuses what has not changed: the seed (same config), the
dataset folder (same content), embeddings (only changed records), the training run (same config hash and dataset
version), the evaluation (same models, test set and config), the registered version (same training run) and
the promotion's evaluation.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable
from typing import Any

from fibreflow.core.db import migrate, open_db
from fibreflow.datasets.seed import load_seed_config, seed

EXPERIMENT = "fibreflow-pipeline"


def seed_step(scale: int | None, progress: bool, replace_data: bool = False) -> dict[str, Any]:
    seed_cfg = load_seed_config({"scale": scale} if scale is not None else None)
    with open_db() as conn:
        out: dict[str, Any] = {"migrate": [f"{m.version:04d}_{m.name}" for m in migrate(conn)] or "up to date"}
        # Reseeding is skipped when the data already came from this exact seed config.
        current = conn.execute("SELECT value FROM fibreflow_meta WHERE key = 'data_source'").fetchone()
        wanted = {"source": "demo-seed", **json.loads(seed_cfg.model_dump_json())}
        if current and all(current[0].get(k) == v for k, v in wanted.items()):
            return out | {"reused": True, "rows": current[0]["rows"]}
        return out | {"reused": False, "rows": seed(conn, seed_cfg, progress=progress, replace_data=replace_data)}


def train_step(config: str | None, overrides: dict[str, Any] | None, progress: bool) -> dict[str, Any]:
    """The finished training run of this config hash on this dataset version, or a new one. Without the training's
    held-out check (unless `overrides` ask for it): the evaluation next asks the same held-out phrasings."""
    from fibreflow.core.tracking import newest_finished_run
    from fibreflow.datasets.build import version_dir
    from fibreflow.datasets.config import load_data_config
    from fibreflow.eval.heldout import check
    from fibreflow.training.config import default_train_config, load_train_config
    from fibreflow.training.train import main as train

    path = config or str(default_train_config())
    overrides = {"heldout.enabled": False} | (overrides or {})
    cfg = load_train_config(path, overrides)
    version = version_dir(load_data_config(), cfg.data.version).name
    found = newest_finished_run(f"tags.config_hash = '{cfg.config_hash()}' and tags.dataset_version = '{version}'")
    if found is not None:
        metrics = {k: v for k, v in found.data.metrics.items() if k.startswith("heldout_")}
        return {"reused": True, "run_id": found.info.run_id, "model": cfg.model, "heldout": metrics}
    return {"reused": False, "model": cfg.model} | train(path, overrides, progress=progress, after=[check])


def _child(name: str, fn: Callable[[], dict[str, Any]]) -> dict[str, Any]:
    """A stage without its own tracking, as a child run: its result as an artifact, its timing as a metric."""
    import mlflow

    with mlflow.start_run(run_name=name, nested=True):
        start = time.perf_counter()
        out = fn()
        mlflow.log_metric("wall_s", time.perf_counter() - start)
        mlflow.log_dict(out, f"{name}.json")
        mlflow.set_tag("reused", str(out.get("reused", False)).lower())
    return out


def main(
    scale: int | None = None,
    *,
    train_config: str | None = None,
    train_overrides: dict[str, Any] | None = None,
    eval_overrides: dict[str, Any] | None = None,
    progress: bool = True,
    replace_data: bool = False,
) -> dict[str, Any]:
    import mlflow
    from fibreflow.core.tracking import setup_mlflow
    from fibreflow.datasets import build, embed
    from fibreflow.eval.run import main as evaluate
    from fibreflow.registry.registry import promote, register

    t0 = time.perf_counter()
    setup_mlflow(EXPERIMENT)
    parent = os.environ.pop("MLFLOW_RUN_ID", None)  # `mlflow run .` made the parent run: the stages nest in it
    steps: dict[str, Any] = {}
    with mlflow.start_run(run_id=parent, run_name=None if parent else "pipeline") as run:
        steps["seed"] = _child("seed", lambda: seed_step(scale, progress, replace_data))
        steps["build_dataset"] = _child("build_dataset", lambda: build.main(progress=progress))
        steps["embed"] = _child("embed", lambda: embed.main(progress=progress))
        trained = steps["train"] = train_step(train_config, train_overrides, progress)
        overrides = (eval_overrides or {}) | {"base_model": trained["model"]}
        evaluated = steps["evaluate"] = evaluate(
            overrides, models=["base", trained["run_id"]], progress=progress, reuse=True
        )
        steps["register"] = register(trained["run_id"], eval_run_id=evaluated.run_id)
        steps["promote"] = promote(eval_run_id=evaluated.run_id, eval_overrides=eval_overrides)
        steps["wall_s"] = round(time.perf_counter() - t0, 1)
        steps["report"] = report(steps)
        mlflow.log_metric("wall_s", steps["wall_s"])
        mlflow.log_text(steps["report"], "pipeline/report.md")
        steps["run_id"] = run.info.run_id
    return steps


def report(steps: dict[str, Any]) -> str:
    """What was promoted and why, in a few lines."""
    t, e, r, p = steps["train"], steps["evaluate"], steps["register"], steps["promote"]
    lines = [f"FibreFlow main job: {steps['wall_s'] / 60:.1f} min"]
    lines.append(
        f"- data: dataset {steps['build_dataset']['version']}, seed {'reused' if steps['seed']['reused'] else 'new'}"
    )
    lines.append(f"- train: run {t['run_id']} ({'reused' if t['reused'] else 'trained now'})")
    how = "reused" if e.reused else f"run {e.run_id}"
    lines.append(f"- evaluate: base vs fine-tuned on {e.samples} questions ({how})")
    for k, d in e.diff.items():
        if k in (
            "accuracy",
            "terminology_accuracy",
            "unknown_term_refusal",
            "semantic_similarity",
            "tool_call_accuracy",
            "tool_grounded_accuracy",
            "refusal_accuracy",
            "numbers_grounded",
            "model_numbers_grounded",
        ):
            a, b = e.scores["champion"][k], e.scores["challenger"][k]
            lines.append(f"    {k}: {a:.3f} -> {b:.3f} ({d.diff:+.3f}, 95% CI {d.ci_low:+.3f} .. {d.ci_high:+.3f})")
    lines.append(f"- register: {r['name']} v{r['version']}{' (already registered)' if r['reused'] else ''}")
    verdict = {"passed": "PROMOTED: gate passed", "forced": "PROMOTED (forced)", "refused": "NOT promoted: gate failed",
               "unchanged": "already @champion"}[p["decision"]]  # fmt: skip
    lines.append(f"- promote v{p['version']}: {verdict}")
    lines += [f"    {reason}" for reason in p["reasons"]]
    return "\n".join(lines)
