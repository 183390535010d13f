"""OpenAI-compatible HTTP server over the embedded engine (`gq serve CKPT --engine hf`)."""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
from collections.abc import AsyncIterator

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse, StreamingResponse
from pydantic import ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException

from gq_serve.api_models import (
    AssistantMessage,
    ChatChoice,
    ChatChunkChoice,
    ChatCompletionChunk,
    ChatCompletionRequest,
    ChatCompletionResponse,
    ChatDelta,
    CompletionChoice,
    CompletionRequest,
    CompletionResponse,
    ErrorDetail,
    ErrorResponse,
    ModelCard,
    ModelList,
    Usage,
    new_id,
    now,
)
from gq_serve.engine import ContextTooLong, Engine, EngineStopped, QueueFull, RequestHandle
from gq_serve.metrics import CONTENT_TYPE, ServerMetrics

log = logging.getLogger(__name__)

_ROUTES = ("/health", "/metrics", "/v1/models", "/v1/completions", "/v1/chat/completions")
_DISCONNECT_POLL_S = 0.25


class APIError(Exception):
    """Any failure the client should see as an OpenAI-shaped error body."""

    def __init__(self, status: int, message: str, type_: str = "invalid_request_error",
                 param: str | None = None, code: str | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type_, param, code

    def response(self) -> JSONResponse:
        body = ErrorResponse(error=ErrorDetail(message=self.message, type=self.type,
                                               param=self.param, code=self.code))
        headers = {"Retry-After": "1"} if self.status == 429 else None
        return JSONResponse(body.model_dump(), status_code=self.status, headers=headers)


class _CountRequests:
    """ASGI middleware counting responses by route and status (pure ASGI: keeps streaming intact)."""

    def __init__(self, app, metrics: ServerMetrics) -> None:
        self.app, self.metrics = app, metrics

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        status = [500]

        async def send_wrapper(message) -> None:
            if message["type"] == "http.response.start":
                status[0] = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_wrapper)
        finally:
            path = scope.get("path", "")
            # Unknown paths share one label so scanners cannot grow the series without bound.
            endpoint = path if path in _ROUTES else "other"
            self.metrics.requests.inc(endpoint=endpoint, status=str(status[0]))


def _validation_error(exc: ValidationError | RequestValidationError) -> APIError:
    err = exc.errors()[0]
    loc = [str(p) for p in err.get("loc", ()) if p != "body"]
    param = ".".join(loc) or None
    return APIError(400, f"invalid value for '{param}': {err.get('msg')}", param=param,
                    code="invalid_value")


def _sse(payload) -> str:
    data = payload.model_dump_json() if hasattr(payload, "model_dump_json") else json.dumps(payload)
    return f"data: {data}\n\n"


