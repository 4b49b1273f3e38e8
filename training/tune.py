"""`fibreflow tune`: Optuna search over a train config, ranked by eval loss, pruned on eval loss.

Each trial is one `training.train.main` call with sampled dotted overrides, tracked as a nested MLflow run
under the study's parent run. The best trial's full config is written back as YAML, ready for `--config`.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any, Literal

import yaml
from fibreflow.core.config import Strict, load_config, resolve_path
from fibreflow.core.errors import ConfigError
from fibreflow.training.config import load_train_config
from pydantic import Field, PositiveInt, model_validator


class Param(Strict):
    type: Literal["float", "int", "categorical"]
    low: float | None = None
    high: float | None = None
    log: bool = False
    choices: list[Any] | None = None

    @model_validator(mode="after")
    def _shape(self) -> Param:
        if self.type == "categorical" and not self.choices:
            raise ValueError("categorical needs choices")
        if self.type != "categorical" and (self.low is None or self.high is None or self.low > self.high):
            raise ValueError(f"{self.type} needs low <= high")
        return self


class Pruner(Strict):
    type: Literal["median", "threshold", "none"] = "median"
    startup_trials: int = Field(2, ge=0)
    warmup_steps: int = Field(0, ge=0)
    upper: float | None = None  # threshold pruner: prune once eval loss is above this


class TuneConfig(Strict):
    train_config: str
    study: str
    storage: str | None = None
    trials: PositiveInt = 8
    timeout_s: PositiveInt | None = None
    sampler_seed: int | None = 0
    pruner: Pruner = Pruner()
    output: str = "var/tune"
    overrides: dict[str, Any] = Field(default_factory=dict)
    space: dict[str, Param]


def load_tune_config(overrides: dict[str, Any] | None = None) -> TuneConfig:
    return load_config(TuneConfig, "tune", overrides)


def suggest(trial: Any, space: dict[str, Param]) -> dict[str, Any]:
    """One value per dotted key of the search space."""
    out: dict[str, Any] = {}
    for key, p in space.items():
        if p.type == "categorical":
            out[key] = trial.suggest_categorical(key, p.choices)
        elif p.type == "int":
            out[key] = trial.suggest_int(key, int(p.low), int(p.high), log=p.log)  # type: ignore[arg-type]
        else:
            out[key] = trial.suggest_float(key, p.low, p.high, log=p.log)
    return out


def make_pruner(p: Pruner) -> Any:
    import optuna

    if p.type == "median":
        return optuna.pruners.MedianPruner(n_startup_trials=p.startup_trials, n_warmup_steps=p.warmup_steps)
    if p.type == "threshold":
        if p.upper is None:
            raise ConfigError("pruner.upper: the threshold pruner needs an upper eval-loss bound")
        return optuna.pruners.ThresholdPruner(upper=p.upper, n_warmup_steps=p.warmup_steps)
    return optuna.pruners.NopPruner()


def storage_url(cfg: TuneConfig) -> str:
    """The study's storage; Postgres URLs go through psycopg 3 (the driver installed here, not psycopg2)."""
    if cfg.storage:
        scheme, sep, rest = cfg.storage.partition("://")
        return f"postgresql+psycopg://{rest}" if sep and scheme in ("postgres", "postgresql") else cfg.storage
    db = resolve_path(cfg.output) / "optuna.db"
    db.parent.mkdir(parents=True, exist_ok=True)
    return f"sqlite:///{db}"


def pruning_callback(trial: Any) -> Any:
    """Reports each eval loss to Optuna; a trial the pruner gives up on stops training right there."""
    import optuna
    from transformers import TrainerCallback

    class Report(TrainerCallback):
        def on_evaluate(self, args: Any, state: Any, control: Any, metrics: dict | None = None, **kw: Any) -> None:
            if metrics and "eval_loss" in metrics:
                trial.report(metrics["eval_loss"], state.global_step)
                if trial.should_prune():
                    raise optuna.TrialPruned(f"eval loss {metrics['eval_loss']:.4f} at step {state.global_step}")

    return Report()


def main(overrides: dict[str, Any] | None = None, *, train_config: str | None = None) -> dict[str, Any]:
    import mlflow
    import optuna
    from fibreflow.core.tracking import setup_mlflow
    from fibreflow.training.train import main as train_main
    from fibreflow.training.train import run_dir

    cfg = load_tune_config(overrides)
    config_path = train_config or cfg.train_config
    base_cfg = load_train_config(config_path, cfg.overrides)  # fail early on a bad file or override
    # every search key with a value from its range: a misspelt or ill-typed key is named before any trial
    load_train_config(config_path, cfg.overrides | {key: _probe(p) for key, p in cfg.space.items()})
    study = optuna.create_study(
        study_name=cfg.study,
        storage=storage_url(cfg),
        load_if_exists=True,
        direction="minimize",
        sampler=optuna.samplers.TPESampler(seed=cfg.sampler_seed),
        pruner=make_pruner(cfg.pruner),
    )

    def objective(trial: optuna.Trial) -> float:
        params = suggest(trial, cfg.space)
        trial_overrides = cfg.overrides | params
        result = train_main(
            config_path, trial_overrides, progress=False, callbacks=[pruning_callback(trial)], tags=_tags(cfg, trial)
        )
        shutil.rmtree(Path(result["run_dir"]) / "checkpoints", ignore_errors=True)  # keep the adapter only
        trial.set_user_attr("mlflow_run_id", result["run_id"])
        return float(result["best_eval_loss"])

    setup_mlflow(base_cfg.tracking.experiment)
    with mlflow.start_run(run_name=f"tune-{cfg.study}") as parent:
        mlflow.set_tags({"optuna_study": cfg.study, "train_config": str(config_path)})
        study.optimize(objective, n_trials=cfg.trials, timeout=cfg.timeout_s, catch=())
        finished = [t for t in study.trials if t.state == optuna.trial.TrialState.COMPLETE]
        if not finished:
            raise ConfigError(f"study {cfg.study!r}: no trial completed (all pruned or failed)")
        best = study.best_trial
        best_cfg = load_train_config(config_path, best.params)  # the shipped config + the best values only
        out = resolve_path(cfg.output) / cfg.study / "best.yaml"
        out.parent.mkdir(parents=True, exist_ok=True)
        header = f"# Best of Optuna study {cfg.study!r}: trial {best.number}, eval loss {best.value:.4f}\n"
        out.write_text(header + yaml.safe_dump(best_cfg.model_dump(mode="json"), sort_keys=False))
        mlflow.log_metric("best_eval_loss", best.value)
        mlflow.log_params({f"best.{k}": v for k, v in best.params.items()})
        mlflow.log_artifact(str(out), artifact_path="tune")
    states = [t.state.name for t in study.trials]
    return {
        "study": cfg.study,
        "parent_run_id": parent.info.run_id,
        "best_trial": best.number,
        "best_eval_loss": best.value,
        "best_params": best.params,
        "best_config": str(out),
        "best_run_dir": str(run_dir(load_train_config(config_path, cfg.overrides | best.params))),
        "trials": {s: states.count(s) for s in sorted(set(states))},
    }


def _tags(cfg: TuneConfig, trial: Any) -> dict[str, str]:
    return {"optuna_study": cfg.study, "optuna_trial": str(trial.number)}


def _probe(p: Param) -> Any:
    return p.choices[0] if p.type == "categorical" else (int(p.low) if p.type == "int" else p.low)  # type: ignore
