"""`rxt serve`: an OpenAI-compatible HTTP server where each conversation lives on the server as its STM.

Endpoints:

* `POST /v1/responses`: OpenAI's Responses API with server-side state. A request names the conversation it
  continues by `previous_response_id`; the server loads that response's stored memory, answers only the new
  `input`, writes the interaction into the memory (the model's background update, batched with the other
  requests of the same decoding batch) and stores it under the new response id (`store`, default true). An
  unknown, evicted or `store=false` id is a 404, another model's memory a 409: never a silent fresh memory.
  The response (or, streaming, its final `response.completed` event) is sent once the new memory is committed,
  so every id a client has seen completed can be continued, even after the server was killed.
* `POST /v1/chat/completions`: stateless clients. The earlier turns of `messages` are written into a fresh memory
  and the last user message is answered (the semantics of the text-generation pipeline); nothing is stored.
* `GET /v1/models`, `GET /health`, `GET /metrics` (a JSON summary: requests, latencies, batches, store size).

Why not transformers' own serving code: `transformers serve` (transformers.cli.serving) builds its handlers on
the `openai` package's types and on its stateless generate managers (every request re-renders the full chat);
`openai` is not a dependency here, and the handlers have no place for a per-conversation memory. So the request
and response bodies are small pydantic models of the fields this server implements (unknown fields are refused
with a 400 naming them, rather than silently ignored), shaped as OpenAI's so that its clients work unchanged.

Decoding is greedy unless `temperature` > 0. `seed` (an extension for `/v1/responses`, OpenAI's field for chat
completions) draws a fresh conversation's initial memory; without it the server's RNG does.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
import time
import uuid
from collections import deque
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Optional, Union

from fastapi import FastAPI, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field

from .batching import BatchScheduler, Job, QueueFullError, Sampling
from .store import ForeignMemoryError, STMStore, UnknownResponseError, open_store

logger = logging.getLogger("transformers_rxt.serving")

__all__ = ["ServeConfig", "build_app"]


# ============================================================================================== configuration
@dataclass
class ServeConfig:
    """What `rxt serve` runs: the model, the STM store and the batching limits."""

    model: str
    store: str = "rxt-stm.sqlite3"
    api_key: Optional[str] = None
    model_name: Optional[str] = None
    max_batch_size: int = 8
    batch_wait_ms: float = 5.0
    max_queue: int = 64
    max_age_s: Optional[float] = None
    max_stored: Optional[int] = None

    @property
    def served_name(self) -> str:
        return self.model_name or Path(self.model).name or str(self.model)


# ============================================================================================== request bodies
class _Body(BaseModel):
    model_config = ConfigDict(extra="forbid")


class ContentPart(_Body):
    type: Literal["input_text", "output_text", "text"]
    text: str


class InputMessage(_Body):
    type: Optional[Literal["message"]] = None
    role: Literal["system", "developer", "user", "assistant"]
    content: Union[str, list[ContentPart]]
    id: Optional[str] = None
    status: Optional[str] = None


class ResponsesRequest(_Body):
    model: Optional[str] = None
    input: Union[str, list[InputMessage]]
    previous_response_id: Optional[str] = None
    store: bool = True
    stream: bool = False
    instructions: Optional[str] = None
    max_output_tokens: Optional[int] = Field(default=None, ge=1)
    temperature: Optional[float] = Field(default=None, ge=0, le=2)
    top_p: Optional[float] = Field(default=None, gt=0, le=1)
    seed: Optional[int] = None
    metadata: Optional[dict[str, str]] = None


class ChatMessage(_Body):
    role: Literal["system", "developer", "user", "assistant"]
    content: Union[str, list[ContentPart]]
    name: Optional[str] = None


class ChatCompletionRequest(_Body):
    model: Optional[str] = None
    messages: list[ChatMessage]
    stream: bool = False
    max_tokens: Optional[int] = Field(default=None, ge=1)
    max_completion_tokens: Optional[int] = Field(default=None, ge=1)
    temperature: Optional[float] = Field(default=None, ge=0, le=2)
    top_p: Optional[float] = Field(default=None, gt=0, le=1)
    seed: Optional[int] = None
    n: int = Field(default=1, ge=1, le=1)
    user: Optional[str] = None


class APIError(Exception):
    """An error answered as OpenAI does: `{"error": {"message", "type", "param", "code"}}` with `status`."""

    def __init__(self, status: int, message: str, code: str, param: Optional[str] = None):
        super().__init__(message)
        self.status, self.message, self.code, self.param = status, message, code, param

    def body(self) -> dict:
        kind = "invalid_request_error" if self.status < 500 else "server_error"
        return {"error": {"message": self.message, "type": kind, "param": self.param, "code": self.code}}


def _text(content: Union[str, list[ContentPart]]) -> str:
    return content if isinstance(content, str) else "".join(part.text for part in content)


# ============================================================================================== metrics
@dataclass
class Metrics:
    """Counters and recent latencies for `/metrics` (the last 1000 turns per endpoint)."""

    started: float = field(default_factory=time.time)
    requests: dict = field(default_factory=dict)
    statuses: dict = field(default_factory=dict)
    latencies: dict = field(default_factory=dict)
    output_tokens: int = 0

    def record(self, endpoint: str, status: int, seconds: Optional[float] = None, tokens: int = 0) -> None:
        self.requests[endpoint] = self.requests.get(endpoint, 0) + 1
        self.statuses[str(status)] = self.statuses.get(str(status), 0) + 1
        self.output_tokens += tokens
        if seconds is not None:
            self.latencies.setdefault(endpoint, deque(maxlen=1000)).append(seconds)

    def summary(self) -> dict:
        def quantiles(values) -> dict:
            ordered = sorted(values)
            pick = lambda q: round(1e3 * ordered[min(int(q * len(ordered)), len(ordered) - 1)], 2)  # noqa: E731
            return {"count": len(ordered), "p50_ms": pick(0.5), "p99_ms": pick(0.99)}

        return {"uptime_s": round(time.time() - self.started, 1), "requests": self.requests,
                "statuses": self.statuses, "output_tokens": self.output_tokens,
                "latency": {name: quantiles(values) for name, values in self.latencies.items() if values}}


# ============================================================================================== the server
class RxTServer:
    """The model, tokenizer, store and scheduler of one server process, and the turn logic both endpoints share."""

    def __init__(self, config: ServeConfig, model, tokenizer, store: STMStore):
        self.config, self.model, self.tokenizer, self.store = config, model, tokenizer, store
        self.scheduler = BatchScheduler(model, store, config.max_batch_size, config.batch_wait_ms / 1e3,
                                        config.max_queue)
        self.metrics = Metrics()
        self.window = model.config.max_interaction_length
        self.encoder_limit = model.config.encoder_config["seq_len"]
        self._committing: dict[str, asyncio.Future] = {}  # ids announced (streaming) but not yet stored
        # How long a request continuing such an id waits for it before the store answers (404 if still absent).
        self.COMMIT_WAIT_S = 60.0
        self._conversation_locks: dict[str, asyncio.Lock] = {}

    # ------------------------------------------------------------------ checks and rendering
    def check_model(self, name: Optional[str]) -> None:
        if name is not None and name != self.config.served_name:
            raise APIError(404, f"model {name!r} is not served here; this server serves "
                                f"{self.config.served_name!r} (GET /v1/models)", "model_not_found", "model")

    def render(self, messages: list[dict], param: str) -> tuple[list[list[int]], list[int]]:
        """The earlier interactions' ids and the prompt ids of a chat, as the text-generation pipeline renders
        them (its `split_chat` checks the roles and order); every length checked before any work."""
        from ..pipeline_rxt import split_chat

        try:
            history, query = split_chat(messages)
        except ValueError as error:
            raise APIError(400, str(error), "invalid_messages", param) from error
        render = lambda turn, prompt: self.tokenizer.apply_chat_template(  # noqa: E731
            turn, add_generation_prompt=prompt, tokenize=True, return_dict=True)["input_ids"]
        interactions = [list(render(turn, False)) for turn in history]
        for index, ids in enumerate(interactions):
            if len(ids) > self.encoder_limit:
                raise APIError(400, f"earlier interaction {index} has {len(ids)} tokens but this model reads at most "
                                    f"{self.encoder_limit} per interaction: shorten it", "input_too_long", param)
        prompt = list(render([query], True))
        if len(prompt) >= self.window:
            raise APIError(400, f"the last user message renders to {len(prompt)} tokens but a whole interaction "
                                f"(query and answer) holds at most {self.window} tokens for this model: shorten "
                                "the message", "input_too_long", param)
        return interactions, prompt

    def budget(self, prompt: list[int], requested: Optional[int], param: str) -> int:
        left = self.window - len(prompt)
        if requested is not None and requested > left:
            raise APIError(400, f"{param}={requested} does not fit: the query takes {len(prompt)} of the "
                                f"{self.window} tokens of an interaction, so at most {left} are left for the answer",
                           "max_tokens_too_large", param)
        return requested or left

    @staticmethod
    def sampling(temperature: Optional[float], top_p: Optional[float]) -> Sampling:
        if not temperature:
            return Sampling()
        return Sampling(do_sample=True, temperature=temperature, top_p=1.0 if top_p is None else top_p)

    async def load_memory(self, response_id: str):
        pending = self._committing.get(response_id)
        if pending is not None:  # announced by a stream that has not completed yet: wait for its memory
            await asyncio.wait([pending], timeout=self.COMMIT_WAIT_S)
        try:
            stored = await run_in_threadpool(self.store.get, response_id, self.model.model_signature,
                                             self.model.dtype)
        except UnknownResponseError as error:
            raise APIError(404, str(error), "response_not_found", "previous_response_id") from error
        except ForeignMemoryError as error:
            raise APIError(409, str(error), "foreign_memory", "previous_response_id") from error
        return stored.memory

    async def start(self, job: Job, after: Optional[str] = None, on_done=None) -> asyncio.Queue:
        """Queue `job` and return the queue its scheduler events arrive on (read them with `events`).

        With `after` (the response it continues), jobs continuing the same response are queued one after another
        in arrival order (asyncio.Lock is FIFO). The lock, and `on_done`, are released by the job's own end
        ("committed" or "error"), not by the HTTP response, so a client that disconnects releases nothing early.
        Queue full or shutting down: a 503 before any stream starts."""
        loop = asyncio.get_running_loop()
        events: asyncio.Queue = asyncio.Queue()
        lock = None
        if after is not None:
            lock = self._conversation_locks.setdefault(after, asyncio.Lock())
            await lock.acquire()
        finished = []

        def finish() -> None:
            if finished:
                return
            finished.append(True)
            if lock is not None:
                lock.release()
                if not lock.locked() and not getattr(lock, "_waiters", None):
                    self._conversation_locks.pop(after, None)
            if on_done is not None:
                on_done()

        def deliver(event: tuple) -> None:
            events.put_nowait(event)
            if event[0] in ("committed", "error"):
                finish()

        job.emit = lambda *event: loop.call_soon_threadsafe(deliver, event)
        try:
            self.scheduler.submit(job)
        except (QueueFullError, RuntimeError) as error:
            finish()
            code = "server_busy" if isinstance(error, QueueFullError) else "shutting_down"
            raise APIError(503, str(error), code) from error
        return events

    @staticmethod
    async def events(events: asyncio.Queue) -> AsyncIterator[tuple]:
        """A started job's events until it is committed; an error event raises (a ValueError as a 400)."""
        while True:
            event = await events.get()
            if event[0] == "error":
                error = event[1]
                if isinstance(error, ValueError):
                    raise APIError(400, str(error), "invalid_request") from error
                raise APIError(500, f"{type(error).__name__}: {error}", "internal_error") from error
            yield event
            if event[0] == "committed":
                return

    def log_turn(self, endpoint: str, request_id: str, job: Optional[Job], started: float, status: int,
                 tokens: int, extra: str = "") -> None:
        t = job.timings if job is not None else {}
        ms = lambda a, b: f"{1e3 * (t[b] - t[a]):.0f}" if a in t and b in t else "-"  # noqa: E731
        total = time.perf_counter() - started
        self.metrics.record(endpoint, status, total if status == 200 else None, tokens)
        logger.info("req=%s %s status=%d %sbatch=%s queue_ms=%s decode_ms=%s commit_ms=%s total_ms=%.0f "
                    "out_tokens=%d", request_id, endpoint, status, extra, t.get("batch_size", "-"),
                    ms("queued", "started"), ms("started", "decoded"), ms("decoded", "committed"), 1e3 * total,
                    tokens)


