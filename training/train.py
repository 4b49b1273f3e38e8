"""`fibreflow train`: QLoRA supervised fine-tuning of a catalogue model on a built dataset, tracked in MLflow.

config -> data (checked before any model loads) -> base + LoRA -> Trainer -> adapter (+ merged) -> after-training
hooks (the CLI and the pipeline hand in evaluation's held-out check). Runs unchanged under `accelerate launch` /
`torchrun` (DDP): only the main process talks to MLflow and writes the adapter.
"""

from __future__ import annotations

import json
import os
import random
import shutil
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fibreflow.core.config import atomic_folder, resolve_path
from fibreflow.core.errors import ConfigError
from fibreflow.datasets.build import TEST_SET, version_dir
from fibreflow.datasets.config import load_data_config
from fibreflow.datasets.manifest import read_manifest
from fibreflow.training.config import TrainConfig, load_train_config
from fibreflow.training.data import Collator, check_examples, count_tokens, prepare
from fibreflow.training.models import add_lora, compile_layers, load_base, load_tokenizer, resolve_base
from fibreflow.training.weights import write_quantization


def is_main_process() -> bool:
    """Rank 0 of a torchrun / accelerate launch (read from their env: creating accelerate's process state this
    early would fix it before the Trainer configures it), or a plain single process."""
    return os.environ.get("RANK", "0") == "0"


def run_dir(cfg: TrainConfig) -> Path:
    """One folder per distinct config: checkpoints/, adapter/, merged/, run.json."""
    return resolve_path(cfg.output_dir) / cfg.model / cfg.config_hash()


