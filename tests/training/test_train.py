"""`fibreflow train` end to end on a tiny Llama and a real built dataset, tracked in a real MLflow."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from fibreflow.core.errors import DatasetBuildError

pytestmark = pytest.mark.integration


def _logits(model: torch.nn.Module, tok_dir: Path) -> torch.Tensor:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tok_dir)
    ids = tok("What is a splice closure?", return_tensors="pt").input_ids
    with torch.no_grad():
        return model(input_ids=ids).logits.float()


def test_train_logs_everything_and_the_adapter_loads_back(train_home: Path, tiny_llama: Path, write_config) -> None:
    import mlflow
    from fibreflow.eval.heldout import check
    from fibreflow.training.train import main
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    # compiled as the demo trains (`optim.compile`): eval steps, checkpoints, then generation after training
    config = write_config(train_home, tiny_llama, merge=True, optim={"compile": True})
    result = main(config, progress=False, after=[check])
    assert result["global_step"] == 12
    run = mlflow.MlflowClient().get_run(result["run_id"])
    assert run.info.status == "FINISHED"
    assert run.data.params["optim.lr"] == "0.005" and run.data.params["lora.r"] == "4"
    assert run.data.params["optim.compile"] == "True"
    assert run.data.params["base_model_path"] == str(tiny_llama)
    for key in ("base_model", "git_sha", "config_hash", "dataset_version", "world_size"):
        assert run.data.tags.get(key), key
    history = {k: mlflow.MlflowClient().get_metric_history(run.info.run_id, k) for k in run.data.metrics}
    assert len(history["loss"]) == 12 and len(history["eval_loss"]) == 3
    for key in ("learning_rate", "grad_norm", "tokens_per_s", "heldout_known_gain", "heldout_unknown_tuned"):
        assert key in history, key
    assert all(m.value > 0 for m in history["tokens_per_s"])
    inputs = {d.dataset.name: d.dataset.digest for d in run.inputs.dataset_inputs}
    assert set(inputs) >= {"fibreflow-terminology-train", "fibreflow-terminology-validation"}
    artifacts = {a.path for a in mlflow.MlflowClient().list_artifacts(run.info.run_id, "heldout")}
    assert artifacts == {"heldout/answers.json", "heldout/accuracy.png"}

    adapter = Path(result["adapter"])
    assert (adapter / "adapter_model.safetensors").is_file()
    expected = _logits(PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_llama), adapter), tiny_llama)
    assert not torch.allclose(expected, _logits(AutoModelForCausalLM.from_pretrained(tiny_llama), tiny_llama))
    loaded = mlflow.transformers.load_model(result["model_uri"], return_type="components")
    torch.testing.assert_close(_logits(loaded["model"], tiny_llama), expected, rtol=1e-4, atol=1e-4)
    merged = AutoModelForCausalLM.from_pretrained(result["merged"])
    assert not any("lora" in n for n, _ in merged.named_parameters())
    torch.testing.assert_close(_logits(merged, tiny_llama), expected, rtol=1e-3, atol=1e-3)


def test_empty_dataset_fails_before_any_model_loads(
    train_home: Path, tiny_llama: Path, monkeypatch: pytest.MonkeyPatch, write_config
) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq
    from fibreflow.training import train

    version = (train_home / "var/datasets/LATEST").read_text().strip()
    split = train_home / "var/datasets" / version / "terminology/train.parquet"
    pq.write_table(pq.read_table(split).slice(0, 0), split)

    def no_model(*args, **kwargs):  # the test fails if training got as far as loading weights
        raise AssertionError("a model was loaded")

    monkeypatch.setattr(train, "load_base", no_model)
    monkeypatch.setattr(train, "resolve_base", no_model)
    with pytest.raises(DatasetBuildError, match="train split is empty"):
        train.main(write_config(train_home, tiny_llama), progress=False)
    assert pa  # pyarrow is what wrote the empty split


def _losses(run_dir: Path) -> dict[int, float]:
    last = max((run_dir / "checkpoints").glob("checkpoint-*"), key=lambda p: int(p.name.split("-")[1]))
    state = json.loads((last / "trainer_state.json").read_text())
    return {e["step"]: e["loss"] for e in state["log_history"] if "loss" in e}


def _adapter(run_dir: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(run_dir / "adapter" / "adapter_model.safetensors")


def test_killed_run_resumes_to_the_same_end(train_home: Path, tiny_llama: Path, write_config) -> None:
    """kill -9 mid-run, then --resume: same final step, same per-step losses (same data order), same adapter."""
    from fibreflow.training.train import main

    long = {"optim": {"max_steps": 40}, "heldout": {"enabled": False}, "tracking": {"log_model": False}}
    config = write_config(train_home, tiny_llama, **long)
    straight = main(config, {"output_dir": "var/straight"}, progress=False)

    env = os.environ | {"PYTHONUNBUFFERED": "1"}
    cmd = [sys.executable, "-m", "fibreflow.cli.main", "train", "--config", str(config), "--set", "output_dir=var/cut"]
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    cut_dir = train_home / "var/cut"
    deadline = time.monotonic() + 300
    while not list(cut_dir.glob("*/*/checkpoints/checkpoint-8/trainer_state.json")):
        assert proc.poll() is None, "training ended before it could be killed"
        assert time.monotonic() < deadline
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    [run_dir] = list(cut_dir.glob("*/*"))
    assert not (run_dir / "adapter").exists()

    resumed = main(config, {"output_dir": "var/cut"}, resume=True, progress=False)
    assert resumed["global_step"] == straight["global_step"] == 40
    assert resumed["run_id"] == json.loads((run_dir / "run.json").read_text())["run_id"]  # same MLflow run
    a, b = _losses(Path(straight["run_dir"])), _losses(run_dir)
    assert a.keys() == b.keys()
    differ = {s: (a[s], b[s]) for s in a if a[s] != pytest.approx(b[s], rel=1e-5)}
    assert not differ, f"steps whose loss differs after resuming: {differ}"
    wa, wb = _adapter(Path(straight["run_dir"])), _adapter(run_dir)
    for name in wa:
        torch.testing.assert_close(wa[name], wb[name], rtol=1e-5, atol=1e-6)


def test_only_one_process_removes_cut_short_checkpoints(tmp_path: Path) -> None:
    """Under DDP every rank looks for the checkpoint to resume; only rank 0 deletes the cut-short ones."""
    from fibreflow.training.trainer import COMPLETE_MARK, last_complete_checkpoint

    for step, complete in ((4, True), (8, False)):
        (tmp_path / f"checkpoint-{step}").mkdir()
        if complete:
            (tmp_path / f"checkpoint-{step}" / COMPLETE_MARK).write_text("{}")
    assert last_complete_checkpoint(tmp_path, remove_incomplete=False) == tmp_path / "checkpoint-4"
    assert (tmp_path / "checkpoint-8").is_dir()  # another rank's view: left alone
    assert last_complete_checkpoint(tmp_path, remove_incomplete=True) == tmp_path / "checkpoint-4"
    assert not (tmp_path / "checkpoint-8").exists()
    assert last_complete_checkpoint(tmp_path / "none", remove_incomplete=True) is None
