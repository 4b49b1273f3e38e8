"""Dataset builds against a real database: leakage, hash stability, bad input, lost connection, MLflow."""

import json
import re
import time
from pathlib import Path

import psycopg
import pytest
from fibreflow.core import db
from fibreflow.core.errors import DatasetBuildError, SchemaMissing
from fibreflow.datasets import build
from fibreflow.datasets.config import load_data_config
from fibreflow.datasets.manifest import read_manifest

pytestmark = pytest.mark.integration


def _build(url: str, out: Path, **overrides) -> Path:
    cfg = load_data_config({"output_dir": str(out), **overrides})
    with db.connect(url) as conn:
        return build.build(conn, cfg, progress=False)


def _rows(path: Path, name: str, split: str) -> list[dict]:
    import pyarrow.parquet as pq

    return pq.read_table(path / name / f"{split}.parquet").to_pylist()


def test_grounded_qa_is_split_by_project(seeded_url: str, tmp_path: Path) -> None:
    m = _build(seeded_url, tmp_path, **{"grounded_qa.test_fraction": 0.5})
    train, test = _rows(m, "grounded_qa", "train"), _rows(m, "grounded_qa", "test")
    test_projects = set(read_manifest(m).grounded_qa_test_projects)
    assert train and test and test_projects == {r["project_id"] for r in test}
    train_text = json.dumps(train)
    for pid in test_projects:
        assert pid not in train_text  # no test project's records or questions in training
    families = {r["family"] for r in train + test}
    assert families == {"project_status", "pole_count", "boq_total", "progress_range", "task_status"}


def test_answers_are_computed_in_sql(seeded_url: str, tmp_path: Path) -> None:
    m = _build(seeded_url, tmp_path)
    rows = _rows(m, "grounded_qa", "train") + _rows(m, "grounded_qa", "test")
    with db.connect(seeded_url) as conn:
        for r in rows:
            if r["family"] == "boq_total":
                total = conn.execute(
                    "SELECT sum(quantity * rate_zar) FROM boq_items WHERE project_id = %s", (r["project_id"],)
                ).fetchone()[0]
                assert float(r["reference"]) == pytest.approx(float(total), abs=0.005)
                assert len(r["contexts"]) == 25
            if r["family"] == "pole_count":
                status = r["question"].rsplit("status ", 1)[1].rstrip("?").replace(" ", "_")
                n = conn.execute(
                    "SELECT count(*) FROM poles WHERE project_id = %s AND status = %s",
                    (r["project_id"], status),
                ).fetchone()[0]
                assert int(r["reference"]) == n
            if r["family"] == "progress_range":
                assert all(r["project_id"] in c for c in r["contexts"])


def test_accuracy_test_set_format(seeded_url: str, tmp_path: Path) -> None:
    m = _build(seeded_url, tmp_path)
    lines = (m / "accuracy_test.jsonl").read_text().splitlines()
    assert len(lines) == read_manifest(m).accuracy_test_set.rows > 0
    kinds = set()
    for line in lines:
        row = json.loads(line)
        assert {"id", "question", "reference", "kind", "contexts", "tags"} <= set(row)
        kinds.add(row["kind"])
        if row["kind"] == "numeric":
            assert "unit" in row and "tolerance" in row
    assert kinds == {"open", "contains", "numeric", "tool_call"}
    from fibreflow.eval.testset import load_test_set

    assert len(load_test_set(m / "accuracy_test.jsonl")) == len(lines)  # what `fibreflow eval` reads
    assert any("unknown_term" in json.loads(x)["tags"] for x in lines)


def test_same_state_same_version_and_change_moves_it(seeded_url: str, tmp_path: Path) -> None:
    a, b = _build(seeded_url, tmp_path / "a"), _build(seeded_url, tmp_path / "b", cursor_rows=7)
    assert a.name == b.name == read_manifest(a).version  # fetch size and place do not change the content
    assert (tmp_path / "a" / "LATEST").read_text().strip() == a.name
    with db.connect(seeded_url) as conn:
        conn.execute("UPDATE boq_items SET rate_zar = rate_zar + 1 WHERE id = (SELECT min(id) FROM boq_items)")
    assert _build(seeded_url, tmp_path / "a").name != a.name
    assert _build(seeded_url, tmp_path / "a", **{"grounded_qa.split_salt": "other"}).name != a.name


