"""The wire format of the server: OpenAI chat-completions requests and responses as pydantic models.

Owns the request types (`ChatCompletionRequest` and its parts, validated on the way in; unknown
fields are ignored, as OpenAI clients send many), the response and stream-chunk types, the error body
``{"error": {"message", "type", "param", "code"}}`` (`error_body`) and `to_example`, which turns a
request into the canonical `Example` the prompt formats render, and `Limits` with `check_request`:
the bounds and the rules pydantic can't express (sizes, nesting, valid Unicode, tool schemas that are
JSON Schema, tool messages that answer earlier calls). Follows
https://platform.openai.com/docs/api-reference/chat.
"""

from __future__ import annotations

import time
import uuid
from typing import Any, Literal

from jsonschema.exceptions import SchemaError as JsonSchemaError
from jsonschema.validators import validator_for
from pydantic import BaseModel, ConfigDict, Field, model_validator

from calltune.infer.engine import RequestError
from calltune.schema import Example, Function, Message, SchemaError, Tool, ToolCall


def error_body(message: str, type: str = "invalid_request_error", param: str | None = None,
               code: str | None = None) -> dict[str, Any]:
    return {"error": {"message": message, "type": type, "param": param, "code": code}}


class _In(BaseModel):
    # strict: a boolean is true or false, not "yes" or 1; a number is not a string
    model_config = ConfigDict(extra="ignore", strict=True)


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


class Limits(BaseModel):
    """Bounds on one request, so that no client can exhaust the server (all configurable).

    `max_body_bytes` is enforced on the raw body before it is parsed (413); the others by
    `check_request` (400). The prompt's length against the model's context is checked once it is
    rendered (`calltune.infer.engine.plan`).
    """

    max_body_bytes: int = Field(4 * 2 ** 20, ge=1, description="request body size in bytes")
    max_messages: int = Field(1024, ge=1, description="messages per request")
    max_tools: int = Field(128, ge=1, description="tools per request (OpenAI's limit)")
    max_depth: int = Field(32, ge=1, description="nesting of a tool's JSON Schema or a call's arguments")
    max_stop: int = Field(4, ge=0, description="stop strings per request (OpenAI's limit)")


def _depth(value: Any, limit: int) -> int:
    """Nesting depth of JSON `value` (a scalar is 0), counted up to ``limit + 1`` without recursion."""
    deepest, stack = 0, [(value, 0)]
    while stack:
        node, d = stack.pop()
        deepest = max(deepest, d)
        if deepest > limit:
            break
        if isinstance(node, dict):
            stack.extend((v, d + 1) for v in node.values())
        elif isinstance(node, list):
            stack.extend((v, d + 1) for v in node)
    return deepest


def _bad_unicode(value: Any, where: str) -> str | None:
    """The path of the first string in `value` (keys too) that is not valid Unicode (a lone UTF-16
    surrogate, which JSON's ``\\ud800`` escapes can carry), or None."""
    stack = [(value, where)]
    while stack:
        node, path = stack.pop()
        if isinstance(node, str):
            try:
                node.encode("utf-8")
            except UnicodeEncodeError:
                return path
        elif isinstance(node, dict):
            for k, v in node.items():
                stack.append((k, path))
                stack.append((v, f"{path}.{k}" if isinstance(k, str) and k.isascii() else path))
        elif isinstance(node, list):
            stack.extend((v, f"{path}[{i}]") for i, v in enumerate(node))
        elif isinstance(node, BaseModel):
            stack.extend((getattr(node, f), f"{path}.{f}" if path else f) for f in type(node).model_fields)
    return None


def _external_ref(schema: Any) -> str | None:
    """The first ``$ref`` in `schema` that points outside it (not ``#...``), or None."""
    stack = [schema]
    while stack:
        node = stack.pop()
        if isinstance(node, dict):
            ref = node.get("$ref")
            if isinstance(ref, str) and not ref.startswith("#"):
                return ref
            stack.extend(node.values())
        elif isinstance(node, list):
            stack.extend(node)
    return None


