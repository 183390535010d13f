"""OpenAI-compatible request/response schema (the subset gq serve implements).

The request models are both the runtime validation (strict: no "1" for 1, no NaN) and the source of
the OpenAPI document (`gq_serve.server`), so the two cannot drift. Parameters we do not implement
are declared so they can be refused by name: a client asking for n=2 or tools must get a 400 that
says so, never a silently different answer. Their neutral values (n=1, penalties 0, ...) are
accepted because they change nothing, and the schema lists exactly those values. Unknown keys are
collected rather than rejected by pydantic, so the 400 names them; the schema says
``additionalProperties: false``.
"""

from __future__ import annotations

import time
import uuid
from typing import Annotated, Any, ClassVar, Literal

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, WithJsonSchema

from gq_serve.sampling import MAX_TOP_LOGPROBS, SamplingParams

# Values of each refused parameter that ask for nothing beyond what we implement.
_NEUTRAL: dict[str, tuple[Any, ...]] = {
    "n": (None, 1),
    "best_of": (None, 1),
    "suffix": (None, ""),
    "presence_penalty": (None, 0),
    "frequency_penalty": (None, 0),
    "logit_bias": (None, {}),
    "tools": (None, []),
    "functions": (None, []),
    "tool_choice": (None, "none"),
    "function_call": (None, "none"),
}
MAX_STOP = 4
INT64 = (-(2**63), 2**63 - 1)


def _integral(value: Any) -> Any:
    """JSON has one number type: 16.0 is the integer 16 (JSON Schema agrees), 16.5 is not."""
    if isinstance(value, float) and value.is_integer():
        return int(value)
    return value


def _int(**bounds: int) -> Any:
    """An integer field: strict (no "16", no true) but 16.0 is 16; ``bounds``: ge / le."""
    return Annotated[int, Field(**bounds), BeforeValidator(_integral)]


JsonInt = _int()


def _same(value: Any, ok: Any) -> bool:
    """JSON equality: booleans are not numbers (n=true is not n=1), 0.0 is 0."""
    if isinstance(value, bool) or isinstance(ok, bool):
        return isinstance(value, bool) and isinstance(ok, bool) and value == ok
    return (value is None) == (ok is None) and value == ok


def _only(*values: Any, description: str) -> Any:
    """A field accepted at runtime as anything (so the server can refuse it by name) whose schema
    lists only its neutral values."""
    return Annotated[Any, WithJsonSchema({"anyOf": [{"const": v} for v in values] + [{"type": "null"}],
                                          "description": description})]


_REQUEST_CONFIG = ConfigDict(extra="allow", strict=True, allow_inf_nan=False,
                             json_schema_extra={"additionalProperties": False})


class StreamOptions(BaseModel):
    model_config = ConfigDict(strict=True, extra="forbid")
    include_usage: bool = False


class _Request(BaseModel):
    # Unknown keys are collected (not rejected by pydantic) so the server can name them in a 400.
    model_config = _REQUEST_CONFIG

    model: str = Field(description="the served model id (GET /v1/models)")
    temperature: float = Field(1.0, ge=0.0, le=2.0, description="0: greedy")
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    stop: str | Annotated[list[str], Field(max_length=MAX_STOP)] | None = Field(
        None, description=f"up to {MAX_STOP} strings; the text ends before the first one")
    seed: _int(ge=INT64[0], le=INT64[1]) | None = Field(None,
                             description="reproducible sampling, whatever else the server runs")
    stream: bool = False
    stream_options: StreamOptions | None = None
    # vLLM's extension: benchmarks need a fixed output length.
    ignore_eos: bool = False
    user: str | None = None  # opaque end-user id: nothing to do with it, harmless to accept

    # Declared only to be refused when set to something non-neutral (see unsupported_parameter).
    n: _only(1, description="one choice per request: only 1") = None
    presence_penalty: _only(0, description="not implemented: only 0") = None
    frequency_penalty: _only(0, description="not implemented: only 0") = None
    logit_bias: Annotated[Any, WithJsonSchema({"anyOf": [{"type": "object", "maxProperties": 0},
                                                         {"type": "null"}],
                                               "description": "not implemented: only {}"})] = None

    UNSUPPORTED: ClassVar[tuple[str, ...]] = ("n", "presence_penalty", "frequency_penalty", "logit_bias")

    def stop_list(self) -> list[str]:
        if self.stop is None:
            return []
        return [self.stop] if isinstance(self.stop, str) else list(self.stop)

    def logprob_counts(self) -> tuple[int | None, int | None]:
        """(logprobs, prompt_logprobs) for SamplingParams: top-k per generated / prompt token."""
        return None, None

    def sampling_params(self, max_tokens: int) -> SamplingParams:
        """How the engine decodes this request (``max_tokens`` resolved by the endpoint)."""
        logprobs, prompt_logprobs = self.logprob_counts()
        return SamplingParams(max_tokens=max_tokens, temperature=self.temperature, top_p=self.top_p,
                              stop=tuple(self.stop_list()), seed=self.seed, ignore_eos=self.ignore_eos,
                              logprobs=logprobs, prompt_logprobs=prompt_logprobs)

    def unsupported_parameter(self) -> tuple[str, str] | None:
        """(param, message) for the first parameter this server cannot honour, else None."""
        for name in self.model_extra or {}:
            return name, (f"unknown parameter '{name}': gq serve does not implement it; "
                          f"remove it from the request")
        for name in self.UNSUPPORTED:
            value = getattr(self, name)
            if any(_same(value, ok) for ok in _NEUTRAL[name]):
                continue
            if name == "n":
                return name, (f"n={value!r} is not supported: gq serve returns one choice per request; "
                              f"use n=1 and send that many requests (with different seeds)")
            return name, f"'{name}'={value!r} is not supported by gq serve; remove it from the request"
        return None


