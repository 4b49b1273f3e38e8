"""Test-set files: the shipped format loads; bad lines fail naming the line and the field."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from fibreflow.eval.testset import TestSetError, load_test_set

GOOD = {"id": "a", "question": "q?", "reference": "12", "kind": "numeric", "unit": "m", "tolerance": {"abs": 1}}


def _write(tmp_path: Path, lines: list) -> Path:
    path = tmp_path / "set.jsonl"
    path.write_text("\n".join(x if isinstance(x, str) else json.dumps(x) for x in lines) + "\n")
    return path


def test_a_good_file_loads(tmp_path: Path) -> None:
    samples = load_test_set(_write(tmp_path, [GOOD, "", {**GOOD, "id": "b", "kind": "open", "tags": ["t"]}]))
    assert [s.id for s in samples] == ["a", "b"] and samples[0].tolerance.abs == 1


@pytest.mark.parametrize(
    ("lines", "message"),
    [
        ([GOOD, "{not json"], r"line 2: invalid JSON"),
        ([{k: v for k, v in GOOD.items() if k != "question"}], r"line 1: field 'question'"),
        ([{**GOOD, "kind": "fuzzy"}], r"line 1: field 'kind'"),
        ([{**GOOD, "refrence": "x"}], r"line 1: field 'refrence'"),
        ([{**GOOD, "reference": "twelve"}], r"line 1: .*not a number"),
        ([{**GOOD, "kind": "choice"}], r"line 1: .*needs `choices`"),
        ([GOOD, GOOD], r"line 2: id 'a' already used on line 1"),
        (["[1, 2]"], r"line 1: expected a JSON object"),
        ([""], r"no samples"),
    ],
)
def test_bad_files_name_line_and_field(tmp_path: Path, lines: list, message: str) -> None:
    with pytest.raises(TestSetError, match=message):
        load_test_set(_write(tmp_path, lines))


@pytest.mark.integration
def test_the_built_accuracy_set_loads(seeded_url: str, tmp_path: Path) -> None:
    """The accuracy set #2 builds from the database is in this format, every kind present scores."""
    from fibreflow.core import db
    from fibreflow.datasets import build
    from fibreflow.datasets.config import load_data_config
    from fibreflow.eval.scorers import score

    cfg = load_data_config({"output_dir": str(tmp_path)})
    with db.connect(seeded_url) as conn:
        path = build.build(conn, cfg, progress=False)
    samples = load_test_set(path / "accuracy_test.jsonl")
    assert {s.kind for s in samples} >= {"open", "contains", "numeric"}
    for s in samples:
        assert score(s, s.reference) == 1.0 or (s.kind == "open" and s.keywords is None), s.id
