"""OpenAI-compatible HTTP server over the embedded engine (`gq serve CKPT --engine hf`).

The app and its routes. Every answer to a client's mistake is a 4xx with OpenAI's error body
(`APIError`); 5xx means the server itself failed (500) or is stopping (503). The OpenAPI document
(/openapi.json) declares the request bodies from the pydantic request models (`api_models`) with
this server's facts filled in (the model id, the vocabulary's token ids) and every status a route
answers.
"""

from __future__ import annotations

import asyncio
import functools
import hmac
import json
import logging
from collections.abc import AsyncIterator

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.openapi.utils import get_openapi
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
    ChatLogprobs,
    ChatTokenLogprob,
    CompletionChoice,
    CompletionLogprobs,
    CompletionRequest,
    CompletionResponse,
    ErrorDetail,
    ErrorResponse,
    HealthStatus,
    ModelCard,
    ModelList,
    TopLogprob,
    Usage,
    new_id,
    now,
)
from gq_serve.engine import ContextTooLong, Engine, EngineStopped, QueueFull, RequestHandle
from gq_serve.metrics import CONTENT_TYPE, ServerMetrics
from gq_serve.sampling import TokenLogprob

log = logging.getLogger(__name__)

_ROUTES = ("/health", "/metrics", "/v1/models", "/v1/completions", "/v1/chat/completions")
_DISCONNECT_POLL_S = 0.25
# Request bodies above this are answered 413 before they are parsed. A full 8k-token context as
# text is ~40 KB, as token ids ~60 KB: 2 MiB leaves room for batches and long chats.
DEFAULT_MAX_BODY_BYTES = 2 * 1024 * 1024
MAX_BATCH = 16  # prompts in one /v1/completions request (decoded one after the other: a bigger batch
# only makes one client wait longer, and 16 x a full context already takes minutes on a CPU)
RETRY_AFTER_S = 1  # the Retry-After of a 429 (queue full) and of a 503 (stopping)


