"""JSON helpers shared by the tool-calling formats: writing calls and tool results, reading calls back.

Owns the lenient-but-safe reading of one call object (`call_from_object`): a JSON object with a
string ``name`` and its arguments under ``arguments`` (or another key a format allows, such as Llama
3.1's ``parameters``), where the arguments may also be a JSON string holding an object (the OpenAI
wire form). Anything else raises `CallError`, which the formats turn into ``Parsed.error``.
"""

from __future__ import annotations

import json
from typing import Any

from calltune.errors import CalltuneError
from calltune.schema import Message, SchemaError, ToolCall


class CallError(CalltuneError):
    """A completion meant as a call is not a well-formed call (the message says where and why)."""


def dumps(value: Any) -> str:
    """JSON as the formats write it: ``", "``/``": "`` separators, non-ASCII kept as characters."""
    return json.dumps(value, ensure_ascii=False)


def snippet(text: str, n: int = 80) -> str:
    text = text.strip()
    return repr(text if len(text) <= n else text[:n - 3] + "...")


def loads_call_json(text: str, what: str) -> Any:
    """`text` as JSON, or CallError naming `what` and the JSON error."""
    try:
        return json.loads(text)
    except json.JSONDecodeError as err:
        raise CallError(f"{what} is not JSON ({err.msg} at character {err.pos}): {snippet(text)}") from None


def call_from_object(obj: Any, what: str, name_key: str = "name",
                     argument_keys: tuple[str, ...] = ("arguments",)) -> ToolCall:
    """``{"name": str, "arguments": {...}}`` (keys configurable) -> `ToolCall`.

    Raises:
        CallError: not an object, no or empty name, no arguments, arguments not an object.
    """
    if not isinstance(obj, dict):
        raise CallError(f"{what} is a JSON {type(obj).__name__}, not an object")
    name = obj.get(name_key)
    if not isinstance(name, str) or not name.strip():
        raise CallError(f"{what} has no {name_key!r} string")
    key = next((k for k in argument_keys if k in obj), None)
    if key is None:
        raise CallError(f"{what} ({name!r}) has no {' or '.join(repr(k) for k in argument_keys)}")
    arguments = obj[key]
    if isinstance(arguments, str):  # the OpenAI wire form: arguments as a JSON string
        arguments = loads_call_json(arguments, f"{what} ({name!r}) arguments string") if arguments.strip() else {}
    if not isinstance(arguments, dict):
        raise CallError(f"{what} ({name!r}) has {key} of type {type(arguments).__name__}, not an object")
    try:
        return ToolCall.of(name, arguments)
    except SchemaError as err:
        raise CallError(f"{what}: {err}") from None


def result_value(content: str | None) -> Any:
    """A tool message's content for embedding in JSON: the parsed object/array if it is one, else the text.

    Embedding parsed JSON avoids double escaping (``"{\\"temp\\": 20}"``); scalars stay strings so
    ``"42"`` is not turned into ``42``.
    """
    text = content or ""
    try:
        value = json.loads(text)
    except json.JSONDecodeError:
        return text
    return value if isinstance(value, (dict, list)) else text


def tool_names(messages: list[Message]) -> dict[int, str | None]:
    """For each `tool` message (by index), the name of the function it answers.

    The message's own ``name`` wins; else the call with its ``tool_call_id``; else the first call of
    the assistant turn before it not yet answered; else None.
    """
    out: dict[int, str | None] = {}
    by_id: dict[str, str] = {}
    pending: list[ToolCall] = []
    for i, m in enumerate(messages):
        if m.role == "assistant":
            pending = list(m.tool_calls or [])
            by_id.update({c.id: c.name for c in pending if c.id})
        elif m.role == "tool":
            name = m.name or (by_id.get(m.tool_call_id) if m.tool_call_id else None)
            match = next((c for c in pending if (m.tool_call_id and c.id == m.tool_call_id) or c.name == name), None)
            if match is None and name is None and pending:
                match = pending[0]
            if match is not None:
                pending.remove(match)
                name = name or match.name
            out[i] = name
    return out
