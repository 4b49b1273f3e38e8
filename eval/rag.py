"""Prompts for evaluation: a grounded question gets the records retrieved for it (RAG), any other just the question.

Retrieval is the serving path's: top-k from pgvector within the row's filters (`fibreflow.datasets.retrieval`).
The prompt is the one grounded-QA training uses (`rag_messages`), and the contexts actually put into the prompt
are what RAGAS judges (retrieved_contexts), next to the row's own contexts (reference_contexts).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from fibreflow.eval.config import Rag
from fibreflow.eval.generators import Conversation
from fibreflow.eval.testset import Sample


@dataclass(frozen=True)
class Prompt:
    conversation: Conversation
    contexts: list[str] = field(default_factory=list)  # what the model was shown
    record_ids: list[str] = field(default_factory=list)  # retrieved records, best first


def grounded(sample: Sample) -> bool:
    """A question answered from records: it comes with the records its answer is in."""
    return bool(sample.contexts)


def build_prompts(samples: list[Sample], system: str, rag: Rag, database_url: str | None = None) -> list[Prompt]:
    """One prompt per sample. `retrieve` needs the database (with `fibreflow embed` done); `given` uses the row's
    contexts (an upper bound: perfect retrieval); `off` asks grounded questions without records."""
    from fibreflow.datasets.grounded_qa import rag_messages

    plain = [{"role": "system", "content": system}] if system else []
    need = [s for s in samples if grounded(s)] if rag.mode == "retrieve" else []
    found = _retrieve(need, rag.k, database_url) if need else {}
    out = []
    for s in samples:
        if not grounded(s) or rag.mode == "off":
            out.append(Prompt([*plain, {"role": "user", "content": s.question}]))
            continue
        ids, contexts = found[s.id] if rag.mode == "retrieve" else ([], list(s.contexts))
        messages = rag_messages(system, s.question, contexts, "")[:-1]
        out.append(Prompt(messages if system else messages[1:], contexts, ids))
    return out


def _retrieve(samples: list[Sample], k: int, database_url: str | None) -> dict[str, tuple[list[str], list[str]]]:
    """sample id -> (record ids, contents) of the top-k records within its filters."""
    from fibreflow.core.db import connect, load_db_config
    from fibreflow.core.db import database_url as configured_url
    from fibreflow.datasets.embed import embedder_for, load_embed_config
    from fibreflow.datasets.retrieval import Retriever

    embed_cfg = load_embed_config()
    db_cfg = load_db_config()
    embedder = embedder_for(embed_cfg)
    vectors = embedder.encode([s.question for s in samples])
    with connect(database_url or configured_url(db_cfg), timeout_s=db_cfg.connect_timeout_s) as conn:
        retriever = Retriever(embedder, embed_cfg.table, embed_cfg.ef_search)
        out = {}
        for s, v in zip(samples, vectors, strict=True):
            hits = retriever.search_vector(conn, v, k, s.filters.to_filters())
            out[s.id] = ([h.record_id for h in hits], [h.content for h in hits])
    return out
