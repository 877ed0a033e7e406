"""The HTTP server: OpenAI-compatible ``POST /v1/chat/completions`` and ``GET /v1/models`` (FastAPI).

With ``jobs=`` (a `calltune.serve.jobs.FineTuning`) it also serves OpenAI's files and fine-tuning jobs
routes and Scale LLM Engine's fine-tune routes, behind the same API key; a finished job's model is
added to the served models at once.

Owns `create_app` (the app for a set of models) and `run` (uvicorn). Requests are validated by
`calltune.serve.protocol` (types, then `check_request`'s bounds and rules), rendered and parsed by
each model's saved prompt format through `calltune.infer.engine`, and generated in their model's
continuous batch (`calltune.infer.scheduler.BatchScheduler`, one decode loop per loaded model):
concurrent requests decode together, up to `max_batch` at once with `max_queue` more waiting, each
joining as a slot frees and leaving when done. A request leaves the batch at the next decode step
when its client disconnects or the server is asked to stop (SIGTERM, Ctrl-C).

Errors always have OpenAI's shape ``{"error": {"message", "type", "param", "code"}}``: 400 for a
request that does not validate (including malformed JSON and a prompt longer than the context), 401
without the API key (every route but ``/health``, which says only "ok"), 404 for an unknown model or
route, 413 for a body over `Limits.max_body_bytes`, 429 with ``Retry-After`` (seconds) when the
model's batch and queue are full, 500 (message only, the traceback goes to the server log) for a bug.

Streaming (``stream: true``) sends server-sent events: a first chunk with the role, content deltas as
the model writes them, then each tool call (index, id, name, then its arguments) once the turn is
complete and parsed, a chunk with the finish reason, an optional usage chunk
(``stream_options.include_usage``) and ``data: [DONE]``.
"""

from __future__ import annotations

import hmac
import json
import logging
import threading
import time
from typing import Any, Iterator

import anyio
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from starlette.concurrency import iterate_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException

from calltune.infer import constrained as cd
from calltune.infer import engine
from calltune.infer.registry import ModelRegistry
from calltune.serve.protocol import (ChatCompletion, ChatCompletionRequest, Choice, Limits, ModelCard, ModelList,
                                     RequestError, ResponseMessage, Usage, call_to_wire, check_request, error_body,
                                     new_id, to_example)

log = logging.getLogger(__name__)


def _validation_message(err: RequestValidationError) -> tuple[str, str | None]:
    """The first validation problem as ``(message, param)``, e.g. ``("messages.0.role: ...", "messages.0.role")``."""
    problems = err.errors()
    if not problems:
        return "invalid request", None
    first = problems[0]
    loc = [str(p) for p in first.get("loc", ()) if p != "body"]
    if first.get("type") == "json_invalid":
        return f"the request body is not valid JSON ({first.get('ctx', {}).get('error', first.get('msg'))})", None
    param = ".".join(loc) or None
    msg = str(first.get("msg", "invalid value")).removeprefix("Value error, ")
    more = f" (and {len(problems) - 1} more problems)" if len(problems) > 1 else ""
    return (f"{param}: {msg}" if param else msg) + more, param