def test_empty_tables_fail_clearly_and_write_nothing(pg_url: str, tmp_path: Path) -> None:
    with db.connect(pg_url) as conn:
        db.migrate(conn)
    with pytest.raises(DatasetBuildError, match=r"glossary table is empty.*fibreflow db seed"):
        _build(pg_url, tmp_path)
    assert list(tmp_path.iterdir()) == []


def test_unmigrated_database_is_refused(pg_url: str, tmp_path: Path) -> None:
    with pytest.raises(SchemaMissing):
        _build(pg_url, tmp_path)


def test_nulls_and_unicode(seeded_url: str, tmp_path: Path) -> None:
    with db.connect(seeded_url) as conn:
        conn.execute(
            "INSERT INTO glossary VALUES ('Ŋgqoko splice ✓', 'splicing_testing', "
            "'A splice naïvely named with “quotes”, ünïcödé and emoji 🚧.', '{}')"
        )
        conn.execute("UPDATE tasks SET assignee = NULL")
        conn.execute("UPDATE daily_progress SET notes = NULL")
        conn.execute("UPDATE projects SET name = 'Qumbu Ñandú “Phase” 1' WHERE id = (SELECT min(id) FROM projects)")
    m = _build(seeded_url, tmp_path)
    train = _rows(m, "terminology", "train")
    assert any(r["term"] == "Ŋgqoko splice ✓" and "🚧" in r["answer"] for r in train)
    qa = _rows(m, "grounded_qa", "train") + _rows(m, "grounded_qa", "test")
    assert any("Ñandú" in r["question"] for r in qa)
    assert all("None" not in c for r in qa for c in r["contexts"])


def test_database_lost_mid_build_leaves_nothing(seeded_url: str, tmp_path: Path) -> None:
    """Kill the build's backend while it streams: a clear error, no version folder, no LATEST."""
    cfg = load_data_config({"output_dir": str(tmp_path), "cursor_rows": 1})
    conn = db.connect(seeded_url)
    pid = conn.info.backend_pid
    original = build.SplitWriter.write
    calls = {"n": 0}

    def slow_write(self, row):  # slow the build down so the kill lands mid-stream
        calls["n"] += 1
        if calls["n"] == 50:
            with psycopg.connect(seeded_url, autocommit=True) as killer:
                killer.execute("SELECT pg_terminate_backend(%s)", (pid,))
            time.sleep(0.2)
        original(self, row)

    build.SplitWriter.write = slow_write
    try:
        with pytest.raises(DatasetBuildError, match="nothing was written"):
            build.build(conn, cfg, progress=False)
    finally:
        build.SplitWriter.write = original
        conn.close()
    assert calls["n"] >= 50  # the kill happened mid-stream
    assert list(tmp_path.iterdir()) == []


def test_builds_on_plain_postgres_by_url(pg15_url: str, tmp_path: Path) -> None:
    from fibreflow.datasets.seed import load_seed_config, seed

    with db.connect(pg15_url) as conn:
        db.migrate(conn)
        seed(conn, load_seed_config({"scale": 1, "projects_per_scale": 2, "seed": 7}), progress=False)
    m = read_manifest(_build(pg15_url, tmp_path))
    assert m.split("grounded_qa", "test").rows > 0
    assert m.database.server_version.startswith("15")


def test_same_data_same_version_on_both_servers(seeded_url: str, pg15_url: str, tmp_path: Path) -> None:
    from fibreflow.datasets.seed import load_seed_config, seed

    with db.connect(pg15_url) as conn:
        db.migrate(conn)
        seed(conn, load_seed_config({"scale": 1, "projects_per_scale": 2, "seed": 7}), progress=False)
    assert _build(pg15_url, tmp_path / "a").name == _build(seeded_url, tmp_path / "b").name


def test_logged_as_mlflow_inputs_under_an_active_run(seeded_url: str, tmp_path: Path) -> None:
    import mlflow

    mlflow.set_tracking_uri(f"sqlite:///{tmp_path / 'mlflow.db'}")
    exp = mlflow.create_experiment("t", artifact_location=str(tmp_path / "artifacts"))
    path = _build(seeded_url, tmp_path / "data")
    m = read_manifest(path)
    with mlflow.start_run(experiment_id=exp) as run:
        build.log_to_mlflow(path)
    got = mlflow.get_run(run.info.run_id)
    names = {d.dataset.name for d in got.inputs.dataset_inputs}
    assert names == {
        "fibreflow-terminology-train",
        "fibreflow-terminology-validation",
        "fibreflow-terminology-test",
        "fibreflow-grounded_qa-train",
        "fibreflow-grounded_qa-test",
        "fibreflow-assistant-train",
        "fibreflow-assistant-test",
    }
    assert got.data.tags["dataset_version"] == m.version
    digests = {d.dataset.name: d.dataset.digest for d in got.inputs.dataset_inputs}
    assert digests["fibreflow-terminology-train"] == m.split("terminology", "train").sha256[:16]


