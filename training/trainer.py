"""The HF `Trainer`, with a loss that only projects labelled positions onto the vocabulary.

For a 135M model the 49k-token output layer is a large share of the compute; prompt tokens carry no label,
so their logits are never needed. `logits_to_keep` (a boolean mask) makes the model skip them.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import torch
from fibreflow.training.data import IGNORE
from transformers import Trainer, TrainerCallback

COMPLETE_MARK = "trainer_state.json"  # the Trainer writes it last: a checkpoint without it was cut short


class LabelledTrainer(Trainer):
    """Loss = summed cross-entropy over labelled positions / labelled positions in the accumulated batch."""

    loss_is_scaled_for_ga = True

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._tokens = 0
        self._mark = (0, time.perf_counter())

    def compute_loss(
        self,
        model: torch.nn.Module,
        inputs: dict[str, Any],
        return_outputs: bool = False,
        num_items_in_batch: torch.Tensor | int | None = None,
    ) -> Any:
        inputs = dict(inputs)
        target = inputs.pop("shift_labels")
        inputs.pop("labels", None)
        keep = target != IGNORE
        if model.training:
            mask = inputs.get("attention_mask")
            self._tokens += int(mask.sum()) if mask is not None else inputs["input_ids"].numel()
        logits = model(**inputs, logits_to_keep=keep, use_cache=False).logits  # (labelled positions, vocab)
        labels = target[keep]
        if num_items_in_batch is None:
            loss = torch.nn.functional.cross_entropy(logits.float(), labels)
        else:
            loss = torch.nn.functional.cross_entropy(logits.float(), labels, reduction="sum") / num_items_in_batch
            if self.args.average_tokens_across_devices:  # the count was summed over processes; DDP averages grads
                loss = loss * self.accelerator.num_processes
        return (loss, {}) if return_outputs else loss

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        if "loss" in logs:  # a training log: throughput since the previous one, all processes together
            tokens, t0 = self._mark
            now = time.perf_counter()
            logs["tokens_per_s"] = (self._tokens - tokens) * self.accelerator.num_processes / max(now - t0, 1e-9)
            self._mark = (self._tokens, now)
        super().log(logs, start_time)


class MlflowMetrics(TrainerCallback):
    """Every Trainer log line -> MLflow metrics at the global step (main process only)."""

    def on_log(self, args: Any, state: Any, control: Any, logs: dict[str, Any] | None = None, **kw: Any) -> None:
        import mlflow

        if not state.is_world_process_zero or not logs or mlflow.active_run() is None:
            return
        values = {k: float(v) for k, v in logs.items() if isinstance(v, int | float) and not isinstance(v, bool)}
        mlflow.log_metrics(values, step=state.global_step)


def last_complete_checkpoint(folder: Path, remove_incomplete: bool) -> Path | None:
    """The newest checkpoint the Trainer finished writing; newer cut-short ones are skipped, and deleted when
    `remove_incomplete` (one process only: under DDP every rank looks, rank 0 alone cleans up)."""
    import shutil

    if not folder.is_dir():
        return None
    found = sorted(
        (p for p in folder.glob("checkpoint-*") if p.name.split("-")[-1].isdigit()),
        key=lambda p: int(p.name.split("-")[-1]),
        reverse=True,
    )
    for path in found:
        if (path / COMPLETE_MARK).is_file():
            return path
        if remove_incomplete:
            shutil.rmtree(path)
    return None
