"""The canonical schema: the one set of types every source produces and every later stage consumes.

Owns `Example`, `Message`, `ToolCall` and `Tool`, in the shape of the OpenAI chat-completions API
(https://platform.openai.com/docs/api-reference/chat) and of Hugging Face chat dicts, so that
`Example.messages_as_dicts()` passes to `tokenizer.apply_chat_template(..., tools=...)` unchanged.

Two choices differ from the wire format of the OpenAI API and are converted at the edges:
- `Function.arguments` is a parsed JSON object (``dict``), not a JSON string: cleaning, metrics and
  chat templates all want the object. `ToolCall.to_openai()` gives the string form back.
- Every type validates on construction; a bad field raises `SchemaError` whose message is the field
  path (``messages[2].tool_calls[0].function.name``) and what is wrong with it.

`Message.weight` is the per-message ``weight`` of OpenAI's chat fine-tuning data format
(https://platform.openai.com/docs/guides/fine-tuning, "FineTuneChatCompletionRequestAssistantMessage"
in the API reference): 0 or 1 on an assistant turn, 0 meaning the turn is context and is not
trained. It belongs to training data, not to the conversation, so `Message.to_dict()` (what chat
templates get) leaves it out; `Example.to_json()` keeps it.
"""

from __future__ import annotations

import json
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from calltune.errors import CalltuneError

Role = Literal["system", "user", "assistant", "tool"]


class SchemaError(CalltuneError):
    """A value does not fit the canonical schema; the message names the field path.

    `problems` is a list of ``(path, message)``, e.g. ``("messages[1].tool_calls[0].function.name",
    "String should have at least 1 character")``.
    """

    def __init__(self, type_name: str, problems: list[tuple[tuple, str]]):
        self.problems = [(_path(loc), msg) for loc, msg in problems]
        self._raw = problems
        super().__init__(f"{type_name}: " + "; ".join(f"{p}: {m}" for p, m in self.problems))


def _flatten(err: ValidationError) -> list[tuple[tuple, str]]:
    """Pydantic errors as (location, message); errors of nested models are merged into one path."""
    out = []
    for e in err.errors():
        inner = (e.get("ctx") or {}).get("error")
        if isinstance(inner, SchemaError):
            out += [(tuple(e["loc"]) + loc, msg) for loc, msg in inner._raw]
        else:
            out.append((tuple(e["loc"]), e["msg"].removeprefix("Value error, ")))
    return out


def _path(loc: tuple) -> str:
    out = ""
    for part in loc:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out or "<root>"


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=False)

    def __init__(self, **data: Any):
        try:
            super().__init__(**data)
        except ValidationError as err:
            raise SchemaError(type(self).__name__, _flatten(err)) from None


class Function(_Model):
    """A called function: its name and its arguments as a JSON object (not a string)."""

    name: str = Field(min_length=1)
    arguments: dict[str, Any] = Field(default_factory=dict)

    @field_validator("arguments", mode="before")
    @classmethod
    def _arguments_from_json(cls, value: Any) -> Any:
        # The OpenAI wire format carries arguments as a JSON string; accept it and parse it.
        if isinstance(value, str):
            try:
                value = json.loads(value) if value.strip() else {}
            except json.JSONDecodeError as err:
                raise ValueError(f"arguments is a string that is not JSON ({err.msg})") from None
        if value is None:
            return {}
        if not isinstance(value, dict):
            raise ValueError(f"arguments must be a JSON object, got {type(value).__name__}")
        return value


class ToolCall(_Model):
    """One tool call of an assistant turn (OpenAI `tool_calls[i]`)."""

    id: str | None = None
    type: Literal["function"] = "function"
    function: Function

    @classmethod
    def of(cls, name: str, arguments: dict[str, Any] | None = None, id: str | None = None) -> "ToolCall":
        """Shorthand: ``ToolCall.of("get_weather", {"city": "Paris"})``."""
        return cls(id=id, function=Function(name=name, arguments=arguments or {}))

    @property
    def name(self) -> str:
        return self.function.name

    @property
    def arguments(self) -> dict[str, Any]:
        return self.function.arguments

    def to_openai(self) -> dict[str, Any]:
        """The OpenAI wire dict, with `arguments` as a JSON string."""
        out: dict[str, Any] = {"type": "function",
                               "function": {"name": self.name, "arguments": json.dumps(self.arguments)}}
        if self.id is not None:
            out["id"] = self.id
        return out


