"""The local model server's engine: one base model, any number of LoRA adapters, batched generation.

Requests queue up; a worker thread takes up to `max_batch` of them that share sampling settings (waiting at most
`batch_wait_ms` for company) and runs one `generate` over them, each row with its own adapter (peft's mixed-batch
LoRA: `adapter_names`), its own token budget and stop strings. Tokens go back to each request as they are
produced, so streaming and batching work together. A request whose client went away is cancelled: it is
dropped from the queue, or its row stops (and the batch's `generate` with it once every row has stopped).
Adapters are loaded and unloaded at run time, like vLLM's `/v1/load_lora_adapter`.
"""

from __future__ import annotations

import asyncio
import os
import queue
import threading
import time
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field
from typing import Any

from fibreflow.core.errors import FibreFlowError
from fibreflow.serving.metrics import ModelMetrics

BASE = "__base__"  # peft's name for "no adapter" in a mixed batch


class EngineError(FibreFlowError):
    """A request the engine cannot serve as asked (unknown model, too long, bad adapter)."""


class UnknownModel(EngineError):
    """The request names a model (base or adapter) this engine does not serve."""


class TooLong(EngineError):
    """Prompt plus completion budget exceed the context length."""


@dataclass(frozen=True)
class Sampling:
    temperature: float = 0.0
    top_p: float = 1.0
    seed: int | None = None

    @property
    def greedy(self) -> bool:
        return self.temperature <= 0.0


@dataclass
class Finished:
    """The last item of a request's stream."""

    reason: str  # "stop" | "length"
    prompt_tokens: int
    completion_tokens: int


@dataclass
class _Request:
    ids: list[int]
    model: str  # as the client named it (the metrics' label)
    adapter: str
    max_tokens: int
    sampling: Sampling
    stop: tuple[str, ...]
    loop: asyncio.AbstractEventLoop
    out: asyncio.Queue[str | Finished | BaseException]
    generated: list[int] = field(default_factory=list)
    sent: str = ""
    done: bool = False
    cancelled: bool = False  # the client went away: stop generating for it
    arrived: float = field(default_factory=time.monotonic)
    first_at: float | None = None  # when its first token came

    def emit(self, item: str | Finished | BaseException) -> None:
        self.loop.call_soon_threadsafe(self.out.put_nowait, item)


class _Rows:
    """HF streamer + per-row stopping criteria for one batch: routes each row's tokens to its request."""

    def __init__(self, reqs: list[_Request], tok: Any, eos: set[int], metrics: ModelMetrics) -> None:
        self.reqs, self.tok, self.eos, self.metrics, self.prompt_seen = reqs, tok, eos, metrics, False

    def put(self, value: Any) -> None:  # transformers' streamer protocol
        if not self.prompt_seen:  # the first call carries the prompts
            self.prompt_seen = True
            return
        for req, token in zip(self.reqs, value.view(-1).tolist(), strict=True):
            if req.cancelled and not req.done:
                req.done = True
                _ended(self.metrics, req, "cancelled")
            elif not req.done:
                if req.first_at is None:
                    req.first_at = time.monotonic()
                    self.metrics.ttft.labels(req.model).observe(req.first_at - req.arrived)
                self._advance(req, token)

    def end(self) -> None:
        for req in self.reqs:
            if not req.done:
                self._finish(req, "length")

    def _advance(self, req: _Request, token: int) -> None:
        if token in self.eos:
            self._finish(req, "stop")
            return
        req.generated.append(token)
        text = self.tok.decode(req.generated, skip_special_tokens=True)
        cut = min((i for i in (text.find(s) for s in req.stop) if i >= 0), default=-1)
        if cut >= 0:
            text = text[:cut]
        elif text.endswith("\ufffd"):  # half a multi-byte character: wait for the rest
            text = req.sent
        if len(text) > len(req.sent):
            req.emit(text[len(req.sent) :])
            req.sent = text
        if cut >= 0:
            self._finish(req, "stop")
        elif len(req.generated) >= req.max_tokens:
            self._finish(req, "length")

    def _finish(self, req: _Request, reason: str) -> None:
        req.done = True
        req.emit(Finished(reason, len(req.ids), len(req.generated)))
        _ended(self.metrics, req, reason)

    def __call__(self, input_ids: Any, scores: Any, **kwargs: Any) -> Any:  # StoppingCriteria: per-row done
        import torch

        return torch.tensor([r.done or r.cancelled for r in self.reqs], device=input_ids.device)


