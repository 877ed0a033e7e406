"""OpenAI-style chat JSONL (one conversation per line) as canonical `Example`s.

Owns the validation of rows already in the canonical shape: ``{"messages": [...], "tools": [...]}``
as in the OpenAI chat-completions API and fine-tuning files
(https://platform.openai.com/docs/api-reference/chat, https://platform.openai.com/docs/guides/fine-tuning):
assistant ``tool_calls`` with ``function.arguments`` as a JSON string or an object, ``tool`` messages
with ``tool_call_id``. It is also what `Example.messages_as_dicts()` / `tools_as_dicts()` write, so
examples round-trip through it.

Each line goes through the schema; a `SchemaError` becomes the reject reason ``schema error: ...``
(its message names the field path). Beyond the schema, a row is rejected when a call names a function its tools do not
declare (when it declares any), when a ``tool`` message's ``tool_call_id`` matches no earlier call,
or when arguments hold NaN/Infinity. Accepted on the way in: content given as a list of
``{"type": "text", "text": ...}`` parts (joined); other top-level keys go to ``meta``.

The fine-tuning ``weight`` of an assistant message (0 or 1; 0: the turn is context, not trained,
https://platform.openai.com/docs/guides/fine-tuning) becomes `Message.weight`, which every prompt
format honours. Any other value, or a ``weight`` on a non-assistant message, rejects the row with
``bad weight: messages[k].weight ...``. `Example.messages_as_dicts()` leaves ``weight`` out (it is
what chat templates get); `Example.to_json()` keeps it.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from calltune.schema import Example, SchemaError
from calltune.sources.base import Rejects
from calltune.sources.convert import (RowError, check_declared, check_finite, convert_rows, field, read_rows,
                                      require_columns)

OPENAI_COLUMNS = ("messages",)


def _content_text(content: Any, k: int) -> Any:
    """Join a list of text parts into one string; anything else is left to the schema."""
    if not isinstance(content, list):
        return content
    if not all(isinstance(p, dict) and p.get("type") == "text" and isinstance(p.get("text"), str) for p in content):
        raise RowError(f"bad content: messages[{k}].content is a list with non-text parts")
    return "".join(p["text"] for p in content)


def _check_weight(message: dict[str, Any], k: int) -> None:
    """OpenAI's fine-tuning ``weight``: absent/null, or the integer 0 or 1 on an assistant message."""
    weight = message.get("weight")
    if weight is None:
        return
    if type(weight) is not int or weight not in (0, 1):
        raise RowError(f"bad weight: messages[{k}].weight must be 0 or 1, got {weight!r}")
    if message.get("role") != "assistant":
        raise RowError(f"bad weight: messages[{k}].weight is only allowed on assistant messages, "
                       f"not on role {message.get('role')!r}")


def openai_jsonl_row_to_example(row: dict[str, Any], where: str, i: int) -> Example:
    """Validate one ``{"messages", "tools"?}`` row into an `Example`.

    Raises:
        RowError: ``schema error: <the SchemaError message, naming the field path>``; a ``weight``
            other than 0/1 or not on an assistant message; an undeclared function, a dangling
            ``tool_call_id``, NaN/Infinity in arguments.
    """
    raw_messages = field(row, "messages", list)
    messages = []
    for k, message in enumerate(raw_messages):
        if not isinstance(message, dict):
            raise RowError(f"bad message: messages[{k}] is {type(message).__name__}, not an object")
        message = dict(message)
        _check_weight(message, k)
        if "content" in message:
            message["content"] = _content_text(message["content"], k)
        messages.append(message)
    meta = {key: value for key, value in row.items() if key not in ("messages", "tools")}
    try:
        example = Example(messages=messages, tools=row.get("tools") or [], source=where, row=i, meta=meta)
    except SchemaError as err:
        raise RowError(f"schema error: {err}") from None
    seen_ids: set[str] = set()
    for k, message in enumerate(example.messages):
        for call in message.tool_calls or []:
            try:
                check_finite(call.arguments)
            except ValueError as err:
                raise RowError(f"broken JSON in call arguments: messages[{k}], call to {call.name!r}: {err}") from None
            if call.id is not None:
                seen_ids.add(call.id)
        if example.tools:
            check_declared(message.tool_calls or [], example.tools)
        if message.role == "tool" and message.tool_call_id is not None and message.tool_call_id not in seen_ids:
            raise RowError(f"dangling tool_call_id: messages[{k}] answers {message.tool_call_id!r}, "
                           "which no earlier call has")
    return example


def load_openai_jsonl(path_or_id: str | Path, split: str = "train", rejects: Rejects | None = None,
                      limit: int | None = None) -> list[Example]:
    """Read an OpenAI-style chat JSONL file (or JSON array, or hub dataset) into `Example`s.

    Args:
        path_or_id: a ``.jsonl``/``.json`` file, or a hub dataset with a ``messages`` column.
        split: hub split.
        rejects: rows that do not fit the schema are added here with the `SchemaError` message.
        limit: convert only the first `limit` rows.

    Raises:
        SourceError: file missing/empty/unreadable, a row that is not an object, or no ``messages`` column.
    """
    where, rows = read_rows(path_or_id, split)
    require_columns(where, rows, OPENAI_COLUMNS)
    return convert_rows(where, rows, openai_jsonl_row_to_example, rejects, limit)
