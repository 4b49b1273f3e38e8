"""The quantities in a text, and which of them no source holds: one reading of numbers for the scorers (a numeric
answer, units converted) and for the tool loop's check that every number it passes on came from the records.

Project ids and dates are not quantities ("PRJ-0003", "2025-08-11", the month "2025-08"); "R 1 200", "1,200" and
"1 200 m" are 1200.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from typing import NamedTuple

# unit -> (dimension, factor to the dimension's base unit)
UNITS: dict[str, tuple[str, float]] = {
    "m": ("length", 1.0),
    "metre": ("length", 1.0),
    "metres": ("length", 1.0),
    "meter": ("length", 1.0),
    "meters": ("length", 1.0),
    "km": ("length", 1000.0),
    "kilometre": ("length", 1000.0),
    "kilometres": ("length", 1000.0),
    "m²": ("area", 1.0),
    "m2": ("area", 1.0),
    "sqm": ("area", 1.0),
    "r": ("money", 1.0),
    "zar": ("money", 1.0),
    "rand": ("money", 1.0),
    "%": ("percent", 1.0),
}
_IDS = re.compile(r"\b[A-Z]{2,}-\d+\b|\b\d{4}-\d{2}(?:-\d{2})?\b")  # PRJ-0003, 2025-08-11, 2025-08: not quantities
_NUMBER = re.compile(
    r"(?P<cur>\bR|\bZAR)?\s?"
    r"(?P<num>-?(?:\d{1,3}(?:[,\u00a0\u202f ]\d{3})+|\d+)(?:\.\d+)?)"
    r"(?:\s?(?P<unit>km|kilometres?|metres?|meters?|m²|m2|sqm|m|%|zar|rand)\b|(?P<pct>%))?",
    re.IGNORECASE,
)
SAME = 0.005  # two values within half a cent are the same number ("R 1,234.50" is 1234.5)


class Quantity(NamedTuple):
    value: float
    unit: str | None


def numbers(text: str) -> list[Quantity]:
    """Every quantity in a text, with its unit if one is attached ("R 1 200" -> 1200 r)."""
    out = []
    for m in _NUMBER.finditer(_IDS.sub(" ", text)):
        value = float(re.sub(r"[,\u00a0\u202f ]", "", m.group("num")))
        unit = m.group("unit") or m.group("pct") or m.group("cur")
        out.append(Quantity(value, unit.lower() if unit else None))
    return out


def unsupported(text: str, sources: Iterable[str]) -> list[float]:
    """The numbers in `text` that none of `sources` holds (within `SAME`), first seen first: for an answer and
    the tool results (and question) it was given, the numbers it made up."""
    seen = [q.value for source in sources for q in numbers(source)]
    said = dict.fromkeys(q.value for q in numbers(text))
    return [v for v in said if not any(abs(v - s) <= SAME for s in seen)]