class _Text:
    """Incremental detokenisation: each new token's text delta (held back while it ends mid-character)."""

    def __init__(self, tokenizer):
        self.tokenizer, self.ids, self.sent = tokenizer, [], ""

    def add(self, token: int) -> str:
        self.ids.append(token)
        text = self.tokenizer.decode(self.ids, skip_special_tokens=True)
        if text.endswith("\ufffd") or not text.startswith(self.sent):
            return ""
        delta, self.sent = text[len(self.sent):], text
        return delta

    def finish(self, answer: list[int]) -> tuple[str, str]:
        """The final text and what of it was not sent yet."""
        text = self.tokenizer.decode(answer, skip_special_tokens=True)
        delta = text[len(self.sent):] if text.startswith(self.sent) else ""
        return text, delta


def _sse(event: dict) -> str:
    return f"event: {event['type']}\ndata: {json.dumps(event)}\n\n"


# ============================================================================================== /v1/responses
def _response_object(server: RxTServer, response_id: str, body: ResponsesRequest, created: int, status: str,
                     text: Optional[str], usage: Optional[dict], message_id: str, finish: Optional[str]) -> dict:
    output = [] if text is None else [{
        "type": "message", "id": message_id, "status": "completed" if status != "in_progress" else "in_progress",
        "role": "assistant", "content": [{"type": "output_text", "text": text, "annotations": []}]}]
    return {"id": response_id, "object": "response", "created_at": created, "status": status,
            "model": server.config.served_name, "output": output,
            "previous_response_id": body.previous_response_id, "store": body.store,
            "instructions": body.instructions, "max_output_tokens": body.max_output_tokens,
            "temperature": body.temperature, "top_p": body.top_p, "metadata": body.metadata or {},
            "incomplete_details": {"reason": "max_output_tokens"} if finish == "length" else None,
            "error": None, "usage": usage}


