"""Accuracy scorers per test-set kind, with the normalisation users expect. Pure functions.

exact    normalised answer == normalised reference (case, punctuation, whitespace ignored)
contains the normalised reference appears in the answer as whole words
numeric  some number in the answer equals the reference within tolerance, after units are converted
         ("R 1 200", "1,200", "1.2 km" for 1200 m); project ids and dates are not numbers
choice   the answer names the reference and no other choice
open     every keyword appears (when the sample has keywords), else like contains
tool_call the model's first tool call (the answer: {"name", "arguments"} as JSON) names the reference's tool with
         the same arguments once both are normalised by the tool ("prj-3" = "PRJ-0003", dates as dates; a record
         search's free-text query is not compared, its filters are)
A sample tagged `unknown_term`, `made_up_term` or `unanswerable` is right when the answer admits not knowing.
"""

from __future__ import annotations

import json
import re
from typing import TYPE_CHECKING, Any

from fibreflow.core.numbers import UNITS, Quantity, numbers

if TYPE_CHECKING:
    from fibreflow.eval.testset import Sample

REFUSAL = re.compile(
    r"\b(don't|do not|doesn't|does not) know\b|\bnot (in|part of) fibreflow|\bnot familiar\b|\bno information\b", re.I
)


def normalise(text: str) -> str:
    """Lower case; punctuation and underscores to spaces (a decimal point or thousands comma inside a number
    stays); one space between words."""
    s = text.lower()
    s = re.sub(r"(?<=\d)[,.](?=\d)", lambda m: "\0" if m.group() == "." else "", s)
    s = re.sub(r"[^\w\s\0²%]|_", " ", s).replace("\0", ".")
    return " ".join(s.split())


def _in_unit(q: Quantity, unit: str | None) -> float | None:
    """q's value in `unit`; None when the units measure different things."""
    if q.unit is None or unit is None or unit.lower() not in UNITS or q.unit not in UNITS:
        return q.value
    (dim_a, fa), (dim_b, fb) = UNITS[q.unit], UNITS[unit.lower()]
    return q.value * fa / fb if dim_a == dim_b else None


def numeric_match(answer: str, reference: str, unit: str | None, abs_tol: float, rel_tol: float) -> bool:
    ref = numbers(reference)[0].value
    allowed = max(abs_tol, rel_tol * abs(ref), 1e-9)
    return any(v is not None and abs(v - ref) <= allowed for v in (_in_unit(q, unit) for q in numbers(answer)))


def _has_words(answer: str, phrase: str) -> bool:
    a, p = f" {normalise(answer)} ", f" {normalise(phrase)} "
    return p.strip() != "" and p in a


def admits_not_knowing(answer: str) -> bool:
    return bool(REFUSAL.search(answer))


def expected_call(reference: str) -> tuple[str, dict[str, Any]]:
    """(tool, normalised arguments) of a tool_call reference; a ValueError saying what is wrong otherwise."""
    try:
        obj = json.loads(reference)
    except ValueError:
        raise ValueError(f"reference {reference!r} is not JSON (kind tool_call)") from None
    if not (isinstance(obj, dict) and isinstance(obj.get("name"), str) and isinstance(obj.get("arguments"), dict)):
        raise ValueError('a tool_call reference is {"name": <tool>, "arguments": {...}}')
    normal = normal_arguments(obj["name"], obj["arguments"])
    if normal is None:
        raise ValueError(f"reference {reference!r}: not a valid call of a FibreFlow tool")
    return obj["name"], normal


def normal_arguments(name: str, arguments: Any) -> dict[str, Any] | None:
    """A call's arguments as the tool validates them (None: not a valid call), without what is not compared."""
    from fibreflow.datasets.tools import TOOLS

    tool = TOOLS.get(name)
    if tool is None or not isinstance(arguments, dict):
        return None
    try:
        args = tool.args.model_validate(arguments).model_dump(mode="json", exclude_none=True)
    except ValueError:
        return None
    return {k: v for k, v in args.items() if not (tool.searches and k in ("query", "k"))}


def call_matches(reference: str, answer: str) -> bool:
    name, want = expected_call(reference)
    try:
        got = json.loads(answer)
    except ValueError:
        return False
    return isinstance(got, dict) and got.get("name") == name and normal_arguments(name, got.get("arguments")) == want


def score(sample: Sample, answer: str) -> float:
    """1.0 if the answer is right for this sample's kind, else 0.0."""
    if sample.refusal:
        ok = admits_not_knowing(answer)
    elif sample.kind == "tool_call":
        ok = call_matches(sample.reference, answer)
    elif sample.kind == "exact":
        ok = normalise(answer) == normalise(sample.reference)
    elif sample.kind == "contains":
        ok = _has_words(answer, sample.reference)
    elif sample.kind == "numeric":
        t = sample.tolerance
        ok = numeric_match(answer, sample.reference, sample.unit, t.abs, t.rel)
    elif sample.kind == "choice":
        named = {c for c in sample.choices or [] if _has_words(answer, c)}
        ok = named == {sample.reference}
    else:
        ok = (
            all(_has_words(answer, k) for k in sample.keywords)
            if sample.keywords
            else _has_words(answer, sample.reference)
        )
    return float(ok)
