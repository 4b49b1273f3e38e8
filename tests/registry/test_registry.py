"""Registration, gated promotion, forced promotion and rollback against a real MLflow (sqlite) and real models.

The models are tiny random Llamas with LoRA adapters; the test set's references are adapter A's own answers,
so A is right on every question and any other adapter is wrong on most: a known better and a known worse model.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from gated import write_reference_test_set


@pytest.mark.integration
def test_register_promote_refuse_force_and_roll_back(
    train_run: Any, gated_home: Path, tiny_llama: Path, tmp_path: Path
) -> None:
    import mlflow
    from fibreflow.registry.registry import RegistryError, history, promote, register, rollback

    run_a = train_run(tiny_llama, tmp_path / "a", seed=1)
    write_reference_test_set(gated_home, tmp_path / "a")
    client = mlflow.MlflowClient()

    first = register(run_a, eval_run_id="e" * 32)
    assert first["version"] == "1" and first["alias"] == "challenger"
    v1 = client.get_model_version("fibreflow-assistant", "1")
    lineage = {"training_run_id": run_a, "dataset_version": "v-test", "config_hash": "hash1", "git_sha": "abc123",
               "eval_run_id": "e" * 32, "metric.heldout_known_tuned": "0.5000"}  # fmt: skip
    assert v1.tags | lineage == v1.tags
    spec = json.loads(Path(mlflow.artifacts.download_artifacts(v1.tags["serving_spec"])).read_text())
    assert spec["base_model_path"] == str(tiny_llama) and spec["adapter_uri"] == "models:/fibreflow-assistant/1"
    assert spec["quantization"] is None and spec["max_context"] == 1024 and "im_start" in spec["chat_template"]

    # the first promotion is judged against the base model: A answers its own references, the base does not
    out = promote()
    assert out["promoted"] and out["decision"] == "passed" and out["previous_champion"] is None
    assert promote()["decision"] == "unchanged"  # nothing new to judge: no evaluation, no alias move
    assert str(client.get_model_version_by_alias("fibreflow-assistant", "champion").version) == "1"

    # a worse challenger is refused and the champion stays; the CLI says so in its exit status
    register(train_run(tiny_llama, tmp_path / "b", seed=2))
    refused = promote()
    assert refused["promoted"] is False and refused["decision"] == "refused"
    from fibreflow.cli.main import GATE_REFUSED, app
    from typer.testing import CliRunner

    assert CliRunner().invoke(app, ["promote"]).exit_code == GATE_REFUSED == 3
    assert any("accuracy" in r and "minimum" in r for r in refused["reasons"])
    assert str(client.get_model_version_by_alias("fibreflow-assistant", "champion").version) == "1"
    v2 = client.get_model_version("fibreflow-assistant", "2")
    assert v2.tags["promotion.decision"] == "refused" and "accuracy" in v2.tags["promotion.reasons"]
    decision_run = mlflow.get_run(refused["decision_run_id"])
    assert decision_run.data.tags["decision"] == "refused" and decision_run.data.tags["champion_version"] == "1"

    # forcing needs a reason, and the reason is recorded
    with pytest.raises(RegistryError, match="--reason"):
        promote(force=True)
    forced = promote(force=True, reason="hotfix: v1 cites cancelled poles")
    assert forced["promoted"] and forced["decision"] == "forced"
    assert str(client.get_model_version_by_alias("fibreflow-assistant", "champion").version) == "2"
    v2 = client.get_model_version("fibreflow-assistant", "2")
    assert v2.tags["promotion.force_reason"] == "hotfix: v1 cites cancelled poles"
    assert mlflow.get_run(forced["decision_run_id"]).data.tags["force_reason"].startswith("hotfix")

    # rollback restores the previous champion; the alias history keeps every move
    assert rollback(reason="complaints") == {"champion": "1", "was": "2"}
    assert str(client.get_model_version_by_alias("fibreflow-assistant", "champion").version) == "1"
    moves = [(h["alias"], h["version"], h["action"]) for h in history()]
    assert moves == [("challenger", "1", "registered"), ("champion", "1", "passed"), ("challenger", "2", "registered"),
                     ("champion", "2", "forced"), ("champion", "1", "rollback")]  # fmt: skip
    with pytest.raises(RegistryError, match="first champion"):
        rollback()
    # a rolled-back version comes back only by force, with a reason
    client.set_registered_model_alias("fibreflow-assistant", "challenger", "2")
    with pytest.raises(RegistryError, match=r"v2 was rolled back \(complaints\).*--force"):
        promote()
    assert promote(force=True, reason="fixed upstream")["promoted"]
    with pytest.raises(RegistryError, match="no longer v1"):  # a monitor's rollback of what it measured
        rollback(reason="regressed", expected="1")


@pytest.mark.integration
def test_registering_something_that_is_not_a_training_run_fails(gated_home: Path) -> None:
    import mlflow
    from fibreflow.registry.registry import RegistryError, promote, register

    with pytest.raises(RegistryError, match="not a training run id"):
        register("my-model")
    with pytest.raises(RegistryError, match="no run 0123"):
        register("0123456789abcdef0123456789abcdef")
    mlflow.set_experiment("fibreflow-train")
    with mlflow.start_run() as run:
        pass
    with pytest.raises(RegistryError, match="not a `fibreflow train` run"):
        register(run.info.run_id)
    with pytest.raises(RegistryError, match="no @challenger"):
        promote()


@pytest.mark.integration
def test_alias_moves_reach_a_watcher(train_run: Any, gated_home: Path, tiny_llama: Path, tmp_path: Path) -> None:
    """What the serving layer subscribes to: a promotion and a rollback are seen by polling, in order."""
    import time

    import mlflow
    from fibreflow.registry.registry import register, rollback
    from fibreflow.registry.watch import AliasWatcher

    client = mlflow.MlflowClient()
    register(train_run(tiny_llama, tmp_path / "a", seed=1))
    seen: list[tuple[str, str | None, str | None]] = []

    def wait_for(event: tuple[str, str | None, str | None]) -> None:
        for _ in range(100):
            if event in seen:
                return
            time.sleep(0.1)
        raise AssertionError(f"{event} not seen; saw {seen}")

    watcher = AliasWatcher("fibreflow-assistant", ("champion", "challenger"), lambda *c: seen.append(c), 0.1)
    assert watcher.poll() == [("challenger", None, "1")]  # the first read reports what is set
    watcher.start()
    try:
        assert watcher.versions == {"champion": None, "challenger": "1"}
        client.set_registered_model_alias("fibreflow-assistant", "champion", "1")
        wait_for(("champion", None, "1"))
        register(train_run(tiny_llama, tmp_path / "b", seed=2))
        wait_for(("challenger", "1", "2"))
        client.set_model_version_tag("fibreflow-assistant", "2", "previous_champion", "1")
        client.set_registered_model_alias("fibreflow-assistant", "champion", "2")
        wait_for(("champion", "1", "2"))
        rollback(reason="test")
        wait_for(("champion", "2", "1"))
    finally:
        watcher.stop()
    assert len(seen) == 5  # the first read, then each move once, nothing twice

    offered: list[tuple[str, str | None, str | None]] = []

    def refuse_the_first(*change: Any) -> None:  # a subscriber that could not apply a move (its vLLM did not start)
        offered.append(change)
        if len(offered) == 1:
            raise RuntimeError("the new version could not be started")

    stubborn = AliasWatcher("fibreflow-assistant", ("champion",), refuse_the_first, 0.1)
    assert stubborn.poll() == [] and stubborn.versions == {}  # refused: not recorded as applied
    assert stubborn.poll() == [("champion", None, "1")] and stubborn.versions == {"champion": "1"}  # offered again
    assert stubborn.poll() == [] and offered == [("champion", None, "1")] * 2


@pytest.mark.integration
def test_an_interrupted_registration_is_completed_not_duplicated(
    train_run: Any, gated_home: Path, tiny_llama: Path, tmp_path: Path
) -> None:
    import mlflow
    from fibreflow.registry.registry import register

    run_id = train_run(tiny_llama, tmp_path / "a", seed=1)
    mlflow.register_model(f"runs:/{run_id}/adapter", "fibreflow-assistant")  # stopped right after this call
    out = register(run_id)
    assert out["version"] == "1" and out["reused"] is False
    v1 = mlflow.MlflowClient().get_model_version_by_alias("fibreflow-assistant", "challenger")
    assert str(v1.version) == "1" and v1.tags["training_run_id"] == run_id
    assert register(run_id) == {"name": "fibreflow-assistant", "version": "1", "reused": True}
    assert len(mlflow.MlflowClient().search_model_versions("name = 'fibreflow-assistant'")) == 1


@pytest.mark.integration
def test_promotions_take_turns_and_never_move_a_champion_that_moved_meanwhile(
    train_run: Any, gated_home: Path, tiny_llama: Path, tmp_path: Path, pg_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    import mlflow
    import psycopg
    from fibreflow.core.errors import LockBusy
    from fibreflow.eval import run as eval_run
    from fibreflow.registry import registry

    run_a = train_run(tiny_llama, tmp_path / "a", seed=1)
    write_reference_test_set(gated_home, tmp_path / "a")
    client = mlflow.MlflowClient()
    registry.register(run_a)
    monkeypatch.setattr(registry, "LOCK_WAIT_S", 0.5)
    with psycopg.connect(pg_url, autocommit=True) as other:  # another promotion holds the lock
        other.execute("SELECT pg_advisory_lock(hashtext('fibreflow-registry:fibreflow-assistant'))")
        with pytest.raises(LockBusy, match="a promotion or rollback of fibreflow-assistant is already under way"):
            registry.promote()
        with pytest.raises(LockBusy):
            registry.rollback()
    assert registry.promote()["promoted"]  # the lock died with the other session
    registry.register(train_run(tiny_llama, tmp_path / "b", seed=2))
    real = eval_run.main

    def while_someone_moves_the_champion(*args: Any, **kwargs: Any) -> Any:
        out = real(*args, **kwargs)
        client.set_registered_model_alias("fibreflow-assistant", "champion", "2")  # e.g. by hand, in the MLflow UI
        return out

    monkeypatch.setattr(eval_run, "main", while_someone_moves_the_champion)
    with pytest.raises(registry.RegistryError, match="@champion moved from v1 to v2 while v2 was being judged"):
        registry.promote(force=True, reason="test")
    assert client.get_model_version("fibreflow-assistant", "2").tags.get("previous_champion") is None


@pytest.mark.integration
@pytest.mark.slow
def test_kill_9_mid_promotion_leaves_the_aliases_whole_and_the_lock_free(
    train_run: Any, gated_home: Path, tiny_llama: Path, tmp_path: Path, pg_url: str
) -> None:
    """`fibreflow promote` killed with SIGKILL while it evaluates: @champion is wholly the old version, the lock is
    released by the server, and the next promotion completes."""
    import os
    import signal
    import subprocess
    import sys
    import time

    import mlflow
    import psycopg
    from fibreflow.registry.registry import promote, register

    register(train_run(tiny_llama, tmp_path / "a", seed=1))
    write_reference_test_set(gated_home, tmp_path / "a")
    client = mlflow.MlflowClient()
    cli = Path(sys.executable).with_name("fibreflow")
    proc = subprocess.Popen([str(cli), "promote"], env=os.environ.copy(), stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)  # fmt: skip
    deadline = time.monotonic() + 120
    with psycopg.connect(pg_url, autocommit=True) as conn:
        while not conn.execute("SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND granted").fetchone()[0]:
            assert proc.poll() is None and time.monotonic() < deadline, "the promotion never took its lock"
            time.sleep(0.1)
    time.sleep(1.0)  # into its evaluation
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait(30)
    try:
        client.get_model_version_by_alias("fibreflow-assistant", "champion")
        raise AssertionError("a killed promotion moved @champion")
    except mlflow.exceptions.MlflowException:
        pass  # still unset: wholly the old state
    assert (
        promote()["promoted"]
        and str(client.get_model_version_by_alias("fibreflow-assistant", "champion").version) == "1"
    )