def test_assistant_conversations_are_held_out_by_project_and_phrasing(seeded_url: str, tmp_path: Path) -> None:
    """No test project, test phrasing or test made-up term in training; every conversation's tool result is what
    the tool returns on the records; every test question has its expected call and its answer. A recovery's wrong
    call is marked not to be learned and is followed by its tool's own error."""
    from fibreflow.datasets.tools import ToolError, run_tool

    m = _build(seeded_url, tmp_path, **{"grounded_qa.test_fraction": 0.5})
    cfg = load_data_config().assistant
    train, test = _rows(m, "assistant", "train"), _rows(m, "assistant", "test")
    test_projects = set(read_manifest(m).grounded_qa_test_projects)
    assert test_projects and {r["project_id"] for r in test if r["project_id"]} == test_projects
    train_text = json.dumps(train)
    assert not any(pid in train_text for pid in test_projects)
    with db.connect(seeded_url) as conn:
        names = dict(conn.execute("SELECT id, name FROM projects").fetchall())
    assert not any(names[pid] in train_text for pid in test_projects)
    by_name = [r for r in train + test if r["project_id"] and names[r["project_id"]] in r["question"]
               and r["project_id"] not in r["question"]]  # fmt: skip
    assert {r["family"] for r in by_name} >= {"project_status", "boq_total"} and any(r in test for r in by_name)
    for family, phrasings in cfg.questions.items():
        train_q = [r["question"] for r in train if r["family"] == family]
        test_q = [r["question"] for r in test if r["family"] == family]
        assert train_q and test_q, family
        shapes = [re.compile(re.sub(r"\\\{\w+\\\}", ".+", re.escape(p)) + "$") for p in phrasings.test]
        assert not [q for q in train_q if any(s.match(q) for s in shapes)], family
        assert all(any(s.match(q) for s in shapes) for q in test_q), family
    made_up = {r["question"] for r in train if r["family"] == "made_up_term"}
    assert made_up and not made_up & {r["question"] for r in test if r["family"] == "made_up_term"}
    train_terms = {r["answer"] for r in train if r["family"] == "made_up_term"}
    assert not train_terms & {r["answer"] for r in test if r["family"] == "made_up_term"}
    recoveries = [r for r in train + test if r["family"] == "recovery"]
    train_projects = {r["project_id"] for r in train if r["project_id"]}
    assert len(recoveries) == cfg.recoveries * len(train_projects) and all(r in train for r in recoveries)
    assert all(m["weight"] is None for r in train + test if "recovery" not in r["family"] for m in r["messages"])
    refused = [r for r in train + test if r["family"] == "refusal_recovery"]  # a made-up term taken for a project
    assert cfg.refusal_recoveries and len(refused) == cfg.refusal_recoveries and all(r in train for r in refused)
    assert {r["answer"] for r in refused} <= train_terms and not {r["question"] for r in refused} & made_up
    drills = [r for r in train + test if r["family"] == "drill"]  # a question again, learned up to its call only
    by_id = {r["id"]: r for r in train}
    asked = [r for r in train if r["project_id"] and r["family"] not in ("drill", "name_drill", "recovery")]
    assert cfg.call_drills and len(drills) == cfg.call_drills * len(asked) and all(r in train for r in drills)
    for r in drills:
        first = by_id[r["id"].rsplit("-", 1)[0]]
        assert [x["role"] for x in r["messages"]] == ["system", "user", "assistant"]
        (call,), (its,) = r["messages"][2]["tool_calls"], first["messages"][2]["tool_calls"]
        a, b = (json.loads(c["function"]["arguments"]) for c in (call, its))  # the project by its id or its name
        assert call["function"]["name"] == its["function"]["name"] and r["question"] != first["question"]
        refs = (r["project_id"], names[r["project_id"]])
        assert a.pop("project_id") in refs and b.pop("project_id") in refs and a == b
        shapes = [re.sub(r"\\\{\w+\\\}", ".+", re.escape(p)) + "$" for p in cfg.questions[first["family"]].test]
        assert not any(re.match(s, r["question"]) for s in shapes)
    named = [r for r in train + test if r["family"] == "name_drill"]  # a question about a made-up project
    assert cfg.made_up_projects and len(named) == cfg.made_up_projects.per_project * len(train_projects)
    assert all(r in train for r in named) and len({by_id[r["id"].rsplit("-", 1)[0]]["family"] for r in named}) > 4
    with db.connect(seeded_url) as conn:
        for r in named:
            first = by_id[r["id"].rsplit("-", 1)[0]]
            (call,), (its,) = r["messages"][2]["tool_calls"], first["messages"][2]["tool_calls"]
            a, b = (json.loads(c["function"]["arguments"]) for c in (call, its))
            made_up = a.pop("project_id")
            b.pop("project_id")
            assert made_up in r["question"] and r["project_id"] not in r["question"] and a == b
            assert not any(made_up.split()[0].lower() in n.lower() for n in names.values())
            with pytest.raises(ToolError, match="no project"):
                run_tool(conn, call["function"]["name"], json.loads(call["function"]["arguments"]))
        as_of = conn.execute("SELECT value->>'as_of' FROM fibreflow_meta WHERE key = 'data_source'").fetchone()[0]
        for r in train + test:
            msgs = r["messages"]
            if r["family"] in ("drill", "name_drill"):
                continue
            if r["family"] in ("made_up_term", "unanswerable", "glossary"):
                assert [x["role"] for x in msgs] == ["system", "user", "assistant"] and r["tools"]
                continue
            if r["family"] == "refusal_recovery":  # the wrong call (not learned), its tool's error, the refusal
                f = msgs[2]["tool_calls"][0]["function"]
                assert msgs[2]["weight"] == 0 and msgs[4]["weight"] is None and msgs[4]["content"] == r["answer"]
                with pytest.raises(ToolError, match="no project") as refused_call:
                    run_tool(conn, f["name"], json.loads(f["arguments"]))
                head, _, listed = str(refused_call.value).partition("; closest projects: ")
                kept = [p for p in listed.split(", ") if p.split(" ")[0] not in test_projects]  # none held out
                assert kept and msgs[3]["content"] == f"error: {head}; closest projects: {', '.join(kept)}"
                continue
            if r["family"] == "recovery":
                wrong, error, right = msgs[2], msgs[3], msgs[4]
                assert wrong["weight"] == 0 and right["weight"] is None
                f = wrong["tool_calls"][0]["function"]
                assert f["name"] == right["tool_calls"][0]["function"]["name"]
                with pytest.raises(ToolError) as refused:
                    run_tool(conn, f["name"], json.loads(f["arguments"]))
                assert error == {"role": "tool", "tool_call_id": "call_0", "content": f"error: {refused.value}",
                                 "tool_calls": None, "weight": None}  # fmt: skip
                msgs = [*msgs[:2], *msgs[4:]]
            call = msgs[2]["tool_calls"][0]["function"]
            result = json.loads(msgs[3]["content"])
            args = json.loads(call["arguments"])
            if r in by_name:  # asked by its name: the call passes the name, the answer cites the id
                assert args["project_id"] == names[r["project_id"]] and r["project_id"] in msgs[3]["content"]
            if r["family"] == "progress_recent":  # a period as of the data's date, not dates the model works out
                assert args["period"] in r["question"].replace(" ", "_") and "start" not in args
                assert result["as_of"] == as_of and result["period"] == args["period"]
            if call["name"] != "search_records":
                assert result == run_tool(conn, call["name"], json.loads(call["arguments"])).data
            else:  # RAFT: the asked pole's record among distractors of the same project
                records = result["records"]
                assert len(records) == 4 and len({x["record_id"] for x in records}) == 4
                pole = json.loads(call["arguments"])["query"].removeprefix("pole ")
                right = [x for x in records if x["content"].startswith(f"Pole {pole} ")]
                assert len(right) == 1 and msgs[4]["content"].endswith(f"[{right[0]['record_id']}].")
            assert msgs[4]["content"] == r["answer"] and r["project_id"] in r["answer"]
    rows = [json.loads(x) for x in (m / "accuracy_test.jsonl").read_text().splitlines()]
    calls = [x for x in rows if x["kind"] == "tool_call"]
    assert len(calls) == len([r for r in test if r["project_id"]])
    assert all(x["tools"] for x in rows if "assistant" in x["tags"])
    assert {x["id"].removesuffix("-call") for x in calls} == {
        x["id"].removesuffix("-answer") for x in rows if "grounded" in x["tags"]
    }


