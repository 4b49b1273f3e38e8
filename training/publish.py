"""After training: the held-out check, the adapter into MLflow (loadable by URI), the optional merged model."""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

from fibreflow.training.config import TrainConfig, torch_dtype
from fibreflow.training.heldout import compare, metrics, sample
from fibreflow.training.models import allow_4bit_inference_layout, load_tokenizer

PIP_REQUIREMENTS = ["torch==2.13.0", "transformers==5.24.0", "peft==0.21.2", "accelerate==1.15.0"]


def finish(
    cfg: TrainConfig, model: Any, tok: Any, base: str, out: Path, test_set: Path, system: str | None
) -> dict[str, Any]:
    import mlflow

    tracked = mlflow.active_run() is not None
    result: dict[str, Any] = {}
    allow_4bit_inference_layout(model)  # training is over: generation may use the fast 4-bit layout
    if cfg.heldout.enabled and test_set.is_file():
        rows = sample(test_set, cfg.heldout, cfg.optim.seed)
        if rows:
            found = compare(model, tok, rows, system or "", cfg.heldout)
            result["heldout"] = metrics(found)
            if tracked:
                mlflow.log_metrics(result["heldout"])
                mlflow.log_table(_columns(found["table"]), artifact_file="heldout/answers.json")
                mlflow.log_figure(plot(found), "heldout/accuracy.png")
    if tracked and cfg.tracking.log_model:
        info = log_adapter(model, tok, base)
        result["model_uri"] = info.model_uri
    if cfg.merge:
        merged = merge(base, out / "adapter", out / "merged", cfg.dtype)
        result["merged"] = str(merged)
        if tracked:
            mlflow.set_tag("merged_model_path", str(merged))
    return result


def _columns(table: list[dict[str, Any]]) -> dict[str, list[Any]]:
    return {k: [row[k] for row in table] for k in table[0]}


def plot(found: dict[str, Any]) -> Any:
    """Bars: base vs tuned accuracy per group, the tuned bar with the 95% CI of the paired gain."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    groups = [g for g in ("known", "unknown") if g in found]
    fig, ax = plt.subplots(figsize=(5, 3.2))
    for i, g in enumerate(groups):
        d = found[g]
        ax.bar(i - 0.2, d.a, 0.4, color="#999", label="base" if i == 0 else None)
        err = [[d.diff - d.low], [d.high - d.diff]]
        ax.bar(i + 0.2, d.b, 0.4, color="#2a7", yerr=err, capsize=4, label="tuned" if i == 0 else None)
    ax.set_xticks(range(len(groups)), [f"{g} terms (n={found[g].n})" for g in groups])
    ax.set_ylim(0, 1.05)
    ax.set_ylabel("accuracy on held-out phrasings")
    ax.legend(loc="upper left")
    fig.tight_layout()
    return fig


def log_adapter(model: Any, tok: Any, base: str) -> Any:
    """Only the adapter (a few MB) with a pointer to its base; loads back with `mlflow.transformers.load_model`."""
    import mlflow

    return mlflow.transformers.log_model(
        transformers_model={"model": model, "tokenizer": tok},
        name="adapter",
        task="text-generation",
        base_model_path=base,
        pip_requirements=PIP_REQUIREMENTS,
        model_config={"max_new_tokens": 128, "do_sample": False},
    )


def merge(base: str, adapter: Path, dest: Path, dtype: str) -> Path:
    """The adapter folded into an unquantized copy of the base: a plain model for serving without LoRA."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch_dtype(dtype))
    merged = PeftModel.from_pretrained(model, str(adapter)).merge_and_unload()
    tmp = dest.with_name(dest.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    merged.save_pretrained(tmp)
    load_tokenizer(base).save_pretrained(tmp)
    shutil.rmtree(dest, ignore_errors=True)
    tmp.rename(dest)
    return dest
