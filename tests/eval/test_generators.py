"""The endpoint generator against a real OpenAI-compatible HTTP server on loopback (canned answers)."""

from __future__ import annotations

import json
import threading
import time
from http.server import BaseHTTPRequestHandler

import pytest
from fibreflow.eval.generators import EndpointGenerator, GenerationError


class Upstream:
    """Answers "echo: <last user message>", after `delay_s`; the first `fail_first` requests get a 500."""

    def __init__(self, delay_s: float = 0.05, fail_first: int = 0) -> None:
        self.delay_s, self.fail_first = delay_s, fail_first
        self.requests = self.in_flight = self.peak = 0
        self.max_tokens: list[int] = []  # each request's
        self.lock = threading.Lock()


def _handler(up: Upstream) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *args) -> None:  # quiet
            pass

        def do_POST(self) -> None:
            body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
            with up.lock:
                up.requests += 1
                up.max_tokens.append(body["max_tokens"])
                n = up.requests
                up.in_flight += 1
                up.peak = max(up.peak, up.in_flight)
            time.sleep(up.delay_s)
            with up.lock:
                up.in_flight -= 1
            if n <= up.fail_first:
                self._send(500, {"error": {"message": "upstream hiccup"}})
                return
            text = "echo: " + body["messages"][-1]["content"]
            self._send(200, {
                "id": f"c{n}", "object": "chat.completion", "created": 0, "model": body["model"],
                "choices": [{"index": 0, "finish_reason": "stop", "message": {"role": "assistant", "content": text}}],
                "usage": {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2},
            })  # fmt: skip

        def _send(self, status: int, obj: dict) -> None:
            data = json.dumps(obj).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

    return Handler


def _conversations(n: int) -> list[list[dict[str, str]]]:
    return [[{"role": "user", "content": f"question {i}"}] for i in range(n)]


def test_answers_keep_order_and_concurrency_is_bounded(serve) -> None:
    up = Upstream()
    gen = EndpointGenerator("router", serve(_handler(up)), "fibreflow-assistant", concurrency=4)
    answers = gen.generate(_conversations(20))
    assert answers == [f"echo: question {i}" for i in range(20)]
    assert up.peak <= 4 and gen.peak_in_flight == 4  # the server stayed busy, never over the bound
    assert gen.settings["concurrency"] == 4 and gen.settings["temperature"] == 0.0


def test_a_call_may_ask_for_another_answer_length(serve) -> None:
    """The tool loop asks each turn with its own budget; the generator's own stays for the next call."""
    up = Upstream(delay_s=0)
    gen = EndpointGenerator("router", serve(_handler(up)), "m", max_new_tokens=64)
    gen.generate(_conversations(2), max_new_tokens=96)
    gen.generate(_conversations(1))
    assert up.max_tokens == [96, 96, 64] and gen.settings["max_new_tokens"] == 64


def test_a_failing_upstream_is_retried(serve) -> None:
    up = Upstream(fail_first=2)
    gen = EndpointGenerator("vllm", serve(_handler(up)), "m", concurrency=1, retries=2)
    assert gen.generate(_conversations(1)) == ["echo: question 0"]
    assert up.requests == 3


def test_an_upstream_that_keeps_failing_is_an_error_not_an_empty_answer(serve) -> None:
    up = Upstream(fail_first=100)
    gen = EndpointGenerator("vllm", serve(_handler(up)), "m", concurrency=2, retries=1)
    with pytest.raises(GenerationError, match=r"vllm .*InternalServerError"):
        gen.generate(_conversations(2))


def test_a_slow_upstream_times_out(serve) -> None:
    gen = EndpointGenerator("slow", serve(_handler(Upstream(delay_s=2.0))), "m", timeout_s=0.3, retries=0)
    with pytest.raises(GenerationError, match=r"slow .*Timeout"):
        gen.generate(_conversations(1))


@pytest.mark.integration
def test_local_batches_answer_like_one_by_one(tiny_llama) -> None:
    """Left padding and length sorting change nothing: batched greedy answers equal unbatched ones, in order."""
    import torch
    from fibreflow.eval.generators import LocalGenerator
    from fibreflow.training.models import load_tokenizer
    from transformers import AutoModelForCausalLM

    model, tok = AutoModelForCausalLM.from_pretrained(tiny_llama), load_tokenizer(str(tiny_llama))
    torch.manual_seed(0)
    with torch.no_grad():  # wider random weights than the init's: greedy picks differ from prompt to prompt
        for p in model.parameters():
            p.normal_(0, 0.5)
    convs = [[{"role": "user", "content": "What is a pole? " * n}] for n in (1, 5, 2, 9, 3)]
    batched = LocalGenerator("tiny", model, tok, batch_size=5, max_new_tokens=8).generate(convs)
    single = [LocalGenerator("tiny", model, tok, batch_size=1, max_new_tokens=8).generate([c])[0] for c in convs]
    assert batched == single and len(set(batched)) > 1
    short = LocalGenerator("tiny", model, tok, batch_size=5, max_new_tokens=8).generate(convs, max_new_tokens=2)
    pairs = list(zip(short, batched, strict=True))  # greedy: the first 2 tokens of the same 8
    assert all(b.startswith(s) for s, b in pairs) and any(len(s) < len(b) for s, b in pairs)