def create_app(engine: Engine, model_name: str, api_key: str | None = None) -> FastAPI:
    """The FastAPI app: /health, /metrics, /v1/models, /v1/completions, /v1/chat/completions."""
    metrics = ServerMetrics(queue_depth=lambda: engine.queue_depth,
                            running=lambda: 0 if engine.running is None else 1)

    def _on_finish(h: RequestHandle) -> None:
        metrics.generated_tokens.inc(h.completion_tokens)
        if h.cancelled:
            metrics.cancelled.inc()
        if h.ttft is not None:
            metrics.ttft.observe(h.ttft)
        if h.tpot is not None:
            metrics.tpot.observe(h.tpot)
        if h.finished_at is not None:
            metrics.e2e.observe(h.finished_at - h.submitted_at)

    engine.add_finish_listener(_on_finish)
    created = now()
    tokenizer = engine.tokenizer

    app = FastAPI(title="gq-serve", docs_url=None, redoc_url=None)
    app.state.engine = engine
    app.state.metrics = metrics
    app.add_middleware(_CountRequests, metrics=metrics)

    @app.exception_handler(APIError)
    async def _api_error(_: Request, exc: APIError) -> JSONResponse:
        return exc.response()

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(_: Request, exc: StarletteHTTPException) -> JSONResponse:
        # 404 / 405 from routing, in the same error shape clients parse everywhere else.
        return APIError(exc.status_code, f"{exc.detail}: see /v1/models, /v1/completions, "
                                         f"/v1/chat/completions", code=str(exc.status_code)).response()

    @app.exception_handler(Exception)
    async def _unexpected(_: Request, exc: Exception) -> JSONResponse:
        log.exception("unhandled error")
        return APIError(500, f"internal error: {type(exc).__name__}: {exc}", type_="server_error").response()

    @app.exception_handler(RequestValidationError)
    async def _fastapi_validation(_: Request, exc: RequestValidationError) -> JSONResponse:
        return _validation_error(exc).response()

    def authorize(request: Request) -> None:
        if api_key is None:
            return
        header = request.headers.get("authorization", "")
        scheme, _, token = header.partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(), api_key.encode()):
            raise APIError(401, "missing or incorrect API key: send 'Authorization: Bearer <key>' "
                                "with the key the server was started with (--api-key)",
                           code="invalid_api_key")

    async def parse(request: Request, model_cls):
        authorize(request)
        try:
            body = await request.json()
        except (json.JSONDecodeError, UnicodeDecodeError):
            raise APIError(400, "the request body is not valid JSON") from None
        if not isinstance(body, dict):
            raise APIError(400, "the request body must be a JSON object")
        try:
            req = model_cls.model_validate(body)
        except ValidationError as exc:
            raise _validation_error(exc) from None
        refused = req.unsupported_parameter()
        if refused:
            raise APIError(400, refused[1], param=refused[0], code="unsupported_parameter")
        if req.model != model_name:
            raise APIError(400, f"the model '{req.model}' does not exist: this server serves "
                                f"'{model_name}' (see GET /v1/models)", param="model",
                           code="model_not_found")
        return req

    def submit(prompt_ids: list[int], max_tokens: int, req, prompt_param: str) -> RequestHandle:
        try:
            handle = engine.submit(prompt_ids, req.sampling_params(max_tokens), loop=asyncio.get_running_loop())
        except ContextTooLong as exc:
            fits = len(prompt_ids) < engine.max_model_len
            raise APIError(400, str(exc), param="max_tokens" if fits else prompt_param,
                           code="context_length_exceeded") from None
        except QueueFull as exc:
            raise APIError(429, str(exc), type_="rate_limit_error", code="queue_full") from None
        except EngineStopped as exc:
            raise APIError(503, f"{exc}: the server is stopping", type_="server_error") from None
        except ValueError as exc:
            raise APIError(400, str(exc)) from None
        metrics.prompt_tokens.inc(len(prompt_ids))
        return handle

    async def watch_disconnect(request: Request, handle: RequestHandle) -> None:
        # Non-streaming handlers are not cancelled when the client leaves: poll and cancel.
        while not handle.is_cancelled:
            if await request.is_disconnected():
                handle.cancel()
                return
            await asyncio.sleep(_DISCONNECT_POLL_S)

    async def collect(request: Request, handle: RequestHandle) -> tuple[str, str | None]:
        watcher = asyncio.create_task(watch_disconnect(request, handle))
        parts: list[str] = []
        finish = None
        try:
            async for event in handle:
                parts.append(event.text)
                finish = event.finish_reason or finish
        except RuntimeError as exc:
            raise APIError(500, str(exc), type_="server_error") from None
        finally:
            watcher.cancel()
            handle.cancel()
        return "".join(parts), finish

    async def stream(request: Request, handle: RequestHandle, make_chunk, usage_chunk) -> AsyncIterator[str]:
        try:
            first = make_chunk(None, None, first=True)
            if first is not None:
                yield _sse(first)
            async for event in handle:
                if await request.is_disconnected():
                    handle.cancel()
                    return
                if event.text or event.finish_reason:
                    yield _sse(make_chunk(event.text, event.finish_reason))
            if usage_chunk is not None:
                yield _sse(usage_chunk())
            yield "data: [DONE]\n\n"
        except RuntimeError as exc:  # the worker failed mid-stream: the status line is already sent
            err = ErrorResponse(error=ErrorDetail(message=str(exc), type="server_error"))
            yield _sse(err)
            yield "data: [DONE]\n\n"
        finally:
            # Also runs on CancelledError/GeneratorExit when Starlette sees the client disconnect.
            handle.cancel()

    def usage_of(handle: RequestHandle) -> Usage:
        p, c = len(handle.prompt_ids), handle.completion_tokens
        return Usage(prompt_tokens=p, completion_tokens=c, total_tokens=p + c)

    @app.get("/health")
    async def health() -> dict:
        return {"status": "ok", "model": model_name, "queue_depth": engine.queue_depth}

    @app.get("/metrics")
    async def metrics_endpoint() -> PlainTextResponse:
        return PlainTextResponse(metrics.render(), media_type=CONTENT_TYPE)

    @app.get("/v1/models")
    async def list_models(request: Request) -> dict:
        authorize(request)
        card = ModelCard(id=model_name, created=created, max_model_len=engine.max_model_len)
        return ModelList(data=[card]).model_dump()

    @app.post("/v1/completions")
    async def completions(request: Request):
        req: CompletionRequest = await parse(request, CompletionRequest)
        prompt = req.prompt
        if isinstance(prompt, list) and prompt and isinstance(prompt[0], str):
            if len(prompt) != 1:
                raise APIError(400, f"batched prompts ({len(prompt)} in one request) are not "
                                    f"supported: send one request per prompt", param="prompt")
            prompt = prompt[0]
        if isinstance(prompt, str):
            prompt_ids = tokenizer(prompt).input_ids
        else:
            vocab = len(tokenizer)
            bad = [t for t in prompt if not 0 <= t < vocab]
            if bad:
                raise APIError(400, f"token id {bad[0]} is outside the vocabulary [0, {vocab})",
                               param="prompt")
            prompt_ids = list(prompt)
        handle = submit(prompt_ids, req.max_tokens or 16, req, "prompt")
        rid, ts = new_id("cmpl"), now()

        if not req.stream:
            text, finish = await collect(request, handle)
            return CompletionResponse(id=rid, created=ts, model=model_name, usage=usage_of(handle),
                                      choices=[CompletionChoice(text=text, finish_reason=finish)]).model_dump()

        def chunk(text, finish, first=False):
            if first:
                return None
            return CompletionResponse(id=rid, created=ts, model=model_name,
                                      choices=[CompletionChoice(text=text or "", finish_reason=finish)])

        def usage_chunk():
            return CompletionResponse(id=rid, created=ts, model=model_name, choices=[],
                                      usage=usage_of(handle))

        include_usage = req.stream_options is not None and req.stream_options.include_usage
        return StreamingResponse(stream(request, handle, chunk, usage_chunk if include_usage else None),
                                 media_type="text/event-stream", headers={"Cache-Control": "no-cache"})

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        req: ChatCompletionRequest = await parse(request, ChatCompletionRequest)
        if not getattr(tokenizer, "chat_template", None):
            raise APIError(400, f"the model '{model_name}' has no chat template in its tokenizer: "
                                f"use /v1/completions, or add a chat_template to tokenizer_config.json",
                           param="messages")
        messages = []
        for m in req.messages:
            content = m.content if isinstance(m.content, str) or m.content is None else \
                "".join(part.text or "" for part in m.content)
            messages.append({"role": m.role, "content": content or ""})
        try:
            text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        except Exception as exc:  # templates raise on e.g. roles out of order
            raise APIError(400, f"the model's chat template rejected the messages: {exc}",
                           param="messages") from None
        # The template already writes BOS and role markers: do not add special tokens twice.
        prompt_ids = tokenizer(text, add_special_tokens=False).input_ids
        max_tokens = req.max_completion_tokens or req.max_tokens
        if max_tokens is None:  # like vLLM: the rest of the context window
            max_tokens = max(1, engine.max_model_len - len(prompt_ids))
        handle = submit(prompt_ids, max_tokens, req, "messages")
        rid, ts = new_id("chatcmpl"), now()

        if not req.stream:
            text, finish = await collect(request, handle)
            return ChatCompletionResponse(
                id=rid, created=ts, model=model_name, usage=usage_of(handle),
                choices=[ChatChoice(message=AssistantMessage(content=text), finish_reason=finish)],
            ).model_dump()

        def chunk(text, finish, first=False):
            delta = ChatDelta(role="assistant", content="") if first else \
                ChatDelta(content=text if text else None)
            return ChatCompletionChunk(id=rid, created=ts, model=model_name,
                                       choices=[ChatChunkChoice(delta=delta, finish_reason=finish)])

        def usage_chunk():
            return ChatCompletionChunk(id=rid, created=ts, model=model_name, choices=[],
                                       usage=usage_of(handle))

        include_usage = req.stream_options is not None and req.stream_options.include_usage
        return StreamingResponse(stream(request, handle, chunk, usage_chunk if include_usage else None),
                                 media_type="text/event-stream", headers={"Cache-Control": "no-cache"})

    return app
