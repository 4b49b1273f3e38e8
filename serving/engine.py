"""The local model server's engine: one base model, any number of LoRA adapters, continuous batching.

Requests queue up; one worker thread runs the batch a step at a time (iteration-level scheduling, as vLLM): each
step first prefills the requests that arrived (up to `max_batch` rows in all) and merges their KV caches into the
running batch, then decodes one token for every row. A request joins at the next step and leaves as soon as it is
done, so nobody waits for a whole batch to end. Each row has its own adapter (peft's mixed-batch LoRA:
`adapter_names`), sampling settings, token budget and stop strings; tokens go back to each request as they are
produced. A row may carry a grammar (serving/grammar.py): its tokens are then picked only among those the grammar
allows, and a grammar that fails ends that row alone. A request whose client went away is cancelled: dropped from
the queue, or its row leaves the batch. Adapters are loaded and unloaded at run time (between steps), like vLLM's
`/v1/load_lora_adapter`.
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

from fibreflow.core.chat import ChatFormatError, chat_ids
from fibreflow.core.errors import FibreFlowError
from fibreflow.serving.grammar import Constraint, GrammarError, Grammars
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
    pos: int = 0  # position of the next token fed (prompt and generated tokens in the cache)
    next_input: int = 0  # the token it generated last, fed at the next step
    generator: Any = None  # its random stream when sampling
    constraint: Constraint | None = None  # the grammar its answer must follow

    def emit(self, item: str | Finished | BaseException) -> None:
        self.loop.call_soon_threadsafe(self.out.put_nowait, item)


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
        self.batches = 0  # forward passes run (and rows in them): how much batching happened
        self.rows = 0
        self.tokens = 0  # tokens generated
        self._closing = False  # close(): no more requests; the running ones finish
        self.metrics = metrics or ModelMetrics()
        self.metrics.watch_queue(self._queue)
        self.grammars = Grammars(tok, int(getattr(model.config, "vocab_size", len(tok))), self.eos)
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

    def chat_ids(self, messages: Sequence[dict[str, Any]], tools: Sequence[dict[str, Any]] | None = None) -> list[int]:
        try:
            return chat_ids(self.tok, messages, tools)
        except ChatFormatError as exc:
            raise EngineError(f"messages: {exc}") from None

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

    def constraint(self, grammar: str) -> Constraint:
        """A constraint for one request from `grammar` (Lark text; serving/grammar.py); a GrammarError says what is
        wrong with it."""
        return self.grammars.constraint(grammar)

    async def stream(
        self,
        model: str,
        ids: list[int],
        max_tokens: int,
        sampling: Sampling,
        stop: Sequence[str] = (),
        constraint: Constraint | None = None,
    ) -> AsyncIterator[str | Finished]:
        """Text deltas as they are generated (within `constraint`'s grammar when given), then one `Finished`."""
        adapter = self.check(model, ids, max_tokens)
        out: asyncio.Queue[str | Finished | BaseException] = asyncio.Queue()
        stops = tuple(s for s in stop if s)
        req = _Request(ids, model, adapter, max_tokens, sampling, stops, asyncio.get_running_loop(), out,
                       constraint=constraint)  # fmt: skip
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
        self,
        model: str,
        ids: list[int],
        max_tokens: int,
        sampling: Sampling,
        stop: Sequence[str] = (),
        constraint: Constraint | None = None,
    ) -> tuple[str, Finished]:
        parts: list[str] = []
        async for item in self.stream(model, ids, max_tokens, sampling, stop, constraint):
            if isinstance(item, Finished):
                return "".join(parts), item
            parts.append(item)
        raise EngineError("generation ended without a result")  # unreachable: stream always ends with Finished

    def close(self) -> None:
        self._queue.put(None)
        self._worker.join(timeout=30)

    # ---- worker: one step at a time ------------------------------------------------------------------------

    def _admit(self, room: int, wait: bool) -> list[_Request] | None:
        """Up to `room` queued requests (None once closed and nothing runs); with `wait` (nothing running), block
        for the first, then give others `batch_wait_ms` to arrive."""
        taken: list[_Request] = []
        deadline = None
        while len(taken) < room:
            try:
                if wait and not taken:
                    req = self._queue.get()
                    deadline = time.monotonic() + self.batch_wait_s
                elif deadline is not None:
                    req = self._queue.get(timeout=max(0.0, deadline - time.monotonic()))
                else:
                    req = self._queue.get_nowait()
            except queue.Empty:
                break
            if req is None:
                self._closing = True
                break
            if req.cancelled:  # left before its turn: nothing to generate
                _ended(self.metrics, req, "cancelled")
            else:
                taken.append(req)
        return None if self._closing and not taken and wait else taken

    def _run(self) -> None:
        batch, running = _Batch(self), 0
        while True:
            new = self._admit(self.max_batch - len(batch.rows), wait=not batch.rows)
            if new is None:
                return
            try:
                with self._lock:
                    batch.step(new)
            except Exception as exc:  # a failed step fails its requests, never the worker
                for req in [*batch.rows, *new]:
                    if not req.done:
                        req.done = True
                        req.emit(EngineError(f"generation failed: {type(exc).__name__}: {exc}"))
                        _ended(self.metrics, req, "error")
                batch = _Batch(self)
            self.metrics.running.inc(len(batch.rows) - running)  # by difference: engines may share the gauge
            running = len(batch.rows)
            if self._closing and not batch.rows:
                return