def _ended(m: ModelMetrics, req: _Request, reason: str) -> None:
    """A request's last metrics: why it ended, its tokens, its whole time and time per token after the first."""
    now, n = time.monotonic(), len(req.generated)
    m.finished.labels(req.model, reason).inc()
    m.prompt_tokens.labels(req.model).inc(len(req.ids))
    m.generation_tokens.labels(req.model).inc(n)
    m.request_time.labels(req.model).observe(now - req.arrived)
    if req.first_at is not None and n > 1:
        m.tpot.labels(req.model).observe((now - req.first_at) / (n - 1))


class Engine:
    """Thread-safe: `submit` from any event loop; generation runs on one worker thread."""

    def __init__(
        self,
        model: Any,
        tok: Any,
        *,
        base_name: str,
        max_context: int,
        max_batch: int = 16,
        batch_wait_ms: float = 5.0,
        metrics: ModelMetrics | None = None,
    ) -> None:
        self.model, self.tok, self.base_name, self.max_context = model, tok, base_name, max_context
        self.max_batch, self.batch_wait_s = max_batch, batch_wait_ms / 1000
        self.adapters: dict[str, str] = {}  # served name -> adapter folder
        self.created = int(time.time())
        self._queue: queue.Queue[_Request | None] = queue.Queue()
        self._lock = threading.Lock()  # adapters change only between batches
        eos = tok.eos_token_id
        self.eos = {eos} if isinstance(eos, int) else set(eos or [])
        self.batches = 0  # batches run (and rows in them): how much batching happened
        self.rows = 0
        self.tokens = 0  # tokens generated
        self.metrics = metrics or ModelMetrics()
        self.metrics.waiting.set_function(self._queue.qsize)
        self._worker = threading.Thread(target=self._run, name="engine", daemon=True)
        self._worker.start()

    # ---- adapters ----------------------------------------------------------------------------------------

    def load_adapter(self, name: str, path: str) -> None:
        from peft import PeftModel

        if name == self.base_name or name == BASE:
            raise EngineError(f"adapter name {name!r} is the base model's name; choose another")
        if name in self.adapters:
            raise EngineError(f"an adapter named {name!r} is already loaded ({self.adapters[name]})")
        if not os.path.isfile(os.path.join(path, "adapter_config.json")):
            raise EngineError(f"{path}: no adapter_config.json there, not a LoRA adapter folder")
        with self._lock:
            if isinstance(self.model, PeftModel):
                self.model.load_adapter(path, adapter_name=name)
            else:
                self.model = PeftModel.from_pretrained(self.model, path, adapter_name=name)
            self.model.eval()
            self.adapters[name] = path

    def unload_adapter(self, name: str) -> None:
        if name not in self.adapters:
            raise EngineError(f"no adapter named {name!r} is loaded")
        with self._lock:
            self.model.delete_adapter(name)
            del self.adapters[name]

    def models(self) -> list[str]:
        return [self.base_name, *self.adapters]

    # ---- requests ----------------------------------------------------------------------------------------

    def chat_ids(self, messages: Sequence[dict[str, Any]]) -> list[int]:
        try:
            enc = self.tok.apply_chat_template(
                list(messages), tokenize=True, add_generation_prompt=True, return_dict=True
            )
        except Exception as exc:  # a template that rejects the conversation (roles, order)
            raise EngineError(f"messages: the chat template rejected them ({exc})") from None
        return list(enc["input_ids"])

    def text_ids(self, prompt: str) -> list[int]:
        return list(self.tok(prompt)["input_ids"])

    def check(self, model: str, ids: list[int], max_tokens: int) -> str:
        """The adapter for `model` after checking it exists and the request fits the context."""
        if model != self.base_name and model not in self.adapters:
            raise UnknownModel(f"The model `{model}` does not exist (served: {', '.join(self.models())})")
        if len(ids) + max_tokens > self.max_context:
            raise TooLong(
                f"This model's maximum context length is {self.max_context} tokens. However, you requested "
                f"{len(ids) + max_tokens} tokens ({len(ids)} in the messages, {max_tokens} in the completion). "
                "Please reduce the length of the messages or completion."
            )
        return BASE if model == self.base_name else model

    async def stream(
        self, model: str, ids: list[int], max_tokens: int, sampling: Sampling, stop: Sequence[str] = ()
    ) -> AsyncIterator[str | Finished]:
        """Text deltas as they are generated, then one `Finished`."""
        adapter = self.check(model, ids, max_tokens)
        out: asyncio.Queue[str | Finished | BaseException] = asyncio.Queue()
        stops = tuple(s for s in stop if s)
        req = _Request(ids, model, adapter, max_tokens, sampling, stops, asyncio.get_running_loop(), out)
        self._queue.put(req)
        try:
            while True:
                item = await out.get()
                if isinstance(item, BaseException):
                    raise item
                yield item
                if isinstance(item, Finished):
                    return
        finally:
            if not req.done:  # the caller stopped listening (client gone, cancelled): stop generating for it
                req.cancelled = True

    async def complete(
        self, model: str, ids: list[int], max_tokens: int, sampling: Sampling, stop: Sequence[str] = ()
    ) -> tuple[str, Finished]:
        parts: list[str] = []
        async for item in self.stream(model, ids, max_tokens, sampling, stop):
            if isinstance(item, Finished):
                return "".join(parts), item
            parts.append(item)
        raise EngineError("generation ended without a result")  # unreachable: stream always ends with Finished

    def close(self) -> None:
        self._queue.put(None)
        self._worker.join(timeout=30)

    # ---- worker ------------------------------------------------------------------------------------------

    def _take(self) -> list[_Request] | None:
        first = self._queue.get()
        while first is not None and first.cancelled:  # left before its turn: nothing to generate
            _ended(self.metrics, first, "cancelled")
            first = self._queue.get()
        if first is None:
            return None
        batch, deadline, held = [first], time.monotonic() + self.batch_wait_s, []
        while len(batch) < self.max_batch:
            try:
                nxt = self._queue.get(timeout=max(0.0, deadline - time.monotonic()))
            except queue.Empty:
                break
            if nxt is None:
                held.append(None)
                break
            if nxt.cancelled:
                _ended(self.metrics, nxt, "cancelled")
            else:
                (batch if nxt.sampling == first.sampling else held).append(nxt)
        for r in held:  # other sampling settings wait for the next batch, in order
            self._queue.put(r)
        return batch

    def _run(self) -> None:
        while (batch := self._take()) is not None:
            try:
                with self._lock:
                    self._generate(batch)
            except Exception as exc:  # a failed batch fails its requests, never the worker
                for req in batch:
                    if not req.done:
                        req.done = True
                        req.emit(EngineError(f"generation failed: {type(exc).__name__}: {exc}"))
                        _ended(self.metrics, req, "error")

    def _generate(self, batch: list[_Request]) -> None:
        self.batches += 1
        self.rows += len(batch)
        m, now = self.metrics, time.monotonic()
        m.batch_size.observe(len(batch))
        for req in batch:
            m.queue_wait.labels(req.model).observe(now - req.arrived)
        m.running.inc(len(batch))
        try:
            self._run_generate(batch)
        finally:
            m.running.dec(len(batch))
            self.tokens += sum(len(r.generated) for r in batch)

    def _run_generate(self, batch: list[_Request]) -> None:
        import torch
        from peft import PeftModel
        from transformers import StoppingCriteriaList

        pad = self.tok.pad_token_id
        width = max(len(r.ids) for r in batch)
        ids = torch.tensor([[pad] * (width - len(r.ids)) + r.ids for r in batch], device=self.model.device)
        mask = torch.tensor([[0] * (width - len(r.ids)) + [1] * len(r.ids) for r in batch], device=self.model.device)
        rows = _Rows(batch, self.tok, self.eos, self.metrics)
        s = batch[0].sampling
        kw: dict[str, Any] = {"do_sample": False} if s.greedy else {"do_sample": True, "temperature": s.temperature}
        if not s.greedy:
            kw["top_p"] = s.top_p
            if s.seed is not None:
                torch.manual_seed(s.seed)
        if isinstance(self.model, PeftModel):
            kw["adapter_names"] = [r.adapter for r in batch]
        with torch.no_grad():
            self.model.generate(
                input_ids=ids,
                attention_mask=mask,
                max_new_tokens=max(r.max_tokens for r in batch),
                pad_token_id=pad,
                eos_token_id=sorted(self.eos),
                streamer=rows,
                stopping_criteria=StoppingCriteriaList([rows]),
                **kw,
            )
        rows.end()
