"""OpenAI-compatible request/response schema (the subset gq serve implements).

Parameters we do not implement are declared so they can be refused by name: a client asking for
n=2 or logprobs must get a 400 that says so, never a silently different answer. Their neutral
values (n=1, logprobs=false, penalties 0, ...) are accepted because they change nothing.
"""

from __future__ import annotations

import time
import uuid
from typing import Any, ClassVar, Literal

from pydantic import BaseModel, ConfigDict, Field

from gq_serve.sampling import SamplingParams


# Values of each refused parameter that ask for nothing beyond what we implement.
_NEUTRAL: dict[str, tuple[Any, ...]] = {
    "n": (None, 1),
    "best_of": (None, 1),
    "logprobs": (None, False),
    "top_logprobs": (None, 0),
    "echo": (None, False),
    "suffix": (None, ""),
    "presence_penalty": (None, 0),
    "frequency_penalty": (None, 0),
    "logit_bias": (None, {}),
    "tools": (None, []),
    "functions": (None, []),
    "tool_choice": (None, "none"),
    "function_call": (None, "none"),
    "parallel_tool_calls": (None, False, True),  # meaningless without tools
}


class _Request(BaseModel):
    # Unknown keys are collected (not rejected by pydantic) so the server can name them in a 400.
    model_config = ConfigDict(extra="allow")

    model: str
    temperature: float = Field(1.0, ge=0.0, le=2.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    stop: str | list[str] | None = None
    seed: int | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    # vLLM's extension: benchmarks need a fixed output length.
    ignore_eos: bool = False
    user: str | None = None  # opaque end-user id: nothing to do with it, harmless to accept

    # Declared only to be refused when set to something non-neutral (see unsupported_parameter).
    n: int | None = None
    logprobs: Any = None
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    logit_bias: dict[str, float] | None = None

    UNSUPPORTED: ClassVar[tuple[str, ...]] = ("n", "logprobs", "presence_penalty", "frequency_penalty", "logit_bias")

    def stop_list(self) -> list[str]:
        if self.stop is None:
            return []
        return [self.stop] if isinstance(self.stop, str) else list(self.stop)

    def sampling_params(self, max_tokens: int) -> SamplingParams:
        """How the engine decodes this request (``max_tokens`` resolved by the endpoint)."""
        return SamplingParams(max_tokens=max_tokens, temperature=self.temperature, top_p=self.top_p,
                              stop=tuple(self.stop_list()), seed=self.seed, ignore_eos=self.ignore_eos)

    def unsupported_parameter(self) -> tuple[str, str] | None:
        """(param, message) for the first parameter this server cannot honour, else None."""
        for name in self.model_extra or {}:
            return name, (f"unknown parameter '{name}': gq serve does not implement it; "
                          f"remove it from the request")
        for name in self.UNSUPPORTED:
            value = getattr(self, name)
            # bool vs number matters: logprobs=False is neutral, logprobs=0 asks for logprobs.
            if any(value is ok or (value == ok and isinstance(value, bool) == isinstance(ok, bool))
                   for ok in _NEUTRAL[name]):
                continue
            if name == "n":
                return name, (f"n={value} is not supported: gq serve returns one choice per request; "
                              f"use n=1 and send {value} requests (with different seeds)")
            return name, f"'{name}'={value!r} is not supported by gq serve; remove it from the request"
        if self.stop is not None and len(self.stop_list()) > 4:
            return "stop", "stop accepts at most 4 sequences"
        return None


class StreamOptions(BaseModel):
    include_usage: bool = False


class CompletionRequest(_Request):
    # A single prompt as text or token ids; lists of prompts (batched completions) are refused.
    prompt: str | list[int] | list[str]
    max_tokens: int | None = Field(16, ge=1)  # OpenAI's default for /v1/completions
    echo: bool | None = None
    best_of: int | None = None
    suffix: str | None = None

    UNSUPPORTED: ClassVar[tuple[str, ...]] = _Request.UNSUPPORTED + ("echo", "best_of", "suffix")


class ContentPart(BaseModel):
    model_config = ConfigDict(extra="allow")
    type: str
    text: str | None = None


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="allow")
    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[ContentPart] | None = None
    name: str | None = None


class ChatCompletionRequest(_Request):
    messages: list[ChatMessage] = Field(min_length=1)
    max_tokens: int | None = Field(None, ge=1)  # None: the rest of the context window
    max_completion_tokens: int | None = Field(None, ge=1)
    top_logprobs: int | None = None
    tools: list[Any] | None = None
    tool_choice: Any = None
    functions: list[Any] | None = None
    function_call: Any = None
    response_format: dict[str, Any] | None = None
    parallel_tool_calls: bool | None = None

    UNSUPPORTED: ClassVar[tuple[str, ...]] = _Request.UNSUPPORTED + (
        "top_logprobs", "tools", "tool_choice", "functions", "function_call", "parallel_tool_calls",
    )

    def unsupported_parameter(self) -> tuple[str, str] | None:
        found = super().unsupported_parameter()
        if found:
            return found
        if self.response_format and self.response_format.get("type", "text") != "text":
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


class CompletionChoice(BaseModel):
    index: int = 0
    text: str
    logprobs: None = None
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


class ChatChoice(BaseModel):
    index: int = 0
    message: AssistantMessage
    logprobs: None = None
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
    logprobs: None = None
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


_Request.model_rebuild()
CompletionRequest.model_rebuild()
ChatCompletionRequest.model_rebuild()