async def _responses(server: RxTServer, body: ResponsesRequest, request_id: str):
    started = time.perf_counter()
    server.check_model(body.model)
    if body.previous_response_id is not None and body.instructions is not None:
        raise APIError(400, "instructions initialise a new conversation's memory; a continued conversation "
                            "(previous_response_id) already holds them: drop instructions, or start a new "
                            "conversation", "instructions_with_previous_response", "instructions")
    items = [{"role": "user", "content": body.input}] if isinstance(body.input, str) else [
        {"role": "system" if m.role == "developer" else m.role, "content": _text(m.content)} for m in body.input]
    if body.instructions is not None:
        items.insert(0, {"role": "system", "content": body.instructions})
    if body.previous_response_id is not None and items and items[0]["role"] == "system":
        raise APIError(400, "a system message starts a new conversation's memory; with previous_response_id send "
                            "only the new user message (and earlier user/assistant pairs)", "system_with_previous_"
                            "response", "input")
    history, prompt = server.render(items, "input")
    budget = server.budget(prompt, body.max_output_tokens, "max_output_tokens")
    # Stored rows never change (each response id names one memory), so the memory is read before the turn: an
    # unknown or foreign id is answered with its 4xx before any stream starts.
    memory = None if body.previous_response_id is None else await server.load_memory(body.previous_response_id)
    response_id = f"resp_{uuid.uuid4().hex}"
    created = int(time.time())
    message_id = f"msg_{uuid.uuid4().hex}"
    job = Job(prompt=prompt, max_new_tokens=budget, sampling=server.sampling(body.temperature, body.top_p),
              emit=lambda *event: None, memory=memory, seed=body.seed, history=tuple(history),
              store_as=response_id if body.store else None, request_id=request_id)
    committed = asyncio.get_running_loop().create_future() if body.store else None

    def settled() -> None:  # the memory is stored, or the turn failed: waiters may look in the store now
        server._committing.pop(response_id, None)
        committed.set_result(None)

    if committed is not None:  # before the stream announces the id
        server._committing[response_id] = committed
    try:
        queue = await server.start(job, body.previous_response_id, settled if committed is not None else None)
    except BaseException:
        if committed is not None and not committed.done():
            settled()
        raise

    def usage(answer: list[int]) -> dict:
        return {"input_tokens": len(prompt), "output_tokens": len(answer), "total_tokens": len(prompt) + len(answer),
                "input_tokens_details": {"cached_tokens": 0}, "output_tokens_details": {"reasoning_tokens": 0}}

    extra = f"conv={body.previous_response_id or 'new'}->{response_id if body.store else 'not-stored'} "
    text = _Text(server.tokenizer)
    if not body.stream:
        answer, finish = [], None
        async for event in server.events(queue):
            if event[0] == "answered":
                answer, finish = event[1], event[2]
        final = text.finish(answer)[0]
        server.log_turn("/v1/responses", request_id, job, started, 200, len(answer), extra)
        return JSONResponse(_response_object(server, response_id, body, created,
                                             "incomplete" if finish == "length" else "completed", final,
                                             usage(answer), message_id, finish))

    # Streaming: the events of OpenAI's Responses stream, numbered; an error after the start ends it with
    # `response.failed` (the HTTP status is already sent).
    async def stream() -> AsyncIterator[str]:
        sequence = 0

        def event(kind: str, **payload) -> str:
            nonlocal sequence
            sequence += 1
            return _sse({"type": kind, "sequence_number": sequence - 1, **payload})

        base = dict(item_id=message_id, output_index=0, content_index=0)
        pending = _response_object(server, response_id, body, created, "in_progress", None, None, message_id, None)
        yield event("response.created", response=pending)
        yield event("response.in_progress", response=pending)
        yield event("response.output_item.added", output_index=0, item={
            "type": "message", "id": message_id, "status": "in_progress", "role": "assistant", "content": []})
        yield event("response.content_part.added", item_id=message_id, output_index=0, content_index=0,
                    part={"type": "output_text", "text": "", "annotations": []})
        answer, finish = [], None
        try:
            async for item in server.events(queue):
                if item[0] == "token":
                    delta = text.add(item[1])
                    if delta:
                        yield event("response.output_text.delta", delta=delta, logprobs=[], **base)
                elif item[0] == "answered":
                    answer, finish = item[1], item[2]
                    final, delta = text.finish(answer)
                    if delta:
                        yield event("response.output_text.delta", delta=delta, logprobs=[], **base)
                    yield event("response.output_text.done", text=final, logprobs=[], **base)
                    part = {"type": "output_text", "text": final, "annotations": []}
                    yield event("response.content_part.done", part=part, item_id=message_id, output_index=0,
                                content_index=0)
                    yield event("response.output_item.done", output_index=0, item={
                        "type": "message", "id": message_id, "status": "completed", "role": "assistant",
                        "content": [part]})
        except APIError as error:
            failed = _response_object(server, response_id, body, created, "failed", None, None, message_id, None)
            failed["error"] = {"code": error.code, "message": error.message}
            yield event("response.failed", response=failed)
            server.log_turn("/v1/responses", request_id, job, started, error.status, 0, extra)
            return
        server.log_turn("/v1/responses", request_id, job, started, 200, len(answer), extra)
        yield event("response.completed", response=_response_object(
            server, response_id, body, created, "incomplete" if finish == "length" else "completed", text.sent,
            usage(answer), message_id, finish))

    return StreamingResponse(stream(), media_type="text/event-stream", headers={"X-Request-ID": request_id})