class Message(_Model):
    """One chat turn. `assistant` turns may carry `tool_calls`; `tool` turns answer one call.

    `weight` (assistant turns only, 0 or 1, None when absent) is OpenAI's fine-tuning ``weight``:
    a turn with weight 0 is kept as context but never trained, e.g. a deliberately broken call
    followed by the tool's error and the corrected call, where only the correction is trained.
    """

    role: Role
    content: str | None = None
    tool_calls: list[ToolCall] | None = None
    tool_call_id: str | None = None
    name: str | None = None
    weight: int | None = None

    @field_validator("weight", mode="before")
    @classmethod
    def _weight_is_0_or_1(cls, value: Any) -> Any:
        # exactly the ints 0 and 1, as OpenAI allows: no true/false, 1.0 or "1"
        if value is None or (type(value) is int and value in (0, 1)):
            return value
        raise ValueError(f"weight must be 0 or 1, got {value!r}")

    @model_validator(mode="after")
    def _check_role_fields(self) -> "Message":
        if self.tool_calls is not None and self.role != "assistant":
            raise ValueError(f"tool_calls is only allowed on assistant messages, not on role {self.role!r}")
        if self.weight is not None and self.role != "assistant":
            raise ValueError(f"weight is only allowed on assistant messages, not on role {self.role!r}")
        if self.tool_calls == []:
            self.tool_calls = None
        if self.role == "assistant" and self.content is None and not self.tool_calls:
            raise ValueError("an assistant message needs content or tool_calls")
        if self.role in ("system", "user") and self.content is None:
            raise ValueError(f"a {self.role} message needs content")
        return self

    @property
    def trained(self) -> bool:
        """Whether a format may train this turn's tokens: False only for weight 0 (meaningful on assistant turns)."""
        return self.weight != 0

    def to_dict(self) -> dict[str, Any]:
        """The HF chat dict (arguments stay objects, as chat templates expect); `weight` is left out."""
        out: dict[str, Any] = {"role": self.role, "content": self.content}
        if self.tool_calls:
            out["tool_calls"] = [
                {"type": "function", **({"id": c.id} if c.id else {}),
                 "function": {"name": c.name, "arguments": c.arguments}}
                for c in self.tool_calls
            ]
        if self.tool_call_id is not None:
            out["tool_call_id"] = self.tool_call_id
        if self.name is not None:
            out["name"] = self.name
        return out


class FunctionSpec(_Model):
    """A tool's function: name, description and JSON-Schema `parameters` (an object schema)."""

    name: str = Field(min_length=1)
    description: str = ""
    parameters: dict[str, Any] = Field(default_factory=lambda: {"type": "object", "properties": {}})

    @field_validator("parameters", mode="before")
    @classmethod
    def _parameters_default(cls, value: Any) -> Any:
        if value is None or value == {}:
            return {"type": "object", "properties": {}}
        if not isinstance(value, dict):
            raise ValueError(f"parameters must be a JSON Schema object, got {type(value).__name__}")
        return value


class Tool(_Model):
    """A tool the model may call (OpenAI `tools[i]`): ``{"type": "function", "function": {...}}``."""

    type: Literal["function"] = "function"
    function: FunctionSpec

    @property
    def name(self) -> str:
        return self.function.name

    def to_dict(self) -> dict[str, Any]:
        return {"type": "function", "function": self.function.model_dump()}


class Example(_Model):
    """One training or evaluation example: a conversation and the tools it may call.

    `messages` is the full conversation; the assistant turns are what a format trains on (all of
    them except those with weight 0, unless `train_on` restricts it further) and what evaluation
    compares against. `source` and `row` say where the example came from (file or hub id, 0-based
    row) so later errors can point there.
    """

    messages: list[Message] = Field(min_length=1)
    tools: list[Tool] = Field(default_factory=list)
    source: str = ""
    row: int | None = None
    meta: dict[str, Any] = Field(default_factory=dict)

    def messages_as_dicts(self) -> list[dict[str, Any]]:
        return [m.to_dict() for m in self.messages]

    def tools_as_dicts(self) -> list[dict[str, Any]]:
        return [t.to_dict() for t in self.tools]

    @property
    def where(self) -> str:
        """``file, row N`` for error messages."""
        return f"{self.source or '<memory>'}, row {self.row if self.row is not None else '?'}"

    def final_assistant(self) -> Message | None:
        """The last assistant turn, the usual evaluation target; None if there is none."""
        for message in reversed(self.messages):
            if message.role == "assistant":
                return message
        return None

    def to_json(self) -> str:
        """One JSON line; unset (None) fields are left out, so a message's ``weight`` appears only when set."""
        return self.model_dump_json(exclude_none=True)

    @classmethod
    def from_json(cls, line: str) -> "Example":
        return cls(**json.loads(line))
