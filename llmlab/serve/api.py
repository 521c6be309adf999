"""The OpenAI-compatible HTTP API over the engine loop: completions, chat completions, models, health, metrics.

Taught in notebook 15 (serving and its metrics).  ``create_app(served)`` builds a
FastAPI app that owns an :class:`~llmlab.engine.Engine`, the one thread that steps it
(:class:`~llmlab.serve.engine_loop.EngineLoop`) and its Prometheus metrics.

Context rule: the prompt must fit the model's context (else 400 naming the limit);
``max_tokens`` is *clamped* to what is left of the context, and a reply cut there
ends with ``finish_reason: "length"`` — as the engine itself does.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import json
import time
import uuid
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Any

from fastapi import Depends, FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from pydantic import BaseModel, ConfigDict

from llmlab.engine import Engine, EngineError
from llmlab.errors import LlmlabError
from llmlab.generate import PromptError, check_prompt
from llmlab.sampling import SamplingError, SamplingParams
from llmlab.serve.engine_loop import EngineLoop, RequestStream, ServerShuttingDown
from llmlab.serve.errors import OpenAIError, install_error_handlers
from llmlab.serve.metrics import ServerMetrics
from llmlab.serve.model import ServedModel
from llmlab.serve.text import IncrementalText

DISCONNECT_POLL_S = 0.25
"""How often a non-streaming request checks whether its client is still there."""


@dataclass
class ServingState:
    """What one app serves with: the model, the engine, its loop and metrics, the API key (or None)."""

    served: ServedModel
    engine: Engine
    loop: EngineLoop
    metrics: ServerMetrics
    api_key: str | None
    owns_engine: bool


# --- request bodies ------------------------------------------------------------------------


class _Body(BaseModel):
    model_config = ConfigDict(strict=True, extra="allow")

    model: str | None = None
    max_tokens: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None
    seed: int | None = None
    stop: str | list[str] | None = None
    n: int | None = None
    stream: bool = False
    stream_options: dict[str, Any] | None = None


class CompletionRequest(_Body):
    prompt: Any = None


class ChatRequest(_Body):
    messages: list[dict[str, Any]]
    max_completion_tokens: int | None = None


UNSUPPORTED: dict[str, Callable[[Any], bool]] = {
    "n": lambda v: v not in (None, 1),
    "best_of": lambda v: v not in (None, 1),
    "logprobs": lambda v: v not in (None, False),
    "top_logprobs": lambda v: v not in (None, 0),
    "echo": lambda v: v not in (None, False),
    "suffix": lambda v: v is not None,
    "tools": lambda v: bool(v),
    "tool_choice": lambda v: v not in (None, "none"),
    "functions": lambda v: bool(v),
    "logit_bias": lambda v: bool(v),
    "presence_penalty": lambda v: v not in (None, 0, 0.0),
    "frequency_penalty": lambda v: v not in (None, 0, 0.0),
    "response_format": lambda v: v is not None and not (isinstance(v, dict) and v.get("type") == "text"),
}
"""OpenAI fields this server does not implement, and which of their values would need them."""


def _refuse_unsupported(body: _Body) -> None:
    fields = {**body.model_dump(), **(body.model_extra or {})}
    for name, needs_it in UNSUPPORTED.items():
        if name in fields and needs_it(fields[name]):
            hint = "leave it out or set it to 1" if name in ("n", "best_of") else "leave it out"
            raise OpenAIError(f"{name}={fields[name]!r} is not supported by llmlab serve: {hint}.", param=name,
                              code="unsupported_parameter")


# --- the app -------------------------------------------------------------------------------


def create_app(served: ServedModel, *, api_key: str | None = None, engine: Engine | None = None,
               **engine_options: Any) -> FastAPI:
    """An OpenAI-compatible app serving ``served`` (notebook 15).

    ``engine``: an Engine over ``served.model`` (default: a new one with ``engine_options``,
    e.g. ``max_num_seqs=64, block_size=16``).  The engine thread starts with the app
    (its lifespan) and stops with it.  ``api_key``: clients must send
    ``Authorization: Bearer <api_key>`` to ``/v1/...`` (``/health`` and ``/metrics`` stay open).
    """
    owns = engine is None
    engine = Engine(served.model, **engine_options) if owns else engine
    metrics = ServerMetrics()
    state = ServingState(served, engine, _engine_loop(engine, metrics), metrics, api_key or None, owns)

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        state.loop.start()
        try:
            yield
        finally:
            await asyncio.to_thread(state.loop.stop)
            if state.owns_engine:
                engine.close()

    app = FastAPI(title="llmlab serve", summary="An OpenAI-compatible server over llmlab's engine (notebook 15)",
                  lifespan=lifespan)
    app.state.llmlab = state
    install_error_handlers(app)
    _add_routes(app, state)
    return app


def _engine_loop(engine: Engine, metrics: ServerMetrics) -> EngineLoop:
    """The engine's loop; a tensor-parallel engine's loop also sends its idle heartbeat to the other ranks."""
    comm = getattr(engine.runner, "comm", None)
    if comm is None or comm.world_size <= 1:
        return EngineLoop(engine, metrics)
    from llmlab.serve.parallel import heartbeat_seconds

    return EngineLoop(engine, metrics, on_idle=engine.runner.heartbeat, idle_interval=heartbeat_seconds())


def _add_routes(app: FastAPI, state: ServingState) -> None:
    auth = [Depends(_authorize(state))]

    @app.get("/health")
    async def health() -> dict[str, str]:
        return {"status": "ok"}

    @app.get("/metrics")
    async def metrics() -> Response:
        return Response(state.metrics.text(), media_type="text/plain; version=0.0.4; charset=utf-8")

    @app.get("/v1/models", dependencies=auth)
    async def models() -> dict[str, Any]:
        return {"object": "list", "data": [{"id": state.served.name, "object": "model", "created": 0,
                                            "owned_by": "llmlab", "max_model_len": state.served.context_length}]}

    @app.post("/v1/completions", dependencies=auth)
    async def completions(body: CompletionRequest, request: Request) -> Response:
        _check_model(state, body)
        prompt_ids = _completion_prompt(state.served, body.prompt)
        return await _serve(state, body, request, prompt_ids, chat=False)

    @app.post("/v1/chat/completions", dependencies=auth)
    async def chat_completions(body: ChatRequest, request: Request) -> Response:
        _check_model(state, body)
        prompt_ids = _chat_prompt(state.served, body.messages)
        return await _serve(state, body, request, prompt_ids, chat=True)


def _authorize(state: ServingState) -> Callable[[Request], None]:
    def check(request: Request) -> None:
        if state.api_key is None:
            return
        scheme, _, token = request.headers.get("authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(), state.api_key.encode()):
            raise OpenAIError("missing or wrong API key: send the header Authorization: Bearer <key> with the key "
                              "the server was started with (--api-key or LLMLAB_API_KEY).", status=401,
                              code="invalid_api_key")
    return check


def _check_model(state: ServingState, body: _Body) -> None:
    _refuse_unsupported(body)
    if body.model is not None and body.model != state.served.name:
        raise OpenAIError(f"the model {body.model!r} does not exist here: this server serves "
                          f"{[state.served.name]} (see GET /v1/models); ask for that name.", param="model",
                          code="model_not_found")


def _completion_prompt(served: ServedModel, prompt: Any) -> list[int]:
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], (str, list)):
        prompt = prompt[0]  # a batch of one
    if isinstance(prompt, str):
        if not prompt:
            raise OpenAIError("the prompt is empty: give at least one character (e.g. \"ROMEO:\").", param="prompt")
        try:
            ids = served.encode_prompt(prompt)
        except LlmlabError as err:
            raise OpenAIError(f"the prompt cannot be tokenized: {err}", param="prompt") from None
    elif isinstance(prompt, list) and all(isinstance(t, int) and not isinstance(t, bool) for t in prompt):
        ids = list(prompt)
    elif prompt is None:
        raise OpenAIError("the field 'prompt' is required: give a string or a list of token ids.", param="prompt")
    else:
        raise OpenAIError("prompt must be a string or a list of token ids (one prompt per request; send several "
                          "requests for several prompts).", param="prompt")
    return _fit(served, ids, "prompt")


def _chat_prompt(served: ServedModel, messages: list[dict[str, Any]]) -> list[int]:
    if served.chat_template is None:
        raise OpenAIError(f"the model {served.name!r} has no chat template, so it cannot chat: use "
                          "POST /v1/completions with a prompt, or serve an instruct/chat model.", param="messages",
                          code="no_chat_template")
    if not messages:
        raise OpenAIError("messages is empty: give at least one {\"role\": \"user\", \"content\": ...}.",
                          param="messages")
    try:
        ids = served.chat_ids([_plain_message(m) for m in messages])
    except LlmlabError as err:
        raise OpenAIError(f"the messages cannot be rendered with the chat template: {err}", param="messages") from None
    return _fit(served, ids, "messages")


def _plain_message(message: dict[str, Any]) -> dict[str, Any]:
    """A message whose content is a list of text parts, as one string (images and audio are refused)."""
    content = message.get("content")
    if isinstance(content, list):
        if not all(isinstance(p, dict) and p.get("type") == "text" and isinstance(p.get("text"), str) for p in content):
            raise OpenAIError("only text content is supported: each part must be {\"type\": \"text\", \"text\": ...}.",
                              param="messages")
        return {**message, "content": "".join(p["text"] for p in content)}
    return message


def _fit(served: ServedModel, ids: list[int], param: str) -> list[int]:
    try:
        check_prompt(ids, served.context_length)
    except PromptError as err:
        code = "context_length_exceeded" if ids else None
        raise OpenAIError(str(err), param=param, code=code) from None
    return ids


def _sampling_params(state: ServingState, body: _Body, n_prompt: int) -> SamplingParams:
    limit = body.max_completion_tokens if isinstance(body, ChatRequest) and body.max_tokens is None else body.max_tokens
    if limit is None:
        limit = 16 if not isinstance(body, ChatRequest) else state.served.context_length
    if limit < 1:
        raise OpenAIError(f"max_tokens must be ≥ 1, got {limit}.", param="max_tokens")
    room = state.served.context_length + 1 - n_prompt  # the engine's context rule (see the module docstring)
    try:
        return SamplingParams(temperature=1.0 if body.temperature is None else body.temperature, top_k=body.top_k,
                              top_p=body.top_p, max_new_tokens=min(limit, room), seed=body.seed,
                              stop_ids=tuple(state.served.stop_ids))
    except SamplingError as err:
        raise OpenAIError(str(err), param=err.param) from None


# --- one request, from submission to the last piece ---------------------------------------


@dataclass
class Piece:
    """New text for the client, the completion's token count so far, and its finish reason at the end."""

    text: str
    completion_tokens: int
    finish_reason: str | None = None