def check_request(request: ChatCompletionRequest, limits: Limits) -> None:
    """What a request must also satisfy beyond its field types.

    Raises:
        RequestError (400, `param` naming the field): more messages, tools or stop strings than
            `limits` allow; a string that is not valid Unicode; a tool's ``parameters`` nested deeper
            than ``limits.max_depth``, not a valid JSON Schema (checked against its declared draft,
            2020-12 by default) or with a ``$ref`` outside itself (nothing is fetched); an assistant
            call to a function that is not among the tools; a call id used twice; a ``tool`` message
            that answers no earlier call of the conversation.
    """
    if len(request.messages) > limits.max_messages:
        raise RequestError(f"messages: {len(request.messages)} messages; this server takes at most "
                           f"{limits.max_messages} per request", param="messages")
    tools = request.tools or []
    if len(tools) > limits.max_tools:
        raise RequestError(f"tools: {len(tools)} tools; this server takes at most {limits.max_tools} per request",
                           param="tools")
    if len(request.stop_list) > limits.max_stop:
        raise RequestError(f"stop: {len(request.stop_list)} stop strings; at most {limits.max_stop}", param="stop")
    bad = _bad_unicode(request, "")
    if bad is not None:
        raise RequestError(f"{bad}: the text is not valid Unicode (a lone UTF-16 surrogate)", param=bad)
    for i, tool in enumerate(tools):
        _check_parameters(tool.function.parameters, f"tools[{i}].function.parameters", limits)
    names = {t.function.name for t in tools}
    open_calls: dict[str, str] = {}  # call id -> function, of calls not answered yet
    seen: set[str] = set()
    for i, m in enumerate(request.messages):
        for j, call in enumerate(m.tool_calls or []):
            where = f"messages[{i}].tool_calls[{j}]"
            if call.function.name not in names:
                offered = ", ".join(sorted(names)) or "no tools"
                raise RequestError(f"{where}.function.name: the assistant calls {call.function.name!r}, which is not "
                                   f"among the request's tools ({offered}); send the tools the conversation used",
                                   param=f"{where}.function.name")
            if isinstance(call.function.arguments, dict) and _depth(call.function.arguments, limits.max_depth) > limits.max_depth:
                raise RequestError(f"{where}.function.arguments: nested deeper than {limits.max_depth} levels",
                                   param=f"{where}.function.arguments")
            if call.id in seen:
                raise RequestError(f"{where}.id: the call id {call.id!r} is used twice", param=f"{where}.id")
            seen.add(call.id)
            open_calls[call.id] = call.function.name
        if m.role == "tool":
            if m.tool_call_id not in open_calls:
                waiting = ", ".join(repr(k) for k in open_calls) or "none"
                raise RequestError(f"messages[{i}].tool_call_id: {m.tool_call_id!r} answers no earlier tool call "
                                   f"of the conversation (calls waiting for a result: {waiting})",
                                   param=f"messages[{i}].tool_call_id")
            del open_calls[m.tool_call_id]


def _check_parameters(schema: dict[str, Any] | None, where: str, limits: Limits) -> None:
    if schema is None:
        return
    if _depth(schema, limits.max_depth) > limits.max_depth:
        raise RequestError(f"{where}: the JSON Schema is nested deeper than {limits.max_depth} levels", param=where)
    ref = _external_ref(schema)
    if ref is not None:
        raise RequestError(f"{where}: $ref {ref!r} points outside the schema; only references inside it "
                           "(\"#/...\") are resolved, nothing is fetched", param=where)
    try:
        validator_for(schema).check_schema(schema)
    except JsonSchemaError as err:
        at = "/".join(str(p) for p in err.path)
        raise RequestError(f"{where}: not a valid JSON Schema{f' at {at}' if at else ''}: "
                           f"{err.message.splitlines()[0][:200]}", param=where) from None


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