def test_a_made_up_project_is_in_no_projects_place(seeded_url: str) -> None:
    """A name drill's project is named after a place no project's name holds, and the build stops, saying what to
    do, when every place is taken."""
    from fibreflow.datasets.assistant import made_up_project

    with db.connect(seeded_url) as conn:
        taken = conn.execute("SELECT split_part(name, ' ', 1) FROM projects ORDER BY id LIMIT 1").fetchone()[0]
        with pytest.raises(DatasetBuildError, match="add places"):
            made_up_project(conn, [taken], "0" * 64)
        assert made_up_project(conn, [taken, "Ballito"], "0" * 64) == "ballito north ftth phase 1"


def test_projects_that_share_a_name_are_asked_by_their_id(seeded_url: str, tmp_path: Path) -> None:
    """At scale, names repeat (the seed at scale 100 has 1,000 projects): a project whose name another bears is
    asked about by its id only, so that every call resolves to the project its answer is about."""
    with db.connect(seeded_url) as conn:
        (a, name), (b, _) = conn.execute("SELECT id, name FROM projects ORDER BY id LIMIT 2").fetchall()
        conn.execute("UPDATE projects SET name = %s WHERE id = %s", (name, b))
    m = _build(seeded_url, tmp_path)
    rows = [r for split in ("train", "test") for r in _rows(m, "assistant", split)
            if r["project_id"] in (a, b) and r["family"] != "name_drill"]  # fmt: skip
    calls = [json.loads(r["messages"][2]["tool_calls"][0]["function"]["arguments"]) for r in rows
             if r["messages"][2].get("tool_calls")]  # fmt: skip
    assert len(calls) == len(rows) > 0
    assert all(c["project_id"] in (a, b) for c in calls)
    assert not [r["question"] for r in rows if r["project_id"] not in r["question"]]  # never by the name alone