class _Interrupted(Exception):
    """The engine stopped the request (shutdown, a bug); the message is for the client."""


async def _serve(state: ServingState, body: _Body, request: Request, prompt_ids: list[int], chat: bool) -> Response:
    params = _sampling_params(state, body, len(prompt_ids))
    stop = [body.stop] if isinstance(body.stop, str) else list(body.stop or [])
    try:
        stream = await state.loop.submit(prompt_ids, params)
    except ServerShuttingDown as err:
        raise OpenAIError(str(err), status=503, type="server_error", code="shutting_down") from None
    except (SamplingError, PromptError, EngineError) as err:
        raise OpenAIError(str(err), param=getattr(err, "param", None) or "prompt") from None
    shape = _Shape(chat, state.served.name, len(prompt_ids))
    pieces = _pieces(state, stream, IncrementalText(state.served.tokenizer, stop))
    if body.stream:
        include_usage = bool((body.stream_options or {}).get("include_usage"))
        return StreamingResponse(_events(pieces, shape, include_usage), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
    return JSONResponse(await _collect(pieces, shape, request))


async def _pieces(state: ServingState, stream: RequestStream, text: IncrementalText) -> AsyncIterator[Piece]:
    """The request's text as it comes; closing this early (the client left) aborts the request."""
    count, done = 0, False
    try:
        while True:
            update = await stream.next()
            if update.error is not None:
                done = True
                raise _Interrupted(update.error)
            count += len(update.token_ids)
            ids = update.token_ids
            if update.finish_reason == "stop" and ids and ids[-1] in state.served.stop_ids:
                ids = ids[:-1]  # the stop token ends the reply; its text is not part of it
            delta = text.add(ids)
            if text.stopped:  # a stop string: the engine stops this request now
                if not update.last:
                    state.loop.abort(stream.request_id, "stop")
                done = True
                yield Piece(delta, count, "stop")
                return
            if update.last:
                done = True
                yield Piece(delta + text.flush(), count, update.finish_reason)
                return
            if delta:
                yield Piece(delta, count)
    finally:
        if not done:
            state.loop.abort(stream.request_id)


async def _collect(pieces: AsyncIterator[Piece], shape: _Shape, request: Request) -> dict[str, Any]:
    """A non-streaming reply; a client that hung up meanwhile gets its request aborted."""

    async def drain() -> tuple[str, Piece]:
        parts, last = [], Piece("", 0)
        async with contextlib.aclosing(pieces) as gen:
            async for last in gen:
                parts.append(last.text)
        return "".join(parts), last

    task = asyncio.ensure_future(drain())
    while not task.done():
        await asyncio.wait({task}, timeout=DISCONNECT_POLL_S)
        if not task.done() and await request.is_disconnected():
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
            raise OpenAIError("the client disconnected", status=499)
    try:
        text, last = task.result()
    except _Interrupted as err:
        raise OpenAIError(str(err), status=503, type="server_error", code="interrupted") from None
    return shape.full(text, last)


async def _events(pieces: AsyncIterator[Piece], shape: _Shape, include_usage: bool) -> AsyncIterator[str]:
    """Server-sent events: a chunk per piece of text, the finish reason, usage if asked, then ``[DONE]``."""
    last = Piece("", 0)
    async with contextlib.aclosing(pieces) as gen:
        try:
            if shape.chat:
                yield _sse(shape.chunk({"role": "assistant", "content": ""}, None, 0))
            async for last in gen:
                yield _sse(shape.chunk(last.text, last.finish_reason))
        except _Interrupted as err:
            yield _sse({"error": {"message": str(err), "type": "server_error", "param": None, "code": "interrupted"}})
            return
    if include_usage:
        yield _sse({**shape.chunk(None, None), "choices": [], "usage": shape.usage(last)})
    yield "data: [DONE]\n\n"


def _sse(data: dict[str, Any]) -> str:
    return f"data: {json.dumps(data, ensure_ascii=False)}\n\n"


class _Shape:
    """OpenAI's response bodies for one request: text completions or chat completions."""

    def __init__(self, chat: bool, model: str, prompt_tokens: int) -> None:
        self.chat, self.model, self.prompt_tokens = chat, model, prompt_tokens
        self.id = f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex}"
        self.created = int(time.time())

    def usage(self, last: Piece) -> dict[str, int]:
        n = last.completion_tokens
        return {"prompt_tokens": self.prompt_tokens, "completion_tokens": n, "total_tokens": self.prompt_tokens + n}

    def _head(self, object_name: str) -> dict[str, Any]:
        return {"id": self.id, "object": object_name, "created": self.created, "model": self.model}

    def full(self, text: str, last: Piece) -> dict[str, Any]:
        if self.chat:
            choice = {"index": 0, "message": {"role": "assistant", "content": text}, "logprobs": None,
                      "finish_reason": last.finish_reason}
            return {**self._head("chat.completion"), "choices": [choice], "usage": self.usage(last)}
        choice = {"index": 0, "text": text, "logprobs": None, "finish_reason": last.finish_reason}
        return {**self._head("text_completion"), "choices": [choice], "usage": self.usage(last)}

    def chunk(self, delta: Any, finish_reason: str | None, index: int = 0) -> dict[str, Any]:
        if self.chat:
            content = delta if isinstance(delta, dict) else ({} if finish_reason and not delta else {"content": delta})
            choice = {"index": index, "delta": content, "logprobs": None, "finish_reason": finish_reason}
            return {**self._head("chat.completion.chunk"), "choices": [choice]}
        choice = {"index": index, "text": delta or "", "logprobs": None, "finish_reason": finish_reason}
        return {**self._head("text_completion"), "choices": [choice]}