class APIError(Exception):
    """Any failure the client should see as an OpenAI-shaped error body."""

    def __init__(self, status: int, message: str, type_: str = "invalid_request_error",
                 param: str | None = None, code: str | None = None,
                 headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type_, param, code
        self.headers = dict(headers or {})
        if status in (429, 503):
            self.headers.setdefault("Retry-After", str(RETRY_AFTER_S))

    def body(self) -> ErrorResponse:
        return ErrorResponse(error=ErrorDetail(message=self.message, type=self.type, param=self.param,
                                               code=self.code))

    def response(self) -> JSONResponse:
        return JSONResponse(self.body().model_dump(), status_code=self.status, headers=self.headers or None)


async def _send_error(send, err: APIError) -> None:
    """Answer with ``err`` from plain ASGI middleware (before the app runs)."""
    body = err.body().model_dump_json().encode()
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    headers += [(k.lower().encode(), v.encode()) for k, v in err.headers.items()]
    await send({"type": "http.response.start", "status": err.status, "headers": headers})
    await send({"type": "http.response.body", "body": body})


class _CountRequests:
    """ASGI middleware counting responses by route and status (pure ASGI: keeps streaming intact),
    and the requests in progress (the drain at shutdown waits for them)."""

    def __init__(self, app, metrics: ServerMetrics, state) -> None:
        self.app, self.metrics, self.state = app, metrics, state

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        status = [500]

        async def send_wrapper(message) -> None:
            if message["type"] == "http.response.start":
                status[0] = message["status"]
            await send(message)

        self.state.http_in_flight += 1
        try:
            await self.app(scope, receive, send_wrapper)
        finally:
            self.state.http_in_flight -= 1
            path = scope.get("path", "")
            # Unknown paths share one label so scanners cannot grow the series without bound.
            endpoint = path if path in _ROUTES else "other"
            self.metrics.requests.inc(endpoint=endpoint, status=str(status[0]))


class _LimitBody:
    """ASGI middleware: a request body over ``limit`` bytes is answered 413 without reaching the app.

    A declared Content-Length over the limit is refused at once; otherwise the body is read (at
    most limit + 1 bytes) and replayed to the app, whose later receive() calls still see the
    client's disconnect.
    """

    def __init__(self, app, limit: int) -> None:
        self.app, self.limit = app, limit

    def _too_large(self) -> APIError:
        return APIError(413, f"the request body is larger than {self.limit} bytes (the server's "
                             f"--max-body-bytes)", code="request_too_large")

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http" or scope.get("method") in ("GET", "HEAD", "OPTIONS"):
            await self.app(scope, receive, send)
            return
        declared = dict(scope.get("headers") or ()).get(b"content-length")
        if declared is not None:
            try:
                too_big = int(declared) > self.limit
            except ValueError:
                await _send_error(send, APIError(400, "invalid Content-Length header"))
                return
            if too_big:
                await _send_error(send, self._too_large())
                return
        chunks, size = [], 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return  # the client left while sending: nobody to answer
            body = message.get("body", b"")
            size += len(body)
            if size > self.limit:
                await _send_error(send, self._too_large())
                return
            chunks.append(body)
            if not message.get("more_body", False):
                break
        replayed = False

        async def replay():
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": b"".join(chunks), "more_body": False}
            return await receive()

        await self.app(scope, replay, send)


def _validation_error(exc: ValidationError | RequestValidationError) -> APIError:
    err = exc.errors()[0]
    loc = [str(p) for p in err.get("loc", ()) if p != "body"]
    param = ".".join(loc) or None
    msg = str(err.get("msg", "invalid value"))
    if err.get("type") == "json_invalid":
        return APIError(400, f"the request body is not valid JSON (UTF-8, no NaN/Infinity, nested at "
                             f"most a few hundred levels): {msg}", code="invalid_json")
    if param is None:
        return APIError(400, f"invalid request body: {msg}", code="invalid_value")
    return APIError(400, f"invalid value for '{param}': {msg}", param=param, code="invalid_value")


def _sse(payload) -> str:
    data = payload.model_dump_json() if hasattr(payload, "model_dump_json") else json.dumps(payload)
    return f"data: {data}\n\n"


_ERROR_STATUSES = {
    400: "the request is invalid (the message and `param` say which part)",
    401: "missing or wrong API key (only when the server has one)",
    404: "no such model on this server",
    413: "the request body is too large",
    429: "the engine's queue is full: retry after `Retry-After` seconds",
    500: "the server failed (a bug: please report it)",
    503: "the server is stopping: retry on another replica or after `Retry-After` seconds",
}
_RETRY_HEADER = {"Retry-After": {"description": "seconds to wait before retrying",
                                 "schema": {"type": "integer", "minimum": 0}}}


def _error_responses(*statuses: int) -> dict:
    out = {}
    for s in statuses:
        entry = {"model": ErrorResponse, "description": _ERROR_STATUSES[s]}
        if s in (429, 503):
            entry["headers"] = _RETRY_HEADER
        out[s] = entry
    return out


def _sse_event(chunk: str) -> dict:
    """The schema of one server-sent event of a stream: a chunk (or, if the server fails mid-stream,
    an error body) as JSON, and `[DONE]` last."""
    payload = {"anyOf": [{"$ref": f"#/components/schemas/{chunk}"},
                         {"$ref": "#/components/schemas/ErrorResponse"}]}
    return {"type": "object", "required": ["data"], "properties": {"data": {"anyOf": [
        {"const": "[DONE]"},
        {"type": "string", "contentMediaType": "application/json", "contentSchema": payload}]}}}


def _generation_responses(model_cls, chunk: str) -> dict:
    ok = {"model": model_cls, "description": "the completion; with `stream: true` a text/event-stream "
                                             f"of {chunk} events, then `data: [DONE]`",
          "content": {"text/event-stream": {"schema": _sse_event(chunk)}}}
    return {200: ok, **_error_responses(400, 401, 404, 413, 429, 500, 503)}


def _model_schemas(models, mode: str) -> dict[str, dict]:
    """JSON schemas of pydantic models, their nested models lifted into components."""
    out: dict[str, dict] = {}
    for cls in models:
        schema = cls.model_json_schema(ref_template="#/components/schemas/{model}", mode=mode)
        out.update(schema.pop("$defs", {}))
        out[cls.__name__] = schema
    return out


def _body(name: str) -> dict:
    return {"requestBody": {"required": True, "content": {
        "application/json": {"schema": {"$ref": f"#/components/schemas/{name}"}}}}}


def create_app(engine: Engine, model_name: str, api_key: str | None = None,
               max_body_bytes: int = DEFAULT_MAX_BODY_BYTES) -> FastAPI:
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
    vocab = len(tokenizer)

    app = FastAPI(title="gq-serve", docs_url=None, redoc_url=None,
                  description="OpenAI-compatible API over a GuidedQuant checkpoint (embedded engine).")
    app.state.engine = engine
    app.state.metrics = metrics
    app.state.http_in_flight = 0
    app.add_middleware(_LimitBody, limit=max_body_bytes)
    app.add_middleware(_CountRequests, metrics=metrics, state=app.state)

    @app.exception_handler(APIError)
    async def _api_error(_: Request, exc: APIError) -> JSONResponse:
        return exc.response()

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(_: Request, exc: StarletteHTTPException) -> JSONResponse:
        # 404 / 405 from routing, in the same error shape clients parse everywhere else; the 405's
        # Allow header (the route's methods) is kept.
        return APIError(exc.status_code, f"{exc.detail}: see /v1/models, /v1/completions, "
                                         f"/v1/chat/completions", code=str(exc.status_code),
                        headers=getattr(exc, "headers", None)).response()

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
        if engine.draining:
            raise APIError(503, "the server is stopping and takes no new requests", type_="server_error",
                           code="shutting_down")
        # pydantic's JSON parser refuses invalid UTF-8, lone surrogates, NaN/Infinity, numbers out
        # of range and nesting past its recursion limit: all of them are 400s here, never 500s.
        try:
            req = model_cls.model_validate_json(await request.body())
        except ValidationError as exc:
            raise _validation_error(exc) from None
        refused = req.unsupported_parameter()
        if refused:
            raise APIError(400, refused[1], param=refused[0], code="unsupported_parameter")
        if req.model != model_name:
            raise APIError(404, f"the model '{req.model}' does not exist: this server serves "
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
            raise APIError(503, f"{exc}: the server is stopping", type_="server_error",
                           code="shutting_down") from None
        except ValueError as exc:
            raise APIError(400, str(exc)) from None
        metrics.prompt_tokens.inc(len(prompt_ids))
        return handle

    def check_fits(prompt_ids: list[int], max_tokens: int, prompt_param: str) -> None:
        try:
            engine.check_context(len(prompt_ids), max_tokens)
        except ContextTooLong as exc:
            fits = len(prompt_ids) < engine.max_model_len
            raise APIError(400, str(exc), param="max_tokens" if fits else prompt_param,
                           code="context_length_exceeded") from None

    start = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id

    def nonempty(ids: list[int]) -> list[int]:
        """An empty prompt starts from BOS (OpenAI's starts from <|endoftext|>)."""
        return ids if ids or start is None else [start]

    def encode(text: str, **kw) -> list[int]:
        return nonempty(tokenizer(text, **kw).input_ids)

    @functools.lru_cache(maxsize=65536)
    def token_text(token: int) -> str:
        return tokenizer.decode([token], skip_special_tokens=False, clean_up_tokenization_spaces=False)

    def top_dict(lp: TokenLogprob) -> dict[str, float]:
        return {token_text(t): v for t, v in lp.top}

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

    async def stream(request: Request, handles, make_chunk, usage_chunk) -> AsyncIterator[str]:
        """SSE of one or more handles in turn (a batch streams its prompts one after the other).

        ``handles``: an async iterator of (choice index, handle); ``make_chunk(index, handle, text,
        finish, lp_from, lp_to, first)`` builds one chunk (None: nothing to send), where
        handle.logprobs[lp_from:lp_to] are the tokens this chunk covers.
        """
        handle = None
        try:
            async for index, handle in handles:
                first = make_chunk(index, handle, None, None, 0, 0, True)
                if first is not None:
                    yield _sse(first)
                sent = seen = 0  # logprob entries already sent / events seen
                async for event in handle:
                    if await request.is_disconnected():
                        handle.cancel()
                        return
                    seen += 1
                    if event.text or event.finish_reason:
                        lp_to = seen if handle.params.logprobs is not None else 0
                        yield _sse(make_chunk(index, handle, event.text, event.finish_reason, sent, lp_to, False))
                        sent = lp_to
            if usage_chunk is not None:
                yield _sse(usage_chunk())
            yield "data: [DONE]\n\n"
        except APIError as exc:  # a later prompt of a batch was refused: the status line is sent
            yield _sse(exc.body())
            yield "data: [DONE]\n\n"
        except RuntimeError as exc:  # the worker failed mid-stream: the status line is already sent
            yield _sse(ErrorResponse(error=ErrorDetail(message=str(exc), type="server_error")))
            yield "data: [DONE]\n\n"
        finally:
            # Also runs on CancelledError/GeneratorExit when Starlette sees the client disconnect.
            if handle is not None:
                handle.cancel()

    def sse_response(body) -> StreamingResponse:
        return StreamingResponse(body, media_type="text/event-stream", headers={"Cache-Control": "no-cache"})

    # -- routes ---------------------------------------------------------------------------------
    @app.get("/health", response_model=HealthStatus,
             responses={503: {"model": HealthStatus, "description": "draining before shutdown"}})
    async def health():
        body = HealthStatus(status="draining" if engine.draining else "ok", model=model_name,
                            queue_depth=engine.queue_depth).model_dump()
        return JSONResponse(body, status_code=503 if engine.draining else 200)

    @app.get("/metrics", response_class=PlainTextResponse,
             responses={200: {"description": "Prometheus text exposition format 0.0.4",
                              "content": {"text/plain": {"schema": {"type": "string"}}}}})
    async def metrics_endpoint() -> PlainTextResponse:
        return PlainTextResponse(metrics.render(), media_type=CONTENT_TYPE)

    @app.get("/v1/models", response_model=ModelList, responses=_error_responses(401, 500))
    async def list_models(request: Request):
        authorize(request)
        card = ModelCard(id=model_name, created=created, max_model_len=engine.max_model_len)
        return ModelList(data=[card]).model_dump()

    def completion_prompts(req: CompletionRequest) -> list[tuple[list[int], str | None]]:
        """[(token ids, the prompt's text if it came as text)] of the request's one or more prompts."""
        prompt = req.prompt
        if isinstance(prompt, str):
            return [(encode(prompt), prompt)]
        if prompt and isinstance(prompt[0], (str, list)):  # a batch
            if len(prompt) > MAX_BATCH:
                raise APIError(400, f"{len(prompt)} prompts in one request: at most {MAX_BATCH}",
                               param="prompt")
            return [(encode(p), p) if isinstance(p, str) else (nonempty(list(p)), None) for p in prompt]
        return [(nonempty(list(prompt)), None)]

    def completion_logprobs(handle: RequestHandle, lp_from: int, lp_to: int,
                            echo: bool) -> CompletionLogprobs | None:
        if handle.params.logprobs is None:
            return None
        entries: list[TokenLogprob | None] = []
        tokens: list[int] = []
        if echo:
            tokens.append(handle.prompt_ids[0])
            entries.append(None)
            for lp in handle.prompt_logprobs or []:
                tokens.append(lp.token)
                entries.append(lp)
        for lp in handle.logprobs[lp_from:lp_to]:
            tokens.append(lp.token)
            entries.append(lp)
        texts = [token_text(t) for t in tokens]
        offsets, pos = [], 0
        for t in texts:
            offsets.append(pos)
            pos += len(t)
        return CompletionLogprobs(tokens=texts,
                                  token_logprobs=[None if e is None else e.logprob for e in entries],
                                  top_logprobs=[None if e is None else top_dict(e) for e in entries],
                                  text_offset=offsets)

    @app.post("/v1/completions", response_model=CompletionResponse,
              responses=_generation_responses(CompletionResponse, "CompletionResponse"),
              openapi_extra=_body("CompletionRequest"))
    async def completions(request: Request):
        req: CompletionRequest = await parse(request, CompletionRequest)
        prompts = completion_prompts(req)
        for i, (ids, _) in enumerate(prompts):
            param = "prompt" if len(prompts) == 1 else f"prompt.{i}"
            bad = [t for t in ids if not 0 <= t < vocab]
            if bad:
                raise APIError(400, f"token id {bad[0]} is outside the vocabulary [0, {vocab})", param=param)
            check_fits(ids, req.max_tokens or 16, param)
        max_tokens = req.max_tokens or 16
        rid, ts = new_id("cmpl"), now()

        def echo_text(i: int) -> str:
            ids, text = prompts[i]
            return text if text is not None else tokenizer.decode(ids, skip_special_tokens=False)

        if not req.stream:
            choices, usage = [], Usage(prompt_tokens=0, completion_tokens=0, total_tokens=0)
            for i, (ids, _) in enumerate(prompts):
                handle = submit(ids, max_tokens, req, "prompt")
                text, finish = await collect(request, handle)
                if req.echo:
                    text = echo_text(i) + text
                lp = completion_logprobs(handle, 0, len(handle.logprobs), req.echo)
                choices.append(CompletionChoice(index=i, text=text, finish_reason=finish, logprobs=lp))
                usage.prompt_tokens += len(ids)
                usage.completion_tokens += handle.completion_tokens
            usage.total_tokens = usage.prompt_tokens + usage.completion_tokens
            return CompletionResponse(id=rid, created=ts, model=model_name, usage=usage,
                                      choices=choices).model_dump()

        # The first prompt is submitted now, so a full queue is still a plain 429; the others
        # (a batch) each when the previous one is done.
        first_handle = submit(prompts[0][0], max_tokens, req, "prompt")
        handles_done: list[RequestHandle] = []

        async def handles():
            handle = first_handle
            for i in range(len(prompts)):
                if i:
                    handle = submit(prompts[i][0], max_tokens, req, f"prompt.{i}")
                handles_done.append(handle)
                yield i, handle

        def chunk(index, handle, text, finish, lp_from, lp_to, first):
            if first:
                if not req.echo:
                    return None
                # echo: the prompt (and its log-probabilities) come first, as their own chunk
                lp = completion_logprobs(handle, 0, 0, True)
                return CompletionResponse(id=rid, created=ts, model=model_name, choices=[
                    CompletionChoice(index=index, text=echo_text(index), logprobs=lp)])
            lp = completion_logprobs(handle, lp_from, lp_to, False)
            return CompletionResponse(id=rid, created=ts, model=model_name, choices=[
                CompletionChoice(index=index, text=text or "", finish_reason=finish, logprobs=lp)])

        def usage_chunk():
            p = sum(len(h.prompt_ids) for h in handles_done)
            c = sum(h.completion_tokens for h in handles_done)
            return CompletionResponse(id=rid, created=ts, model=model_name, choices=[],
                                      usage=Usage(prompt_tokens=p, completion_tokens=c, total_tokens=p + c))

        include_usage = req.stream_options is not None and req.stream_options.include_usage
        return sse_response(stream(request, handles(), chunk, usage_chunk if include_usage else None))

    def chat_logprobs(handle: RequestHandle, lp_from: int, lp_to: int) -> ChatLogprobs | None:
        if handle.params.logprobs is None:
            return None
        content = []
        for lp in handle.logprobs[lp_from:lp_to]:
            text = token_text(lp.token)
            top = [TopLogprob(token=token_text(t), logprob=v, bytes=list(token_text(t).encode()))
                   for t, v in lp.top]
            content.append(ChatTokenLogprob(token=text, logprob=lp.logprob, bytes=list(text.encode()),
                                            top_logprobs=top))
        return ChatLogprobs(content=content)

    @app.post("/v1/chat/completions", response_model=ChatCompletionResponse,
              responses=_generation_responses(ChatCompletionResponse, "ChatCompletionChunk"),
              openapi_extra=_body("ChatCompletionRequest"))
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
        prompt_ids = encode(text, add_special_tokens=False)
        max_tokens = req.max_completion_tokens or req.max_tokens
        if max_tokens is None:  # like vLLM: the rest of the context window
            max_tokens = max(1, engine.max_model_len - len(prompt_ids))
        handle = submit(prompt_ids, max_tokens, req, "messages")
        rid, ts = new_id("chatcmpl"), now()

        def usage_of(h: RequestHandle) -> Usage:
            p, c = len(h.prompt_ids), h.completion_tokens
            return Usage(prompt_tokens=p, completion_tokens=c, total_tokens=p + c)

        if not req.stream:
            out, finish = await collect(request, handle)
            return ChatCompletionResponse(
                id=rid, created=ts, model=model_name, usage=usage_of(handle),
                choices=[ChatChoice(message=AssistantMessage(content=out), finish_reason=finish,
                                    logprobs=chat_logprobs(handle, 0, len(handle.logprobs)))],
            ).model_dump()

        async def handles():
            yield 0, handle

        def chunk(index, h, text, finish, lp_from, lp_to, first):
            if first:
                delta, lp = ChatDelta(role="assistant", content=""), None
            else:
                delta, lp = ChatDelta(content=text if text else None), chat_logprobs(h, lp_from, lp_to)
            return ChatCompletionChunk(id=rid, created=ts, model=model_name,
                                       choices=[ChatChunkChoice(delta=delta, finish_reason=finish, logprobs=lp)])

        def usage_chunk():
            return ChatCompletionChunk(id=rid, created=ts, model=model_name, choices=[], usage=usage_of(handle))

        include_usage = req.stream_options is not None and req.stream_options.include_usage
        return sse_response(stream(request, handles(), chunk, usage_chunk if include_usage else None))

    # -- the OpenAPI document -----------------------------------------------------------------------
    def openapi() -> dict:
        if app.openapi_schema:
            return app.openapi_schema
        schema = get_openapi(title=app.title, version=app.version, description=app.description,
                             routes=app.routes)
        components = schema.setdefault("components", {})
        schemas = components.setdefault("schemas", {})
        for name, sch in _model_schemas([ChatCompletionChunk], "serialization").items():
            schemas.setdefault(name, sch)
        schemas.update(_model_schemas([CompletionRequest, ChatCompletionRequest], "validation"))
        # This server's facts: the one model id it serves, its vocabulary's token ids.
        for name in ("CompletionRequest", "ChatCompletionRequest"):
            schemas[name]["properties"]["model"]["enum"] = [model_name]
        token = {"type": "integer", "minimum": 0, "maximum": vocab - 1}
        for branch in schemas["CompletionRequest"]["properties"]["prompt"]["anyOf"]:
            items = branch.get("items")
            if items is None:
                continue
            if items.get("type") == "integer":
                branch["items"] = token
            elif items.get("type") == "array":
                branch["items"] = {"type": "array", "items": token}
                branch["minItems"], branch["maxItems"] = 1, MAX_BATCH
            elif items.get("type") == "string":
                branch["minItems"], branch["maxItems"] = 1, MAX_BATCH
        if api_key is not None:
            components["securitySchemes"] = {"bearer": {"type": "http", "scheme": "bearer"}}
            for path, ops in schema["paths"].items():
                if path.startswith("/v1/"):
                    for op in ops.values():
                        op["security"] = [{"bearer": []}]
        app.openapi_schema = schema
        return schema

    app.openapi = openapi
    return app
