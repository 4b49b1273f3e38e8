"""The LLM-judge path end to end: ragas metrics -> openai client -> a scripted judge over real HTTP on loopback.

The judge answers every structured-output request with an instance of the JSON schema that ragas puts in the
prompt; verdicts alternate between repeats (so repeats have a spread). Answers marked MALFORMED get text that
is not JSON, answers marked SLOW are judged after the client's timeout: both must be counted as failures
of their kind and leave the sample unmeasured (None), never scored 0.
"""

from __future__ import annotations

import json
import re
import threading
import time
from collections import Counter
from http.server import BaseHTTPRequestHandler

import pytest
from fibreflow.eval.config import Judge
from fibreflow.eval.metrics import embeddings, judge
from fibreflow.eval.testset import Sample

SCHEMA = re.compile(r"json_schema:\s*(\{.*?\})\s*Make sure", re.S)


def instance(schema: dict, defs: dict, verdict: int) -> object:
    """A minimal valid instance of a JSON schema (objects, arrays of one item, $refs, scalars)."""
    if "$ref" in schema:
        return instance(defs[schema["$ref"].split("/")[-1]], defs, verdict)
    kind = schema.get("type")
    if kind == "object":
        return {k: instance(v, defs, verdict) for k, v in schema.get("properties", {}).items()}
    if kind == "array":
        return [instance(schema["items"], defs, verdict)]
    if kind == "integer":
        return verdict
    if kind == "number":
        return float(verdict)
    if kind == "boolean":
        return False
    return "Fusion splicing joins two fibres with heat."


class Judge_:
    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.seen: Counter[str] = Counter()
        self.requests = 0


def handler(state: Judge_, slow_s: float) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *args) -> None:
            pass

        def do_POST(self) -> None:
            body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
            text = "\n".join(str(m["content"]) for m in body["messages"])
            with state.lock:
                state.requests += 1
                state.seen[text] += 1
                verdict = state.seen[text] % 2  # 1, 0, 1, ... for the same request repeated
            if "SLOW" in text:
                time.sleep(slow_s)
            if "MALFORMED" in text:
                content = "Sure! The verdict is: probably yes {"
            else:
                schema = json.loads(SCHEMA.search(body["messages"][0]["content"]).group(1))
                content = json.dumps(instance(schema, schema.get("$defs", {}), verdict))
            message = {"role": "assistant", "content": content}
            self._send({
                "id": "j", "object": "chat.completion", "created": 0, "model": body["model"],
                "choices": [{"index": 0, "finish_reason": "stop", "message": message}],
                "usage": {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2},
            })  # fmt: skip

        def _send(self, obj: dict) -> None:
            data = json.dumps(obj).encode()
            try:
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)
            except (BrokenPipeError, ConnectionResetError):  # the client gave up (timeout)
                pass

    return Handler


def _sample(i: int, question: str, contexts: list[str]) -> Sample:
    return Sample(id=f"s{i}", question=question, reference="Fusion splicing joins fibres.", kind="open",
                  contexts=contexts)  # fmt: skip


@pytest.fixture(scope="module")
def embedder():
    return embeddings("bundled")


def test_judge_metrics_with_repeats_spread_and_counted_failures(serve, embedder) -> None:
    state = Judge_()
    url = serve(handler(state, slow_s=10.0))
    cfg = Judge(base_url=url, model="llama-3-70b", repeats=3, timeout_s=4.0, concurrency=4,
                metrics=["faithfulness", "answer_relevancy", "factual_correctness"])  # fmt: skip
    ctx = ["Fusion splicing joins two fibres with heat."]
    samples = [
        _sample(0, "What is fusion splicing?", ctx),
        _sample(1, "What is fusion splicing?", ctx),
        _sample(2, "What is fusion splicing?", ctx),
        _sample(3, "What is a drop cable?", []),  # no records: faithfulness does not apply
    ]
    said = "Fusion splicing joins two fibres with heat."
    responses = [said, f"{said} MALFORMED", f"{said} SLOW", said]
    out = judge(cfg, samples, responses, [s.contexts for s in samples], embedder)

    for name in cfg.metrics:
        good = out.scores[name][0]
        assert good is not None and 0.0 <= good <= 1.0, name
        # the malformed and the slow sample are unmeasured, not 0
        assert out.scores[name][1] is None and out.scores[name][2] is None, name
        assert out.failures[name]["unparseable"] == cfg.repeats, name
        assert out.failures[name]["timeout"] == cfg.repeats, name
    assert out.scores["faithfulness"][3] is None  # not applicable without contexts
    assert out.scores["factual_correctness"][3] is not None
    # verdicts alternate between repeats of the same request: the spread shows it
    assert out.spread["faithfulness"][0] > 0
    # every metric x applicable sample x repeat was one counted call
    applicable = {"faithfulness": 3, "answer_relevancy": 4, "factual_correctness": 4}
    assert out.calls == sum(n * cfg.repeats for n in applicable.values())
    assert state.requests > out.calls  # ragas makes several judge requests per metric call


def test_an_unreachable_judge_is_counted_as_http_failures(embedder) -> None:
    cfg = Judge(base_url="http://127.0.0.1:9/v1", model="m", repeats=2, timeout_s=2, metrics=["factual_correctness"])
    out = judge(cfg, [_sample(0, "q", [])], ["a"], [[]], embedder)
    assert out.scores["factual_correctness"] == [None]
    assert out.failures["factual_correctness"] == Counter({"http": 2})