class _Batch:
    """The running rows and their KV cache, left-padded to one length: `attention_mask` marks the real tokens.
    Every row's cache holds its prompt and the tokens it generated except the last, which is fed next step."""

    def __init__(self, engine: Engine) -> None:
        self.e = engine
        self.rows: list[_Request] = []
        self.cache: Any = None
        self.mask: Any = None

    def step(self, new: list[_Request]) -> None:
        import torch

        e = self.e
        now = time.monotonic()
        for req in new:
            e.metrics.queue_wait.labels(req.model).observe(now - req.arrived)
            req.generator = _generator(req.sampling)
        with torch.no_grad():
            if new:
                self._prefill(new)
            self._leave()
            if self.rows:
                self._decode()
            self._leave()

    def _forward(self, rows: list[_Request], ids: Any, mask: Any, positions: Any, cache: Any) -> Any:
        from peft import PeftModel

        e = self.e
        e.batches += 1
        e.rows += len(rows)
        e.metrics.batch_size.observe(len(rows))
        kw: dict[str, Any] = {"adapter_names": [r.adapter for r in rows]} if isinstance(e.model, PeftModel) else {}
        out = e.model(input_ids=ids, attention_mask=mask, position_ids=positions, cache=cache,
                      use_cache=True, logits_to_keep=1, **kw)  # fmt: skip
        return out.logits[:, -1, :].float(), out.cache

    def _prefill(self, new: list[_Request]) -> None:
        """The new rows' prompts in one forward (left-padded), their first token, their cache merged in."""
        import torch
        from transformers import DynamicCache

        e = self.e
        device, pad = e.model.device, e.tok.pad_token_id
        width = max(len(r.ids) for r in new)
        ids = torch.tensor([[pad] * (width - len(r.ids)) + r.ids for r in new], device=device)
        mask = torch.tensor([[0] * (width - len(r.ids)) + [1] * len(r.ids) for r in new], device=device)
        positions = (mask.cumsum(-1) - 1).clamp(min=0)
        logits, cache = self._forward(new, ids, mask, positions, DynamicCache())
        for req, row in zip(new, logits, strict=True):
            req.pos = len(req.ids)
            self._next(req, row)
        self._merge(new, cache, mask)

    def _decode(self) -> None:
        """One token for every row: the last one each generated goes in, the next comes out."""
        import torch

        device = self.e.model.device
        ids = torch.tensor([[r.next_input] for r in self.rows], device=device)
        self.mask = torch.cat([self.mask, torch.ones((len(self.rows), 1), dtype=self.mask.dtype, device=device)], 1)
        positions = torch.tensor([[r.pos] for r in self.rows], device=device)
        logits, self.cache = self._forward(self.rows, ids, self.mask, positions, self.cache)
        rows = list(self.rows)
        for req, row in zip(rows, logits, strict=True):
            req.pos += 1
            self._next(req, row)

    def _merge(self, new: list[_Request], cache: Any, mask: Any) -> None:
        """Join the new rows' cache to the running one: both left-padded to the longer length, stacked by row."""
        import torch
        import torch.nn.functional as F
        from transformers import DynamicCache

        if not self.rows:
            self.rows, self.cache, self.mask = list(new), cache, mask
            return
        length = max(self.mask.shape[1], mask.shape[1])

        def left(x: Any, dim_from_end: int) -> Any:  # pad `x` on the left of its sequence dimension to `length`
            missing = length - x.shape[-dim_from_end]
            return x if missing == 0 else F.pad(x, (0, 0) * (dim_from_end - 1) + (missing, 0))

        layers = [(torch.cat([left(a.keys, 2), left(b.keys, 2)]), torch.cat([left(a.values, 2), left(b.values, 2)]))
                  for a, b in zip(self.cache.layers, cache.layers, strict=True)]  # fmt: skip
        self.cache = DynamicCache(layers)
        self.mask = torch.cat([left(self.mask, 1), left(mask, 1)])
        self.rows += new

    def _next(self, req: _Request, logits: Any) -> None:
        """The row's next token (among those its grammar allows, if it has one) to its client. A grammar that fails
        ends its own row with the error; the other rows go on."""
        if req.constraint is None:
            self._emit(req, _pick(logits, req.sampling, req.generator))
            return
        try:
            token = _pick(req.constraint.mask(logits), req.sampling, req.generator)
            req.constraint.accept(token)
        except GrammarError as exc:
            req.done = True
            req.emit(EngineError(f"constrained generation failed: {exc}"))
            _ended(self.e.metrics, req, "error")
            return
        self._emit(req, token)

    def _emit(self, req: _Request, token: int) -> None:
        e = self.e
        if req.first_at is None:
            req.first_at = time.monotonic()
            e.metrics.ttft.labels(req.model).observe(req.first_at - req.arrived)
        e.tokens += 1
        req.next_input = token
        _advance(req, token, e.tok, e.eos, e.metrics)

    def _leave(self) -> None:
        """Rows that are done or whose client went away leave the batch; columns no row uses any more go."""
        for req in self.rows:
            if req.cancelled and not req.done:
                req.done = True
                _ended(self.e.metrics, req, "cancelled")
        keep = [i for i, r in enumerate(self.rows) if not r.done]
        if len(keep) == len(self.rows):
            return
        if not keep:
            self.rows, self.cache, self.mask = [], None, None
            return
        import torch

        index = torch.tensor(keep, device=self.mask.device)
        self.rows = [self.rows[i] for i in keep]
        self.mask = self.mask.index_select(0, index)
        used = self.mask.any(0).nonzero()
        start = int(used[0]) if len(used) else 0
        self.mask = self.mask[:, start:]
        for layer in self.cache.layers:
            layer.keys = layer.keys.index_select(0, index)[:, :, start:]
            layer.values = layer.values.index_select(0, index)[:, :, start:]