# ============================================================================================== /v1/chat/completions
async def _chat_completions(server: RxTServer, body: ChatCompletionRequest, request_id: str):
    started = time.perf_counter()
    server.check_model(body.model)
    if body.max_tokens is not None and body.max_completion_tokens is not None:
        raise APIError(400, "give max_completion_tokens or max_tokens (its deprecated name), not both",
                       "conflicting_parameters", "max_tokens")
    messages = [{"role": "system" if m.role == "developer" else m.role, "content": _text(m.content)}
                for m in body.messages]
    history, prompt = server.render(messages, "messages")
    requested = body.max_completion_tokens or body.max_tokens
    budget = server.budget(prompt, requested, "max_completion_tokens" if body.max_completion_tokens else "max_tokens")
    job = Job(prompt=prompt, max_new_tokens=budget, sampling=server.sampling(body.temperature, body.top_p),
              emit=lambda *event: None, seed=body.seed, history=tuple(history), request_id=request_id)
    completion_id, created = f"chatcmpl-{uuid.uuid4().hex}", int(time.time())
    head = {"id": completion_id, "created": created, "model": server.config.served_name}
    text = _Text(server.tokenizer)

    def usage(answer: list[int]) -> dict:
        return {"prompt_tokens": len(prompt), "completion_tokens": len(answer),
                "total_tokens": len(prompt) + len(answer)}

    extra = f"history_turns={len(history)} "
    queue = await server.start(job)
    if not body.stream:
        answer, finish = [], None
        async for event in server.events(queue):
            if event[0] == "answered":
                answer, finish = event[1], event[2]
        server.log_turn("/v1/chat/completions", request_id, job, started, 200, len(answer), extra)
        return JSONResponse({**head, "object": "chat.completion", "choices": [{
            "index": 0, "message": {"role": "assistant", "content": text.finish(answer)[0]},
            "finish_reason": finish, "logprobs": None}], "usage": usage(answer)})

    def chunk(delta: dict, finish: Optional[str] = None) -> str:
        return "data: " + json.dumps({**head, "object": "chat.completion.chunk", "choices": [
            {"index": 0, "delta": delta, "finish_reason": finish, "logprobs": None}]}) + "\n\n"

    async def stream() -> AsyncIterator[str]:
        yield chunk({"role": "assistant", "content": ""})
        answer, finish = [], None
        try:
            async for event in server.events(queue):
                if event[0] == "token":
                    delta = text.add(event[1])
                    if delta:
                        yield chunk({"content": delta})
                elif event[0] == "answered":
                    answer, finish = event[1], event[2]
                    delta = text.finish(answer)[1]
                    if delta:
                        yield chunk({"content": delta})
        except APIError as error:
            yield "data: " + json.dumps(error.body()) + "\n\n"
            server.log_turn("/v1/chat/completions", request_id, job, started, error.status, 0, extra)
            return
        yield chunk({}, finish)
        yield "data: [DONE]\n\n"
        server.log_turn("/v1/chat/completions", request_id, job, started, 200, len(answer), extra)

    return StreamingResponse(stream(), media_type="text/event-stream", headers={"X-Request-ID": request_id})