def load_rows(cfg: TrainConfig) -> tuple[Path, list[dict[str, Any]], list[dict[str, Any]]]:
    """(dataset folder, train rows, eval rows). Eval is the validation split, or a seeded 10% of train."""
    import pyarrow.parquet as pq

    path = version_dir(load_data_config(), cfg.data.version)
    manifest = read_manifest(path)
    manifest.split(cfg.data.dataset, "train")  # fails naming the dataset when it has none
    parts = manifest.datasets[cfg.data.dataset]
    splits = {s: pq.read_table(path / cfg.data.dataset / v.file).to_pylist() for s, v in parts.items()}
    train = splits["train"]
    for name in cfg.data.mix:  # the mixture: other datasets' training rows (the same version)
        manifest.split(name, "train")
        train += pq.read_table(path / name / manifest.datasets[name]["train"].file).to_pylist()
    rng = random.Random(cfg.optim.seed)
    if "validation" in splits:
        evaluation = splits["validation"]
    else:
        rng.shuffle(train)
        cut = max(1, len(train) // 10) if len(train) > 1 else 0
        evaluation, train = train[:cut], train[cut:]
    # row caps take a seeded sample, not the first rows of the glossary
    if cfg.data.max_train_rows and cfg.data.max_train_rows < len(train):
        train = rng.sample(train, cfg.data.max_train_rows)
    if cfg.data.max_eval_rows and cfg.data.max_eval_rows < len(evaluation):
        evaluation = rng.sample(evaluation, cfg.data.max_eval_rows)
    check_examples(train, "train")
    check_examples(evaluation, "validation")
    return path, train, evaluation


def training_arguments(cfg: TrainConfig, out: Path, steps_per_epoch: int) -> Any:
    import torch
    from transformers import TrainingArguments

    o, e, c = cfg.optim, cfg.eval, cfg.checkpoint
    return TrainingArguments(
        output_dir=str(out / "checkpoints"),
        per_device_train_batch_size=o.batch_size,
        per_device_eval_batch_size=o.batch_size,
        gradient_accumulation_steps=o.grad_accum,
        num_train_epochs=o.epochs,
        max_steps=o.max_steps,
        learning_rate=o.lr,
        weight_decay=o.weight_decay,
        warmup_steps=round(o.warmup_ratio * (o.max_steps if o.max_steps > 0 else o.epochs * steps_per_epoch)),
        lr_scheduler_type=o.scheduler,
        max_grad_norm=o.max_grad_norm,
        seed=o.seed,
        data_seed=o.seed,
        eval_strategy="steps",
        eval_steps=e.every_steps,
        save_strategy="steps",
        save_steps=c.every_steps,
        save_total_limit=c.keep,
        load_best_model_at_end=True,
        metric_for_best_model="eval_loss",
        greater_is_better=False,
        restore_callback_states_from_checkpoint=True,
        logging_steps=1,
        report_to="none",
        remove_unused_columns=False,
        label_names=["labels"],
        prediction_loss_only=True,
        use_cpu=not torch.cuda.is_available(),
        dataloader_num_workers=0,
        disable_tqdm=False,
    )


def start_tracking(cfg: TrainConfig, out: Path, resume: bool) -> Any:
    """The MLflow run (resumed with the checkpoint), or None off the main process."""
    if not is_main_process():
        return None
    import mlflow
    from fibreflow.core.tracking import setup_mlflow

    setup_mlflow(cfg.tracking.experiment)
    state = out / "run.json"
    run_id = json.loads(state.read_text())["run_id"] if resume and state.is_file() else None
    if os.environ.get("MLFLOW_RUN_ID") and run_id is None:  # started by `mlflow run` / a parent: use that run
        run_id = os.environ["MLFLOW_RUN_ID"]
    run = mlflow.start_run(
        run_id=run_id,
        run_name=None if run_id else f"train-{cfg.model}-{cfg.config_hash()[:8]}",
        nested=mlflow.active_run() is not None,
        log_system_metrics=cfg.tracking.system_metrics,
    )
    out.mkdir(parents=True, exist_ok=True)
    state.write_text(json.dumps({"run_id": run.info.run_id}))
    return run


def log_inputs(cfg: TrainConfig, base: str, data_path: Path, token_counts: dict[str, int]) -> None:
    import mlflow
    from fibreflow.core.tracking import git_sha
    from fibreflow.datasets.build import log_to_mlflow

    flat = _flatten(cfg.model_dump(mode="json"))
    if not mlflow.active_run().data.params:  # a resumed run has them already (params are write-once)
        mlflow.log_params(flat | {"base_model_path": base} | {f"data.{k}": v for k, v in token_counts.items()})
        log_to_mlflow(data_path)
    mlflow.set_tags(
        {
            "base_model": cfg.model,
            "base_model_path": base,
            "git_sha": git_sha(),
            "config_hash": cfg.config_hash(),
            "world_size": os.environ.get("WORLD_SIZE", "1"),
        }
    )


def _flatten(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in tree.items():
        key = f"{prefix}{k}"
        out |= _flatten(v, f"{key}.") if isinstance(v, dict) else {key: v}
    return out


def system_prompt(rows: list[dict[str, Any]]) -> str | None:
    """The system message the model was trained with (held-out questions are asked with the same one)."""
    first = rows[0]["messages"][0]
    return first["content"] if first["role"] == "system" else None


@dataclass
class Trained:
    """What an after-training hook gets: the trained model (adapter on), its tokenizer, the config, the
    dataset's held-out test set and the system prompt it was trained with."""

    cfg: TrainConfig
    model: Any
    tok: Any
    test_set: Path
    system: str | None


AfterTraining = Callable[[Trained], dict[str, Any]]  # runs under the training's MLflow run; its result is merged


@dataclass
class Prepared:
    base: str
    tok: Any
    train: list[dict[str, list[int]]]
    eval: list[dict[str, list[int]]]
    data_path: Path
    system: str | None


def main(
    config: str | Path,
    overrides: dict[str, Any] | None = None,
    *,
    resume: bool = False,
    progress: bool = True,
    callbacks: list[Any] | None = None,
    tags: dict[str, str] | None = None,
    after: Sequence[AfterTraining] = (),
) -> dict[str, Any]:
    """Train; `callbacks` (extra TrainerCallbacks) and `tags` (MLflow) are for callers such as `tune`; `after`
    hooks run on the main process once the adapter is written and logged."""
    cfg = load_train_config(config, overrides)
    out = run_dir(cfg)
    data_path, train_rows, eval_rows = load_rows(cfg)  # fails here, before any weights load
    base = resolve_base(cfg)
    tok = load_tokenizer(base)
    o = cfg.optim
    prep = Prepared(
        base=base,
        tok=tok,
        train=prepare(train_rows, tok, o.seq_len, o.packing, o.seed, o.pack_len, o.chat_turns),
        eval=prepare(eval_rows, tok, o.seq_len, o.packing, o.seed, o.pack_len),
        data_path=data_path,
        system=system_prompt(train_rows),
    )
    checkpoint = _checkpoint(out, resume)
    run = start_tracking(cfg, out, checkpoint is not None)
    try:
        if run is not None:
            import mlflow

            mlflow.set_tags(tags or {})
        result = _fit(cfg, out, prep, checkpoint, run, progress, callbacks or [], after)
    except BaseException as exc:
        if run is not None:
            import mlflow

            # either way resumable with --resume: the run id stays in run.json
            mlflow.end_run("FAILED" if isinstance(exc, Exception) else "KILLED")
        raise
    if run is not None:
        import mlflow

        mlflow.end_run()
    return result


def _checkpoint(out: Path, resume: bool) -> Path | None:
    from fibreflow.training.trainer import last_complete_checkpoint

    if not resume:
        if is_main_process():
            shutil.rmtree(out / "checkpoints", ignore_errors=True)
        return None
    found = last_complete_checkpoint(out / "checkpoints", remove_incomplete=is_main_process())
    if found is None:
        raise ConfigError(f"--resume: no complete checkpoint under {out / 'checkpoints'}; start without --resume")
    return found


def _fit(
    cfg: TrainConfig,
    out: Path,
    prep: Prepared,
    checkpoint: Path | None,
    run: Any,
    progress: bool,
    extra: list[Any],
    after: Sequence[AfterTraining],
) -> dict[str, Any]:
    import math

    from fibreflow.training.publish import finish
    from fibreflow.training.trainer import LabelledTrainer, MlflowMetrics
    from transformers import EarlyStoppingCallback

    o = cfg.optim
    tokens, labelled = count_tokens(prep.train)
    if run is not None:
        log_inputs(cfg, prep.base, prep.data_path, {"train_tokens": tokens, "train_labelled_tokens": labelled})
    from transformers import set_seed

    set_seed(o.seed)  # LoRA's initial weights come from the global RNG: seed it, or no two runs start alike
    model = add_lora(load_base(prep.base, cfg), cfg)
    restore_eager = compile_layers(model) if o.compile else None  # None: uncompiled
    callbacks: list[Any] = [MlflowMetrics(), *extra]
    if cfg.eval.early_stopping_patience:
        callbacks.append(EarlyStoppingCallback(cfg.eval.early_stopping_patience, cfg.eval.early_stopping_threshold))
    args = training_arguments(cfg, out, math.ceil(len(prep.train) / (o.batch_size * o.grad_accum)))
    args.disable_tqdm = not progress
    trainer = LabelledTrainer(
        model=model,
        args=args,
        train_dataset=prep.train,
        eval_dataset=prep.eval,
        data_collator=Collator(pad_id=prep.tok.pad_token_id, packed=o.packing),
        callbacks=callbacks,
    )
    train_out = trainer.train(resume_from_checkpoint=str(checkpoint) if checkpoint else None)
    if restore_eager is not None:  # generation after training (hooks, log_model) runs the eager forwards
        restore_eager()
    result: dict[str, Any] = {
        "run_dir": str(out),
        "run_id": run.info.run_id if run is not None else None,
        "global_step": trainer.state.global_step,
        "train_loss": train_out.training_loss,
        "best_eval_loss": trainer.state.best_metric,
        "train_tokens_per_epoch": tokens,
        "train_runtime_s": train_out.metrics.get("train_runtime"),
    }
    if not trainer.is_world_process_zero():
        return result
    result["adapter"] = str(save_adapter(trainer.model, prep.tok, cfg, out / "adapter"))
    result |= finish(cfg, trainer.model, prep.tok, prep.base, out)
    trained = Trained(cfg, trainer.model, prep.tok, prep.data_path / TEST_SET, prep.system)
    for hook in after:
        result |= hook(trained)
    return result


def save_adapter(model: Any, tok: Any, cfg: TrainConfig, dest: Path) -> Path:
    """The adapter, its tokenizer and its quantization record (a QLoRA adapter is only right on the base
    quantized as in training) into `dest`: written to a temp folder and swapped in, never half-written."""
    with atomic_folder(dest) as tmp:
        model.save_pretrained(tmp)
        tok.save_pretrained(tmp)
        write_quantization(tmp, cfg.quantization)
    return dest
