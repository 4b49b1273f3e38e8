"""Terminology SFT examples from the glossary: taught with some phrasings, tested with others.

Pure functions: glossary rows in, chat examples out. The split is by *phrasing*: every real term is in
training; validation and test ask the same terms with templates and aliases that training never uses.
"""

from __future__ import annotations

import re
from typing import Any

from fibreflow.core.config import Strict
from pydantic import model_validator

STOPWORDS = frozenset(
    [
        "a",
        "an",
        "the",
        "and",
        "or",
        "of",
        "to",
        "in",
        "on",
        "for",
        "by",
        "with",
        "from",
        "at",
        "as",
        "is",
        "are",
        "be",
        "it",
        "its",
        "that",
        "this",
        "which",
        "where",
        "when",
        "each",
        "one",
        "two",
        "used",
        "use",
        "so",
        "such",
        "than",
        "into",
        "their",
        "they",
        "them",
        "over",
        "per",
        "after",
        "before",
        "all",
        "any",
        "can",
        "may",
        "must",
        "not",
        "only",
        "other",
        "out",
        "usually",
        "often",
        "typically",
        "usually",
        "what",
        "who",
        "how",
        "also",
        "without",
        "between",
    ]
)


class UnknownTerms(Strict):
    train: list[str]
    validation: list[str]
    test: list[str]


class TerminologyConfig(Strict):
    phrasings_per_term: int
    train_templates: list[str]
    validation_templates: list[str]
    test_templates: list[str]
    test_alias_template: str
    answer_template: str
    refusal_answer: str
    unknown_terms: UnknownTerms

    @model_validator(mode="after")
    def _disjoint(self) -> TerminologyConfig:
        groups = {
            "train_templates": self.train_templates,
            "validation_templates": self.validation_templates,
            "test_templates": [*self.test_templates, self.test_alias_template],
        }
        seen: dict[str, str] = {}
        for key, templates in groups.items():
            for t in templates:
                if "{" not in t or ("{term}" not in t and "{alias}" not in t):
                    raise ValueError(f"{key}: template {t!r} must contain {{term}}")
                if shape(t) in seen:
                    raise ValueError(f"{key}: template {t!r} also appears in {seen[shape(t)]}")
                seen[shape(t)] = key
        if not 1 <= self.phrasings_per_term <= len(self.train_templates):
            raise ValueError(f"phrasings_per_term must be 1..{len(self.train_templates)}")
        u = self.unknown_terms
        if set(u.train) & set(u.test) or set(u.validation) & set(u.test) or set(u.train) & set(u.validation):
            raise ValueError("unknown_terms: train, validation and test must be disjoint")
        return self


def shape(template_or_question: str) -> str:
    """Normalise a phrasing so that equal templates compare equal (case, spacing, the slot name)."""
    s = template_or_question.replace("{alias}", "{term}").lower()
    return re.sub(r"\s+", " ", s).strip()


def tokens(definition: str) -> list[str]:
    """Distinct content words of a definition, in order."""
    found = re.findall(r"[a-z0-9][a-z0-9\-/.]*[a-z0-9]", definition.lower())
    return list(dict.fromkeys(w for w in found if w not in STOPWORDS and len(w) > 2 and not w.isdigit()))


def keywords(definition: str, document_frequency: dict[str, int], n: int = 3) -> list[str]:
    """The n rarest content words of a definition (across the glossary): what a correct answer must contain."""
    return sorted(tokens(definition), key=lambda w: (document_frequency.get(w, 0), -len(w), w))[:n]


def _chat(system: str, question: str, answer: str) -> list[dict[str, str]]:
    return [
        {"role": "system", "content": system},
        {"role": "user", "content": question},
        {"role": "assistant", "content": answer},
    ]


def answer_for(cfg: TerminologyConfig, row: dict[str, Any]) -> str:
    also = f" Also called {', '.join(row['aliases'])}." if row["aliases"] else ""
    return cfg.answer_template.format(term=row["term"], definition=row["definition"], also=also)


def phrasings(cfg: TerminologyConfig, i: int, row: dict[str, Any], split: str) -> list[str]:
    """The questions asking about glossary row number i in one split ("train" | "validation" | "test")."""
    term, aliases = row["term"], row["aliases"]
    if split == "train":
        n = len(cfg.train_templates)
        out = [cfg.train_templates[(i + j) % n].format(term=term) for j in range(cfg.phrasings_per_term)]
        return out + [cfg.train_templates[i % n].format(term=a) for a in aliases[:1]]
    if split == "validation":
        return [cfg.validation_templates[i % len(cfg.validation_templates)].format(term=term)]
    return [t.format(term=term) for t in cfg.test_templates] + [
        cfg.test_alias_template.format(alias=a) for a in aliases[:1]
    ]


def term_examples(cfg: TerminologyConfig, system: str, i: int, row: dict[str, Any], split: str) -> list[dict[str, Any]]:
    answer = answer_for(cfg, row)
    return [
        {
            "id": f"term-{split}-{i:04d}-{j}",
            "term": row["term"],
            "category": row["category"],
            "known": True,
            "question": q,
            "answer": answer,
            "messages": _chat(system, q, answer),
        }
        for j, q in enumerate(phrasings(cfg, i, row, split))
    ]


def unknown_examples(cfg: TerminologyConfig, system: str, split: str) -> list[dict[str, Any]]:
    """Made-up terms with an "I don't know" answer: teaches and measures admitting ignorance."""
    templates = {
        "train": cfg.train_templates,
        "validation": cfg.validation_templates,
        "test": cfg.test_templates,
    }[split]
    out = []
    for i, term in enumerate(getattr(cfg.unknown_terms, split)):
        q, answer = templates[i % len(templates)].format(term=term), cfg.refusal_answer.format(term=term)
        out.append(
            {
                "id": f"unknown-{split}-{i:04d}",
                "term": term,
                "category": "unknown",
                "known": False,
                "question": q,
                "answer": answer,
                "messages": _chat(system, q, answer),
            }
        )
    return out
