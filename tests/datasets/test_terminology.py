"""Terminology split by phrasing: pure-function tests on the shipped config and glossary."""

from fibreflow.core.config import load_config
from fibreflow.datasets import terminology as term
from fibreflow.datasets.config import DataConfig
from fibreflow.datasets.seed import glossary_terms

CFG = load_config(DataConfig, "data")
GLOSSARY = sorted(glossary_terms(), key=lambda t: t["term"])


def _split(split: str) -> list[dict]:
    rows = [ex for i, r in enumerate(GLOSSARY) for ex in term.term_examples(CFG.terminology, "sys", i, r, split)]
    return rows + term.unknown_examples(CFG.terminology, "sys", split)


def _shape(row: dict) -> str:
    # the phrasing with the asked-about name (term or alias) replaced by the slot
    g = next((g for g in GLOSSARY if g["term"] == row["term"]), None)
    names = [row["term"], *(g["aliases"] if g else [])]
    q = row["question"]
    for n in sorted(names, key=len, reverse=True):
        q = q.replace(n, "{term}")
    return term.shape(q)


def test_every_known_term_is_taught() -> None:
    taught = {r["term"] for r in _split("train") if r["known"]}
    assert taught == {g["term"] for g in GLOSSARY}
    assert {r["term"] for r in _split("test") if r["known"]} <= taught


def test_test_phrasings_never_appear_in_training() -> None:
    train, test = _split("train"), _split("test")
    assert not {r["question"] for r in train} & {r["question"] for r in test}
    assert not {_shape(r) for r in train} & {_shape(r) for r in test}
    assert not {_shape(r) for r in _split("validation")} & {_shape(r) for r in test}


def test_unknown_terms_are_absent_from_glossary_and_training() -> None:
    known = {g["term"].lower() for g in GLOSSARY} | {a.lower() for g in GLOSSARY for a in g["aliases"]}
    unknown_test = {r["term"] for r in _split("test") if not r["known"]}
    assert unknown_test and not {t.lower() for t in unknown_test} & known
    train_text = " ".join(r["question"] + r["answer"] for r in _split("train"))
    assert not any(t in train_text for t in unknown_test)
    refusals = [r for r in _split("train") if not r["known"]]
    assert refusals and all("don't know" in r["answer"] for r in refusals)


def test_examples_are_chat_format_with_the_definition() -> None:
    ex = _split("train")[0]
    assert [m["role"] for m in ex["messages"]] == ["system", "user", "assistant"]
    definition = next(g["definition"] for g in GLOSSARY if g["term"] == ex["term"])
    assert definition in ex["messages"][2]["content"]


def test_keywords_are_the_rarest_content_words() -> None:
    df = {"fibre": 50, "reflectometer": 1, "pulses": 2, "light": 20, "sends": 9, "down": 30}
    assert term.keywords("A reflectometer sends light pulses down the fibre", df, 2) == [
        "reflectometer",
        "pulses",
    ]
    assert term.keywords("the of and", df) == []
