"""Accuracy test sets: JSONL, one question per line, validated with the line and field at fault named.

Format (README "Accuracy test-set format"): id, question, reference, kind (exact | contains | numeric | choice |
open), and optionally contexts, filters, tags, unit, tolerance {abs, rel}, choices, keywords.
"""

from __future__ import annotations

import datetime as dt
import json
from pathlib import Path
from typing import TYPE_CHECKING, Literal

from fibreflow.core.errors import FibreFlowError
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

if TYPE_CHECKING:
    from fibreflow.datasets.retrieval import Filters

Kind = Literal["exact", "contains", "numeric", "choice", "open", "tool_call"]


class TestSetError(FibreFlowError):
    """A test-set file that cannot be used as it is."""


class Tolerance(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    abs: float = Field(0.0, ge=0)
    rel: float = Field(0.0, ge=0)


class RetrievalFilters(BaseModel):
    """Where a grounded question's answer may come from (the RAG path retrieves within these)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    project_id: str | None = None
    region: str | None = None
    record_type: str | None = None
    date_from: dt.date | None = None
    date_to: dt.date | None = None

    def to_filters(self) -> Filters:
        from fibreflow.datasets.retrieval import Filters

        return Filters(**self.model_dump())


class Sample(BaseModel):
    """One test question. Unknown fields are refused, so a misspelt optional field cannot pass silently."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    id: str = Field(min_length=1)
    question: str = Field(min_length=1)
    reference: str
    kind: Kind
    contexts: list[str] = []
    filters: RetrievalFilters = RetrievalFilters()
    tags: list[str] = []
    unit: str | None = None
    tolerance: Tolerance = Tolerance()
    choices: list[str] | None = None
    keywords: list[str] | None = None
    tools: bool = False  # asked through the tool loop (datasets/agent.py) with FibreFlow's tools offered

    @property
    def refusal(self) -> bool:
        """Right when the answer admits not knowing: a made-up term, a question the records cannot answer."""
        return bool({"unknown_term", "made_up_term", "unanswerable"} & set(self.tags))

    @model_validator(mode="after")
    def _kind_fields(self) -> Sample:
        if self.kind == "numeric":
            from fibreflow.core.numbers import numbers

            if not numbers(self.reference):
                raise ValueError(f"reference {self.reference!r} is not a number (kind numeric)")
        if self.kind == "choice" and not self.choices:
            raise ValueError("kind choice needs `choices`")
        if self.kind == "tool_call":
            from fibreflow.eval.scorers import expected_call

            expected_call(self.reference)
            if not self.tools:
                raise ValueError("kind tool_call needs `tools: true` (the question is asked with the tools offered)")
        return self


def load_test_set(path: str | Path) -> list[Sample]:
    """All samples of a JSONL file; the first bad line fails with its number and the field at fault."""
    p = Path(path)
    if not p.is_file():
        raise TestSetError(f"test set {p} not found")
    samples: list[Sample] = []
    seen: dict[str, int] = {}
    for n, line in enumerate(p.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            raw = json.loads(line)
        except json.JSONDecodeError as exc:
            raise TestSetError(f"{p.name} line {n}: invalid JSON ({exc.msg} at column {exc.colno})") from None
        if not isinstance(raw, dict):
            raise TestSetError(f"{p.name} line {n}: expected a JSON object, got {type(raw).__name__}")
        try:
            sample = Sample.model_validate(raw)
        except ValidationError as exc:
            err = exc.errors()[0]
            field = ".".join(str(x) for x in err["loc"]) or "<object>"
            raise TestSetError(f"{p.name} line {n}: field {field!r}: {err['msg']}") from None
        if sample.id in seen:
            raise TestSetError(f"{p.name} line {n}: id {sample.id!r} already used on line {seen[sample.id]}")
        seen[sample.id] = n
        samples.append(sample)
    if not samples:
        raise TestSetError(f"{p.name}: no samples")
    return samples