def _generator(s: Sampling) -> Any:
    """A sampled row's own random stream (seeded when the request gives a seed); none for greedy rows."""
    import torch

    if s.greedy:
        return None
    g = torch.Generator()
    if s.seed is not None:
        g.manual_seed(s.seed)
    else:
        g.seed()
    return g


def _pick(logits: Any, s: Sampling, generator: Any) -> int:
    """The next token: argmax for greedy; else temperature, then nucleus (top-p) sampling, as transformers does."""
    import torch

    if s.greedy:
        return int(logits.argmax())
    probs = torch.softmax(logits / s.temperature, dim=-1)
    if s.top_p < 1.0:
        sorted_p, order = probs.sort(descending=True)
        drop = sorted_p.cumsum(-1) - sorted_p > s.top_p  # keep the smallest set whose mass reaches top_p
        sorted_p[drop] = 0.0
        probs = torch.zeros_like(probs).scatter(0, order, sorted_p)
    return int(torch.multinomial(probs.cpu(), 1, generator=generator))


def _advance(req: _Request, token: int, tok: Any, eos: set[int], metrics: ModelMetrics) -> None:
    """A row's new token: the new text to the client (cut at the first stop string), then done on EOS, a stop
    string or its token budget."""
    if token in eos:
        _finish(req, "stop", metrics)
        return
    req.generated.append(token)
    text = tok.decode(req.generated, skip_special_tokens=True)
    cut = min((i for i in (text.find(s) for s in req.stop) if i >= 0), default=-1)
    if cut >= 0:
        text = text[:cut]
    elif text.endswith("\ufffd"):  # half a multi-byte character: wait for the rest
        text = req.sent
    if len(text) > len(req.sent):
        req.emit(text[len(req.sent) :])
        req.sent = text
    if cut >= 0:
        _finish(req, "stop", metrics)
    elif len(req.generated) >= req.max_tokens:
        _finish(req, "length", metrics)


def _finish(req: _Request, reason: str, metrics: ModelMetrics) -> None:
    req.done = True
    req.emit(Finished(reason, len(req.ids), len(req.generated)))
    _ended(metrics, req, reason)