class BodyLimit:
    """ASGI middleware: a request body over `max_bytes` gets 413 before anything reads it whole
    (checked on ``Content-Length`` and, for a chunked body, while it arrives)."""

    def __init__(self, app, max_bytes: int, paths: dict[str, int] | None = None):
        self.app, self.max_bytes, self.paths = app, max_bytes, paths or {}  # paths: their own limits (uploads)

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        limit = self.paths.get(scope["path"], self.max_bytes)
        declared = dict(scope.get("headers") or []).get(b"content-length")
        if declared is not None and (not declared.isdigit() or int(declared) > limit):
            return await self._refuse(send, limit)
        seen = 0

        async def counted():
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > limit:
                    raise _TooLarge
            return message

        try:
            await self.app(scope, counted, send)
        except _TooLarge:
            await self._refuse(send, limit)

    async def _refuse(self, send, limit: int):
        body = json.dumps(error_body(f"The request body is larger than this server's limit of {limit} "
                                     "bytes.", code="request_too_large")).encode()
        await send({"type": "http.response.start", "status": 413,
                    "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]})
        await send({"type": "http.response.body", "body": body})


class _TooLarge(Exception):
    pass


class ApiKey:
    """ASGI middleware: every request but ``/health`` needs ``Authorization: Bearer <key>`` or
    ``x-api-key: <key>`` (401 otherwise).

    A plain ASGI middleware rather than an ``@app.middleware("http")`` one, which would wrap the
    connection so that a handler can't see its client disconnect."""

    def __init__(self, app, key: str):
        self.app, self.expected, self.key = app, f"Bearer {key}".encode(), key.encode()

    async def __call__(self, scope, receive, send):
        if scope["type"] == "http" and scope["path"] != "/health":
            headers = dict(scope.get("headers") or [])
            given = headers.get(b"authorization", b"")
            other = headers.get(b"x-api-key", b"")  # how the Scale LLM Engine client sends it
            if not (hmac.compare_digest(given, self.expected) or hmac.compare_digest(other, self.key)):
                response = JSONResponse(error_body("Incorrect or missing API key: send `Authorization: Bearer <key>` "
                                                   "with the key the server was started with.",
                                                   code="invalid_api_key"), status_code=401)
                return await response(scope, receive, send)
        return await self.app(scope, receive, send)


def create_app(models: dict[str, str] | ModelRegistry, api_key: str | None = None, constrained: bool = True,
               default_max_tokens: int = 512, limits: Limits | None = None, jobs=None, max_batch: int = 8,
               max_queue: int | None = None, prefix_cache_mb: int | None = None) -> FastAPI:
    """The server app for `models` (``{name: model}`` or a loaded `ModelRegistry`, which keeps its own
    batch bounds; the app stops the decode loops of a registry it made when it shuts down).

    Args:
        api_key: when set, every request but ``GET /health`` needs ``Authorization: Bearer <api_key>``.
        constrained: constrain tool calls to the offered tools and their schemas (llguidance); a
            request may override it with ``"constrained": false``.
        default_max_tokens: completion length when a request gives no ``max_tokens`` (less if the
            model's context has less room).
        limits: bounds on each request (`Limits`' defaults if None).
        jobs: a `calltune.serve.jobs.FineTuning`: serve its files and fine-tuning routes too (then
            `models` may be empty); uploads get its `max_upload_bytes` instead of the body limit.
        max_batch: most requests decoding at once per loaded model.
        max_queue: most requests waiting for a slot per loaded model (default 4 * max_batch); beyond it, 429.
        prefix_cache_mb: MiB of earlier prompts' keys and values kept per loaded model, so a prompt that
            starts like an earlier one (same system prompt and tools) prefills only the rest (default 512).

    ``app.state.stopping`` (a `threading.Event`): set it to stop every running generation at its
    next step and refuse new ones (`run` sets it on SIGTERM and Ctrl-C).
    """
    own = not isinstance(models, ModelRegistry)
    registry = ModelRegistry(models, allow_empty=jobs is not None, max_batch=max_batch, max_queue=max_queue,
                             prefix_cache_mb=prefix_cache_mb) if own else models
    if constrained and not cd.available():
        log.warning("llguidance is not installed: serving without constrained decoding "
                    "(pip install 'calltune[serve]')")
        constrained = False
    limits = limits or Limits()
    app = FastAPI(title="calltune", version="1")
    app.state.registry = registry
    app.state.constrained = constrained
    app.state.stopping = threading.Event()
    app.add_middleware(BodyLimit, max_bytes=limits.max_body_bytes,
                       paths={"/v1/files": jobs.max_upload_bytes} if jobs is not None else None)

    if api_key:
        app.add_middleware(ApiKey, key=api_key)

    @app.exception_handler(RequestValidationError)
    async def on_validation_error(request: Request, err: RequestValidationError):
        message, param = _validation_message(err)
        return JSONResponse(error_body(message, param=param), status_code=400)

    if own:
        app.router.add_event_handler("shutdown", registry.close)

    @app.exception_handler(RequestError)
    async def on_request_error(request: Request, err: RequestError):
        return JSONResponse(error_body(err.message, type=err.type, param=err.param, code=err.code),
                            status_code=err.status, headers=err.headers)

    @app.exception_handler(engine.Cancelled)
    async def on_cancelled(request: Request, err: engine.Cancelled):
        return JSONResponse(error_body("The generation was cancelled: the server is shutting down or the client "
                                       "disconnected.", type="server_error", code="cancelled"), status_code=503)

    @app.exception_handler(StarletteHTTPException)
    async def on_http_error(request: Request, err: StarletteHTTPException):
        kind = "not_found_error" if err.status_code == 404 else "invalid_request_error"
        return JSONResponse(error_body(str(err.detail), type=kind), status_code=err.status_code)

    @app.exception_handler(Exception)
    async def on_bug(request: Request, err: Exception):
        log.exception("internal error on %s", request.url.path)
        return JSONResponse(error_body(f"internal server error ({type(err).__name__})", type="server_error"),
                            status_code=500)

    if jobs is not None:
        jobs.attach(app, registry)

    @app.get("/health")
    def health() -> dict[str, Any]:
        return {"status": "ok"}

    @app.get("/v1/models")
    def list_models() -> ModelList:
        return ModelList(data=[ModelCard(id=name) for name in registry.names()])

    @app.get("/v1/models/{name:path}")
    def get_model(name: str) -> ModelCard:
        _served(name)
        return ModelCard(id=name)

    def _served(name: str):
        served = registry.get(name)
        if served is None:
            raise RequestError(f"The model `{name}` does not exist. Models served: {', '.join(registry.names())}",
                               param="model", status=404, code="model_not_found")
        return served

    @app.post("/v1/chat/completions")
    async def chat_completions(body: ChatCompletionRequest, request: Request):
        served = _served(body.model)
        if app.state.stopping.is_set():
            raise RequestError("The server is shutting down.", status=503, type="server_error", code="shutting_down")
        _room_for_waiting_requests(registry)
        left = threading.Event()  # the client disconnected

        def cancelled() -> bool:
            return left.is_set() or app.state.stopping.is_set()

        def accept():
            check_request(body, limits)
            return to_example(body), _params(body, default_max_tokens, app.state.constrained)

        example, params = await anyio.to_thread.run_sync(accept)
        cid, created = new_id("chatcmpl-"), int(time.time())
        if body.stream:
            include_usage = bool(body.stream_options and body.stream_options.include_usage)
            events = engine.stream_complete(registry, served, example, params, cancel=cancelled)
            await anyio.to_thread.run_sync(next, events)  # ("start", None); request errors surface before the 200
            return StreamingResponse(_until_disconnect(_sse(cid, created, body.model, events, include_usage), left),
                                     media_type="text/event-stream")
        done = await _watching(request, left, lambda: engine.complete(registry, served, example, params,
                                                                       cancel=cancelled))
        message = done.message
        return ChatCompletion(
            id=cid, created=created, model=body.model,
            choices=[Choice(message=ResponseMessage(content=message.content if message.content or not message.tool_calls else None,
                                                    tool_calls=[call_to_wire(c) for c in message.tool_calls or []] or None),
                            finish_reason=done.finish_reason)],
            usage=Usage(prompt_tokens=done.prompt_tokens, completion_tokens=done.completion_tokens,
                        total_tokens=done.prompt_tokens + done.completion_tokens))

    return app


def _room_for_waiting_requests(registry: ModelRegistry) -> None:
    """Let anyio's worker threads (40 by default) cover every request that may be in flight, each
    waiting in one for its turn in a batch, plus 40 for everything else (streamed chunks, uploads)."""
    limiter = anyio.to_thread.current_default_thread_limiter()
    wanted = 40 + registry.most_requests()
    if limiter.total_tokens < wanted:
        limiter.total_tokens = wanted


async def _watching(request: Request, left: threading.Event, work):
    """Run `work` in a worker thread; meanwhile poll the connection and set `left` if the client goes."""
    result: dict[str, Any] = {}

    async def run(scope: anyio.CancelScope):
        try:
            result["value"] = await anyio.to_thread.run_sync(work)
        except BaseException as err:  # re-raised below, outside the task group
            result["error"] = err
        scope.cancel()

    async with anyio.create_task_group() as tasks:
        tasks.start_soon(run, tasks.cancel_scope)
        while True:
            await anyio.sleep(0.1)
            if await request.is_disconnected():
                left.set()
    if "error" in result:
        raise result["error"]
    return result["value"]


async def _until_disconnect(chunks: Iterator[str], left: threading.Event):
    """Stream `chunks` (made in a worker thread); when the client goes, set `left` so generation stops."""
    try:
        async for chunk in iterate_in_threadpool(chunks):
            yield chunk
    finally:
        left.set()


def _params(body: ChatCompletionRequest, default_max_tokens: int, constrained: bool) -> engine.Params:
    schema = None
    if body.response_format is not None and body.response_format.type == "json_object":
        schema = {"type": "object"}
    elif body.response_format is not None and body.response_format.type == "json_schema":
        if body.response_format.json_schema is None:
            raise RequestError("response_format json_schema needs json_schema.schema", param="response_format")
        schema = body.response_format.json_schema.schema_ or {"type": "object"}
    return engine.Params(
        tool_choice=body.choice,
        function=body.tool_choice.function.name if body.choice == "function" else None,
        parallel_tool_calls=body.parallel_tool_calls is not False,
        max_tokens=body.max_completion_tokens or body.max_tokens, default_max_tokens=default_max_tokens,
        temperature=body.temperature or 0.0, top_p=body.top_p or 1.0, stop=body.stop_list, seed=body.seed,
        constrained=constrained if body.constrained is None else body.constrained and cd.available(),
        json_schema=schema)


def _sse(cid: str, created: int, model: str, events: Iterator, include_usage: bool) -> Iterator[str]:
    def chunk(delta: dict[str, Any], finish_reason: str | None = None) -> str:
        body = {"id": cid, "object": "chat.completion.chunk", "created": created, "model": model,
                "system_fingerprint": "calltune",
                "choices": [{"index": 0, "delta": delta, "finish_reason": finish_reason, "logprobs": None}]}
        return f"data: {json.dumps(body)}\n\n"

    yield chunk({"role": "assistant", "content": ""})
    try:
        for kind, value in events:
            if kind == "content":
                yield chunk({"content": value})
                continue
            done: engine.Completion = value
            for i, call in enumerate(done.message.tool_calls or []):
                yield chunk({"tool_calls": [{"index": i, "id": call.id, "type": "function",
                                             "function": {"name": call.name, "arguments": ""}}]})
                yield chunk({"tool_calls": [{"index": i, "function": {"arguments": call_to_wire(call)["function"]["arguments"]}}]})
            yield chunk({}, done.finish_reason)
            if include_usage:
                usage = {"prompt_tokens": done.prompt_tokens, "completion_tokens": done.completion_tokens,
                         "total_tokens": done.prompt_tokens + done.completion_tokens}
                yield f"data: {json.dumps({'id': cid, 'object': 'chat.completion.chunk', 'created': created, 'model': model, 'choices': [], 'usage': usage})}\n\n"
    except Exception as err:  # the 200 is already sent: report in-stream, OpenAI style
        log.exception("error while streaming")
        yield f"data: {json.dumps(error_body(f'internal server error ({type(err).__name__})', type='server_error'))}\n\n"
    yield "data: [DONE]\n\n"


def run(models: dict[str, str], host: str = "127.0.0.1", port: int = 8000, api_key: str | None = None,
        constrained: bool = True, default_max_tokens: int = 512, limits: Limits | None = None, jobs=None,
        max_batch: int = 8, max_queue: int | None = None, prefix_cache_mb: int | None = None) -> None:
    """Load `models` and serve them with uvicorn until SIGTERM or Ctrl-C, which stop running
    generations at their next step, so the server exits within seconds. `jobs`, `max_batch`,
    `max_queue`, `prefix_cache_mb`: as in `create_app`."""
    import uvicorn

    app = create_app(models, api_key=api_key, constrained=constrained, default_max_tokens=default_max_tokens,
                     limits=limits, jobs=jobs, max_batch=max_batch, max_queue=max_queue,
                     prefix_cache_mb=prefix_cache_mb)

    class Server(uvicorn.Server):
        def handle_exit(self, sig, frame):
            app.state.stopping.set()
            super().handle_exit(sig, frame)

    Server(uvicorn.Config(app, host=host, port=port, log_level="info", timeout_graceful_shutdown=5)).run()
