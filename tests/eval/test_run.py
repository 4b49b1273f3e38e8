"""`fibreflow eval` end to end: real database + pgvector retrieval, real models, real MLflow (sqlite)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from fibreflow.core import db

SMALL = {
    "sample.per_tag": {"unknown_term": 2, "terminology": 6, "grounded_qa": 4, "assistant": 4},
    "generation.max_new_tokens": 12,
    "bootstrap.resamples": 2000,
}


def _artifact(run_id: str, path: str) -> Path:
    import mlflow

    return Path(mlflow.artifacts.download_artifacts(run_id=run_id, artifact_path=path))


@pytest.mark.integration
def test_champion_vs_challenger_is_tracked_whole(eval_home: Path, tiny_llama: Path, random_adapter: Path) -> None:
    import mlflow
    from fibreflow.eval.run import main
    from fibreflow.eval.summary import load_summary

    out = main(SMALL, models=[str(tiny_llama), str(random_adapter)], progress=False)

    assert out.samples == 16 and out.grounded_samples == 4
    assert set(out.scores) == {"champion", "challenger"}
    for name in (
        "accuracy",
        "terminology_accuracy",
        "unknown_term_refusal",
        "grounded_accuracy",
        "semantic_similarity",
    ):
        assert name in out.diff, name
        d = out.diff[name]
        assert d.ci_low <= d.diff <= d.ci_high
    assert out.diff["grounded_accuracy"].n == 4 and out.diff["unknown_term_refusal"].n == 2
    assert 0 <= out.retrieval["context_recall"] <= 1
    assert out.gate is not None and out.gate.reasons and isinstance(out.gate.passed, bool)

    run = mlflow.get_run(out.run_id)
    assert run.data.tags["champion.kind"] == "model_folder" and run.data.tags["challenger.kind"] == "adapter_folder"
    assert run.data.tags["gate"] in ("passed", "failed")
    assert run.data.params["challenger.gen.max_new_tokens"] == "12"
    assert run.data.params["challenger.gen.backend"] == "local"
    # each model's scores under its own name, whatever its role: a model's score forms one series across runs
    champ, chall = out.labels["champion"], out.labels["challenger"]
    assert champ.startswith("folder-") and chall.startswith("folder-") and champ != chall
    assert {f"model.{champ}.accuracy", "diff.accuracy.ci_low", f"model.{chall}.samples_per_s",
            "retrieval.context_recall"} <= set(run.data.metrics)  # fmt: skip
    assert run.data.metrics[f"model.{chall}.accuracy"] == out.scores["challenger"]["accuracy"]
    assert load_summary(out.run_id) == out  # the logged summary reads back as what was returned
    table = json.loads(_artifact(out.run_id, "eval/samples.json").read_text())
    columns = table["columns"]
    rows = [dict(zip(columns, r, strict=True)) for r in table["data"]]
    assert len(rows) == 16
    looped = json.loads(_artifact(out.run_id, "eval/tool_loops.json").read_text())  # the assistant's rows
    assert set(looped) == {"champion", "challenger"} and len(looped["champion"]) == 4
    assert all(loop["steps"] <= 3 and loop["messages"][0]["role"] == "system" for loop in looped["champion"].values())
    assert {"question", "champion_answer", "challenger_answer", "champion_accuracy", "challenger_rouge_l"} <= set(
        columns
    )
    grounded = [r for r in rows if "grounded_qa" in r["tags"]]
    assert all(json.loads(r["retrieved"]) for r in grounded)  # records were retrieved for every grounded question
    assert all(r["champion_unknown_term_refusal"] is None for r in grounded)  # not in that group: None, not 0
    assert _artifact(out.run_id, "eval/comparison.png").stat().st_size > 10_000


@pytest.mark.integration
def test_retrieval_stays_inside_the_rows_filters(eval_home: Path, embedded_url: str) -> None:
    from fibreflow.datasets.config import load_data_config
    from fibreflow.eval.config import Rag
    from fibreflow.eval.rag import build_prompts
    from fibreflow.eval.testset import Sample

    with db.connect(embedded_url) as conn:
        project = conn.execute("SELECT id FROM projects LIMIT 1").fetchone()[0]
        owner = dict(conn.execute("SELECT record_id, project_id FROM record_embeddings").fetchall())
    ask = "How many poles have been planted?"
    mine = Sample(id="a", question=ask, reference="3", kind="numeric", contexts=["x"], filters={"project_id": project})
    other = Sample(
        id="b", question=ask, reference="3", kind="numeric", contexts=["x"], filters={"project_id": "PRJ-9999"}
    )
    plain = Sample(id="c", question="What is a splice closure?", reference="a closure", kind="open")
    system = load_data_config().system_prompt
    got = build_prompts([mine, other, plain], system, Rag(mode="retrieve", k=3))
    assert len(got[0].record_ids) == 3 and {owner[r] for r in got[0].record_ids} == {project}
    assert all(c in got[0].conversation[-1]["content"] for c in got[0].contexts)
    assert got[1].record_ids == [] and got[1].contexts == []  # nothing from another project leaks in
    assert got[2].conversation == [{"role": "system", "content": system}, {"role": "user", "content": plain.question}]
    given = build_prompts([mine], system, Rag(mode="given"))[0]
    assert given.contexts == ["x"] and given.record_ids == []


@pytest.mark.integration
@pytest.mark.slow
def test_the_bundled_model_beats_a_random_one(eval_home: Path, tiny_llama: Path) -> None:
    """SmolLM2-135M-Instruct (the real bundled weights) against a random tiny Llama on the same questions."""
    from fibreflow.eval.run import main

    overrides = SMALL | {"generation.max_new_tokens": 32, "rag.mode": "given"}
    out = main(overrides, models=[str(tiny_llama), "base"], progress=False)
    assert out.identity["challenger"]["kind"] == "base" and out.labels["challenger"] == "base-smollm2-135m-instruct"
    sim = out.diff["semantic_similarity"]
    assert sim.ci_low > 0.1, sim  # real sentences about the question vs random tokens
    assert out.scores["challenger"]["rouge_l"] > out.scores["champion"]["rouge_l"]
    assert out.gate is not None and out.gate.passed is False  # a base model does not clear the accuracy minimum


def test_a_bad_test_set_fails_naming_line_and_field(project_tmp: Path, tmp_path: Path) -> None:
    from fibreflow.cli.main import app
    from typer.testing import CliRunner

    bad = tmp_path / "bad.jsonl"
    good = {"id": "1", "question": "q", "reference": "r", "kind": "exact"}
    bad.write_text(json.dumps(good) + "\n" + json.dumps(good | {"id": "2", "kind": "fuzzy"}) + "\n")
    result = CliRunner().invoke(app, ["eval", "--test-set", str(bad), "--models", "base"])
    assert result.exit_code == 2
    assert "bad.jsonl line 2: field 'kind'" in result.output