def test_loads_back_as_hf_datasets(seeded_url: str, tmp_path: Path) -> None:
    path = _build(seeded_url, tmp_path)
    ds = build.load_datasets(path)
    assert set(ds["terminology"]) == {"train", "validation", "test"}
    assert ds["terminology"]["train"].num_rows == read_manifest(path).split("terminology", "train").rows
    assert ds["grounded_qa"]["test"][0]["messages"][-1]["role"] == "assistant"


def test_training_projects_take_the_fixed_lists_in_turn(seeded_url: str) -> None:
    """Across training projects every pole status, task status, BOQ category and relative period is asked about
    (picked at random, the demo's 16 category questions had left cabling out, its period questions 'yesterday');
    a test project's are picked at random whatever its place."""
    from collections import defaultdict

    from fibreflow.datasets.assistant import PERIODS, project_asks
    from fibreflow.datasets.tools import BOQ_CATEGORY, POLE_STATUS_NAMES, TASK_STATUS_NAMES

    families = ("pole_counts", "boq_category", "task_status", "progress_recent")
    cfg = load_data_config({f"assistant.per_project.{f}": 2 for f in families}).assistant
    with db.connect(seeded_url) as conn:
        pid, name = conn.execute("SELECT id, name FROM projects ORDER BY id LIMIT 1").fetchone()

        def asked(nth: int | None) -> dict[str, set[str]]:
            out: dict[str, set[str]] = defaultdict(set)
            for ask in project_asks(conn, {"id": pid, "name": name}, cfg, nth):
                if ask.family in families:
                    a = ask.arguments
                    out[ask.family].add(a.get("status") or a.get("category") or a["period"])
            return out

        taught: dict[str, set[str]] = defaultdict(set)
        for nth in range(4):  # 4 projects of 2 questions: the longest list, BOQ's 8 categories
            for family, values in asked(nth).items():
                assert len(values) == 2, family
                taught[family] |= values
        assert asked(None) == asked(None) and all(len(v) == 2 for v in asked(None).values())
    assert taught == {"pole_counts": set(POLE_STATUS_NAMES), "boq_category": set(BOQ_CATEGORY.values()),
                      "task_status": set(TASK_STATUS_NAMES), "progress_recent": set(PERIODS)}  # fmt: skip