# ============================================================================================== the app
def _load(config: ServeConfig):
    import torch
    from transformers import AutoModelForCausalLM

    import transformers_rxt  # noqa: F401  (registers the Auto classes)
    from ..tokenization_rxt import load_rxt_tokenizer

    model = AutoModelForCausalLM.from_pretrained(config.model, trust_remote_code=True).eval()
    if getattr(model.config, "model_type", None) != "rxt":
        raise ValueError(f"{config.model} is a {model.config.model_type!r} model; rxt serve serves RxT models")
    model.set_decode_weight_layout()
    torch.set_grad_enabled(False)
    return model, load_rxt_tokenizer(config.model)


def build_app(config: ServeConfig, model=None, tokenizer=None) -> FastAPI:
    """The FastAPI app of `rxt serve` (the model is loaded from `config.model` unless given)."""
    if model is None:
        model, tokenizer = _load(config)
    store = open_store(config.store, config.max_age_s, config.max_stored)
    state: dict[str, Any] = {}

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        state["server"] = RxTServer(config, model, tokenizer, store)
        logger.info("serving %s (%s) on the store %s", config.served_name, config.model, config.store)
        try:
            yield
        finally:
            state["server"].scheduler.stop()
            store.close()
            logger.info("stopped")

    app = FastAPI(title="rxt serve", lifespan=lifespan)

    @app.exception_handler(APIError)
    async def api_error(request: Request, error: APIError):
        server = state.get("server")
        if server is not None:
            server.metrics.record(request.url.path, error.status)
        logger.info("req=%s %s status=%d %s", request.state.request_id, request.url.path, error.status, error.code)
        return JSONResponse(error.body(), status_code=error.status)

    @app.exception_handler(RequestValidationError)
    async def invalid_body(request: Request, error: RequestValidationError):
        problems = []
        for item in error.errors():
            where = ".".join(str(part) for part in item.get("loc", ()) if part != "body")
            if item.get("type") == "json_invalid":
                problems.append(f"the request body is not valid JSON ({item.get('ctx', {}).get('error', '')})")
            elif item.get("type") == "extra_forbidden":
                problems.append(f"{where}: this server does not support this field; remove it")
            else:
                problems.append(f"{where}: {item.get('msg')}")
        return await api_error(request, APIError(400, "; ".join(problems) or "invalid request", "invalid_request"))

    @app.middleware("http")
    async def request_id_and_auth(request: Request, call_next):
        request.state.request_id = request.headers.get("x-request-id") or uuid.uuid4().hex[:12]
        if config.api_key and request.url.path.startswith("/v1/"):
            given = request.headers.get("authorization", "").encode()
            if not hmac.compare_digest(given, f"Bearer {config.api_key}".encode()):  # constant time
                error = APIError(401, "missing or wrong API key: send the header 'Authorization: Bearer <key>' "
                                      "with the key the server was started with (--api-key)", "invalid_api_key")
                return await api_error(request, error)
        response = await call_next(request)
        response.headers["X-Request-ID"] = request.state.request_id
        return response

    @app.get("/health")
    async def health():
        return {"status": "ok", "model": config.served_name}

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [{"id": config.served_name, "object": "model",
                                            "created": int(state["server"].metrics.started),
                                            "owned_by": "transformers-rxt"}]}

    @app.get("/metrics")
    async def metrics():
        server = state["server"]
        stored = await run_in_threadpool(store.count)
        return {**server.metrics.summary(), "queue_depth": server.scheduler.queue_depth,
                "scheduler": dict(server.scheduler.stats), "stored_memories": stored}

    @app.post("/v1/responses")
    async def responses(body: ResponsesRequest, request: Request):
        return await _responses(state["server"], body, request.state.request_id)

    @app.post("/v1/chat/completions")
    async def chat_completions(body: ChatCompletionRequest, request: Request):
        return await _chat_completions(state["server"], body, request.state.request_id)

    return app
