"""The wire format of the server: OpenAI chat-completions requests and responses as pydantic models.

Owns the request types (`ChatCompletionRequest` and its parts, validated on the way in; unknown
fields are ignored, as OpenAI clients send many), the response and stream-chunk types, the error body
``{"error": {"message", "type", "param", "code"}}`` (`error_body`) and `to_example`, which turns a
request into the canonical `Example` the prompt formats render. Follows
https://platform.openai.com/docs/api-reference/chat.
"""

from __future__ import annotations

import time
import uuid
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from calltune.infer.engine import RequestError
from calltune.schema import Example, Function, Message, SchemaError, Tool, ToolCall


def error_body(message: str, type: str = "invalid_request_error", param: str | None = None,
               code: str | None = None) -> dict[str, Any]:
    return {"error": {"message": message, "type": type, "param": param, "code": code}}


class _In(BaseModel):
    model_config = ConfigDict(extra="ignore")


# -- requests --------------------------------------------------------------------------------------
class FunctionCallParam(_In):
    name: str = Field(min_length=1)
    arguments: str | dict[str, Any] = "{}"


class ToolCallParam(_In):
    id: str = Field(min_length=1)
    type: Literal["function"] = "function"
    function: FunctionCallParam


class ContentPart(_In):
    type: str
    text: str | None = None


class ChatMessage(_In):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[ContentPart] | None = None
    name: str | None = None
    tool_calls: list[ToolCallParam] | None = None
    tool_call_id: str | None = None

    @model_validator(mode="after")
    def _check(self) -> "ChatMessage":
        if self.role == "tool" and not self.tool_call_id:
            raise ValueError("a tool message needs tool_call_id (the id of the call it answers)")
        if self.tool_calls and self.role != "assistant":
            raise ValueError(f"tool_calls is only allowed on assistant messages, not on role {self.role!r}")
        if isinstance(self.content, list) and any(p.type != "text" for p in self.content):
            kinds = sorted({p.type for p in self.content if p.type != "text"})
            raise ValueError(f"only text content parts are supported, got {', '.join(kinds)}")
        return self

    def text(self) -> str | None:
        if isinstance(self.content, list):
            return "".join(p.text or "" for p in self.content)
        return self.content


class FunctionDefinition(_In):
    name: str = Field(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9_.\-]+$")
    description: str | None = None
    parameters: dict[str, Any] | None = None
    strict: bool | None = None


class ToolParam(_In):
    type: Literal["function"] = "function"
    function: FunctionDefinition


class NamedFunction(_In):
    name: str = Field(min_length=1)


class NamedToolChoice(_In):
    type: Literal["function"] = "function"
    function: NamedFunction


class StreamOptions(_In):
    include_usage: bool = False


class JsonSchemaFormat(_In):
    name: str = "response"
    schema_: dict[str, Any] = Field(default_factory=dict, alias="schema")
    strict: bool | None = None


class ResponseFormat(_In):
    type: Literal["text", "json_object", "json_schema"] = "text"
    json_schema: JsonSchemaFormat | None = None


class ChatCompletionRequest(_In):
    """POST /v1/chat/completions. Fields not listed are accepted and ignored.

    `temperature` defaults to 0 (greedy; OpenAI's default is 1): tool calling wants the model's best
    guess. `constrained` (a calltune extension, ``extra_body={"constrained": false}`` in the openai
    client) overrides the server's constrained-decoding setting for one request.
    """

    model: str = Field(min_length=1)
    messages: list[ChatMessage] = Field(min_length=1)
    tools: list[ToolParam] | None = None
    tool_choice: Literal["none", "auto", "required"] | NamedToolChoice | None = None
    parallel_tool_calls: bool | None = None
    max_tokens: int | None = Field(None, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    temperature: float | None = Field(None, ge=0, le=2)
    top_p: float | None = Field(None, gt=0, le=1)
    n: int = Field(1, ge=1)
    stream: bool = False
    stream_options: StreamOptions | None = None
    stop: str | list[str] | None = None
    seed: int | None = None
    response_format: ResponseFormat | None = None
    constrained: bool | None = None

    @model_validator(mode="after")
    def _check(self) -> "ChatCompletionRequest":
        if self.n != 1:
            raise ValueError("n must be 1: this server returns one choice per request")
        names = [t.function.name for t in self.tools or []]
        if len(set(names)) != len(names):
            raise ValueError(f"tools: duplicate function names {sorted({n for n in names if names.count(n) > 1})}")
        if self.tool_choice in ("required",) or isinstance(self.tool_choice, NamedToolChoice):
            if not names:
                raise ValueError("tool_choice requires a call but no tools are given")
        if isinstance(self.tool_choice, NamedToolChoice) and self.tool_choice.function.name not in names:
            raise ValueError(f"tool_choice names function {self.tool_choice.function.name!r}, "
                             f"which is not among the tools ({', '.join(names)})")
        return self

    @property
    def choice(self) -> str:
        """``none``, ``auto``, ``required`` or ``function`` (a named function), defaults applied."""
        if isinstance(self.tool_choice, NamedToolChoice):
            return "function"
        return self.tool_choice or ("auto" if self.tools else "none")

    @property
    def stop_list(self) -> list[str]:
        return [self.stop] if isinstance(self.stop, str) else list(self.stop or [])


def to_example(request: ChatCompletionRequest) -> Example:
    """The request's conversation and tools as a canonical `Example` (``developer`` becomes ``system``).

    Raises:
        RequestError: a message does not fit the canonical schema (the param names it), or the
            conversation ends on an assistant turn (continuing a turn is not supported).
    """
    messages = []
    for i, m in enumerate(request.messages):
        try:
            calls = None
            if m.tool_calls:
                calls = [ToolCall(id=c.id, function=Function(name=c.function.name, arguments=c.function.arguments))
                         for c in m.tool_calls]
            role = "system" if m.role == "developer" else m.role
            content = m.text()
            if role == "tool" and content is None:
                content = ""
            messages.append(Message(role=role, content=content, tool_calls=calls, tool_call_id=m.tool_call_id,
                                    name=m.name if role == "tool" else None))
        except SchemaError as err:
            raise RequestError(f"messages[{i}]: {err}", param=f"messages[{i}]") from None
    if messages[-1].role == "assistant":
        raise RequestError("the last message is an assistant message; end with a user or tool message "
                           "(continuing an assistant turn is not supported)", param="messages")
    try:
        tools = [Tool(function={"name": t.function.name, "description": t.function.description or "",
                                "parameters": t.function.parameters}) for t in request.tools or []]
    except SchemaError as err:
        raise RequestError(f"tools: {err}", param="tools") from None
    return Example(messages=messages, tools=tools)


# -- responses -------------------------------------------------------------------------------------
def new_id(prefix: str) -> str:
    return f"{prefix}{uuid.uuid4().hex[:24]}"


def call_to_wire(call: ToolCall) -> dict[str, Any]:
    """The OpenAI ``tool_calls[i]`` dict: id, type and the arguments as a JSON string."""
    return {"id": call.id, **call.to_openai()}


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class ResponseMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str | None = None
    refusal: str | None = None
    tool_calls: list[dict[str, Any]] | None = None


class Choice(BaseModel):
    index: int = 0
    message: ResponseMessage
    finish_reason: Literal["stop", "length", "tool_calls"]
    logprobs: None = None


class ChatCompletion(BaseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int = Field(default_factory=lambda: int(time.time()))
    model: str
    system_fingerprint: str = "calltune"
    choices: list[Choice]
    usage: Usage


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int = 0
    owned_by: str = "calltune"


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]