_PROMPT_DOC = ("a string, a list of token ids, or a batch: a list of strings or of token-id lists "
               "(one choice per prompt, in order); an empty prompt starts from the BOS token")


class CompletionRequest(_Request):
    prompt: str | list[JsonInt] | list[str] | list[list[JsonInt]] = Field(description=_PROMPT_DOC)
    max_tokens: _int(ge=1) | None = Field(16, description="OpenAI's default for /v1/completions: 16")
    echo: bool = Field(False, description="return the prompt before the completion (with logprobs: "
                                          "the prompt tokens' log-probabilities too)")
    logprobs: _int(ge=0, le=MAX_TOP_LOGPROBS) | None = Field(None,
                                 description="log-probability of each token and the k most likely "
                                             "alternatives")
    best_of: _only(1, description="only 1") = None
    suffix: _only("", description="not implemented: only empty") = None

    UNSUPPORTED: ClassVar[tuple[str, ...]] = _Request.UNSUPPORTED + ("best_of", "suffix")

    def logprob_counts(self) -> tuple[int | None, int | None]:
        return self.logprobs, (self.logprobs if self.echo and self.logprobs is not None else None)


class ContentPart(BaseModel):
    model_config = ConfigDict(extra="allow", strict=True)
    type: str = Field(json_schema_extra={"const": "text"}, description="text only")
    text: str | None = None


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="allow", strict=True)
    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[ContentPart] | None = None
    name: str | None = None


class ChatCompletionRequest(_Request):
    messages: list[ChatMessage] = Field(min_length=1)
    max_tokens: _int(ge=1) | None = Field(None, description="None: the rest of the context window")
    max_completion_tokens: _int(ge=1) | None = None
    logprobs: bool = Field(False, description="log-probability of each generated token")
    top_logprobs: _int(ge=0, le=MAX_TOP_LOGPROBS) | None = Field(None,
                                     description="with logprobs: the k most likely alternatives")
    tools: Annotated[Any, WithJsonSchema({"anyOf": [{"type": "array", "maxItems": 0}, {"type": "null"}],
                                          "description": "no tool calling: only []"})] = None
    tool_choice: _only("none", description="no tool calling: only 'none'") = None
    functions: Annotated[Any, WithJsonSchema({"anyOf": [{"type": "array", "maxItems": 0},
                                                        {"type": "null"}]})] = None
    function_call: _only("none", description="no tool calling: only 'none'") = None
    response_format: Annotated[Any, WithJsonSchema({
        "anyOf": [{"type": "object", "properties": {"type": {"const": "text"}}, "required": ["type"],
                   "additionalProperties": False}, {"type": "null"}],
        "description": "text only (no constrained decoding)"})] = None
    parallel_tool_calls: bool | None = None  # meaningless without tools

    UNSUPPORTED: ClassVar[tuple[str, ...]] = _Request.UNSUPPORTED + (
        "tools", "tool_choice", "functions", "function_call",
    )

    def logprob_counts(self) -> tuple[int | None, int | None]:
        return (self.top_logprobs or 0) if self.logprobs else None, None

    def unsupported_parameter(self) -> tuple[str, str] | None:
        found = super().unsupported_parameter()
        if found:
            return found
        fmt = self.response_format
        if fmt is not None and not (isinstance(fmt, dict) and fmt == {"type": "text"}):
            return "response_format", ("response_format other than {'type': 'text'} is not supported "
                                       "by gq serve (no constrained decoding)")
        for i, msg in enumerate(self.messages):
            if isinstance(msg.content, list):
                for j, part in enumerate(msg.content):
                    if part.type != "text":
                        return (f"messages[{i}].content[{j}].type",
                                f"content part type '{part.type}' is not supported: text only")
        return None


# ---- responses -------------------------------------------------------------------------------


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:24]}"


def now() -> int:
    return int(time.time())


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class CompletionLogprobs(BaseModel):
    """OpenAI's legacy completions shape: one entry per token (with echo: prompt tokens first; the
    first prompt token has no log-probability: null)."""

    tokens: list[str]
    token_logprobs: list[float | None]
    top_logprobs: list[dict[str, float] | None]
    text_offset: list[int]


class CompletionChoice(BaseModel):
    index: int = 0
    text: str
    logprobs: CompletionLogprobs | None = None
    finish_reason: str | None = None


class CompletionResponse(BaseModel):
    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: Usage | None = None


class AssistantMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str


class TopLogprob(BaseModel):
    token: str
    logprob: float
    bytes: list[int] | None = None


class ChatTokenLogprob(TopLogprob):
    top_logprobs: list[TopLogprob]


class ChatLogprobs(BaseModel):
    content: list[ChatTokenLogprob] | None = None


class ChatChoice(BaseModel):
    index: int = 0
    message: AssistantMessage
    logprobs: ChatLogprobs | None = None
    finish_reason: str | None = None


class ChatCompletionResponse(BaseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int
    model: str
    choices: list[ChatChoice]
    usage: Usage


class ChatDelta(BaseModel):
    role: Literal["assistant"] | None = None
    content: str | None = None


class ChatChunkChoice(BaseModel):
    index: int = 0
    delta: ChatDelta
    logprobs: ChatLogprobs | None = None
    finish_reason: str | None = None


class ChatCompletionChunk(BaseModel):
    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int
    model: str
    choices: list[ChatChunkChoice]
    usage: Usage | None = None


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "gq-serve"
    max_model_len: int | None = None


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


class ErrorDetail(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: str | None = None


class ErrorResponse(BaseModel):
    error: ErrorDetail


class HealthStatus(BaseModel):
    status: Literal["ok", "draining"]
    model: str
    queue_depth: int
