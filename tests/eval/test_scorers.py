"""Scorers per kind, table-tested, including the numerics and units users actually write."""

from __future__ import annotations

import pytest
from fibreflow.core.numbers import numbers
from fibreflow.eval.scorers import normalise, score
from fibreflow.eval.testset import Sample


def _s(kind: str, reference: str, **kw) -> Sample:
    return Sample(id="x", question="q?", reference=reference, kind=kind, **kw)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("  Hello,   World! ", "hello world"),
        ("On-Hold.", "on hold"),
        ("R 1,200.50", "r 1200.50"),
        ("3.5 m²", "3.5 m²"),
    ],
)
def test_normalise(text: str, expected: str) -> None:
    assert normalise(text) == expected


@pytest.mark.parametrize(
    ("text", "values"),
    [
        ("R 1 200", [(1200.0, "r")]),
        ("1,200 poles", [(1200.0, None)]),
        ("2 834 037.29 ZAR", [(2834037.29, "zar")]),
        ("1.2 km of duct", [(1.2, "km")]),
        ("project PRJ-0003 on 2025-08-11 planted 100 poles", [(100.0, None)]),
        ("in 2025-09 (task:2025-09-", []),  # a month, and a date cut short, are dates too
        ("12%", [(12.0, "%")]),
        ("no numbers here", []),
    ],
)
def test_numbers_with_units(text: str, values: list) -> None:
    assert [(q.value, q.unit) for q in numbers(text)] == values


@pytest.mark.parametrize(
    ("sample", "answer", "expected"),
    [
        (_s("exact", "On hold"), "on hold.", 1.0),
        (_s("exact", "On hold"), "It is on hold", 0.0),
        (_s("contains", "completed"), "Project PRJ-0003 is Completed; target 2026-07-12.", 1.0),
        (_s("contains", "completed"), "It is incomplete.", 0.0),  # whole words only
        (_s("numeric", "1200"), "The total is R 1 200.", 1.0),
        (_s("numeric", "1200"), "1,200", 1.0),
        (_s("numeric", "1200", unit="m"), "about 1.2 km", 1.0),  # km converted to the reference's metres
        (_s("numeric", "1200", unit="m"), "1200 m²", 0.0),  # an area is not a length
        (_s("numeric", "2834037.29", unit="ZAR"), "R 2,834,037.29", 1.0),
        (_s("numeric", "2834037.29", unit="ZAR"), "R 2,834,037", 0.0),  # no tolerance given: exact
        (_s("numeric", "1030.1", tolerance={"abs": 0.5}), "1030.5 metres", 1.0),
        (_s("numeric", "1000", tolerance={"rel": 0.01}), "1,009", 1.0),
        (_s("numeric", "1000", tolerance={"rel": 0.01}), "1,011", 0.0),
        (_s("numeric", "3"), "Project PRJ-0003 has 4 poles dressed", 0.0),  # the id is not the answer
        (_s("choice", "planted", choices=["planted", "dressed"]), "They are planted.", 1.0),
        (_s("choice", "planted", choices=["planted", "dressed"]), "planted or dressed", 0.0),
        (_s("open", "ADSS: an aerial cable", keywords=["all-dielectric", "hangs"]), "All-dielectric; it hangs.", 1.0),
        (_s("open", "ADSS: an aerial cable", keywords=["all-dielectric", "hangs"]), "An aerial cable.", 0.0),
    ],
)
def test_score(sample: Sample, answer: str, expected: float) -> None:
    assert score(sample, answer) == expected
