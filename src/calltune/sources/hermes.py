"""NousResearch/hermes-function-calling-v1 (and ShareGPT rows in its shape) as canonical `Example`s.

Owns the parser of Hermes' ShareGPT conversations: ``<tool_call>`` blocks in ``gpt`` turns ->
assistant tool calls (ids ``call_0``, ``call_1``, ...), ``<tool_response>`` blocks in ``tool`` turns ->
one `tool` message per block, answering the pending calls in order (a block naming a pending
function answers the first pending call of that name), and the tools, read from the ``tools`` column
(a JSON string) or, in the older revision without that column, from between ``<tools>`` and
``</tools>`` in the system prompt (JSON, else a Python literal via `ast.literal_eval`).

Layout (dataset card https://huggingface.co/datasets/NousResearch/hermes-function-calling-v1; five
JSON arrays, one per config: ``func-calling-singleturn.json``, ``func-calling.json``,
``glaive-function-calling-5k.json``, and two JSON-mode files whose ``schema`` column is not read
here): ``{"id", "conversations": [{"from", "value"}], "tools": str, "category", "subcategory",
"task"}``. Quirks: ../shared/data/samples/README.md.

Mapping: ``system``/``human``/``gpt``/``tool`` -> system/user/assistant/tool (``user``/``assistant``
accepted too). The system turn keeps its text with the ``<tools>...</tools>`` block cut out (formats
re-render tools). Text of a ``gpt`` turn outside its ``<tool_call>`` blocks, if any, stays as the
assistant content. A tool response's ``content`` becomes the message content (JSON-encoded unless it
is a string); a block that is not JSON is kept verbatim. ``id``/``category``/``subcategory``/``task``
go to ``meta``. Tools given as ``{"name", ...}`` without the ``{"type": "function"}`` wrapper and
``"parameters": null`` are accepted; a name declared twice keeps its first definition (the others in
``meta["dropped_duplicate_tools"]``). Rows ending on a human turn are kept (cleaning decides).

Repairs (each listed in ``meta["repairs"]``):
- a call or tools block in Python-literal syntax (``{'name': ..., 'arguments': {..., True}}``) is
  read with `ast.literal_eval`; a literal ``\\n`` (backslash, n) around a ``<tool_call>`` body is
  dropped;
- the older-revision extraction call that nests ``name`` inside ``arguments`` (card example 2) gets
  its name lifted out, when that value names a declared tool that has no ``name`` parameter.

Rejected: a call to an undeclared function (the message says if the tools field was empty and
whether the system prompt's tools block parsed), a ``tool`` turn without a pending call, a call that
is neither JSON nor a Python literal, more responses than calls, an unknown ``from``.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

from calltune.schema import Example, Message, Tool, ToolCall
from calltune.sources.base import Rejects
from calltune.sources.convert import (RowError, check_declared, convert_rows, dedupe_tools, field,
                                      loads_json_or_literal, make_call, make_tool, read_rows, require_columns)

HERMES_COLUMNS = ("conversations",)
_ROLES = {"system": "system", "human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant",
          "tool": "tool"}
_TOOLS_BLOCK = re.compile(r"<tools>(?P<body>.*?)</tools>", re.S)
_TOOL_CALL = re.compile(r"<tool_call>(?P<body>.*?)</tool_call>", re.S)
_TOOL_RESPONSE = re.compile(r"<tool_response>(?P<body>.*?)</tool_response>", re.S)
_EDGE_NEWLINES = re.compile(r"^(?:\s|\\n)+|(?:\s|\\n)+$")  # real newlines and literal backslash-n


def find_tools_block(system: str | None) -> re.Match | None:
    """The ``<tools>...</tools>`` block that declares the tools: the last one with a non-blank body.

    The prompts also mention the tags in prose (``within <tools> </tools> XML tags``); those
    empty pairs are not the block.
    """
    blocks = [m for m in _TOOLS_BLOCK.finditer(system or "") if m["body"].strip()]
    return blocks[-1] if blocks else None


def _strip_block(body: str) -> str:
    return _EDGE_NEWLINES.sub("", body)


def _tool_list(value: Any, what: str) -> list[Tool]:
    if value is None:
        return []
    if not isinstance(value, list):
        raise RowError(f"bad tools: {what} is {type(value).__name__}, expected a list")
    return [make_tool(spec) for spec in value]


def hermes_tools(row: dict[str, Any], system: str | None, repairs: list[str]) -> tuple[list[Tool], str]:
    """The row's tools, and a note for reject messages about where they came from.

    The ``tools`` column wins when it declares something; when it is missing, ``"[]"`` or ``"null"``,
    the system prompt's ``<tools>`` block is read instead (JSON, else a Python literal).
    """
    raw = row.get("tools")
    if isinstance(raw, list):  # already parsed (a hand-made file, or a hub loader that parsed it)
        raw = json.dumps(raw)
    if raw is not None and not isinstance(raw, str):
        raise RowError(f"bad field: 'tools' must be a JSON string, got {type(raw).__name__}")
    if raw is not None and raw.strip():
        try:
            value, literal = loads_json_or_literal(raw)
        except ValueError as err:
            raise RowError(f"broken tools: the 'tools' field is {err}") from None
        if literal:
            repairs.append("read the 'tools' field as a Python literal")
        tools = _tool_list(value, "the 'tools' field")
        if tools:
            return tools, ""
    block = find_tools_block(system)
    if block is None:
        return [], " (the tools field is empty and the system prompt has no tools block)"
    try:
        value, literal = loads_json_or_literal(block["body"].strip())
    except ValueError as err:
        if raw is None:  # older revision: the block is the only declaration
            raise RowError(f"broken tools: the system prompt's <tools> block is {err}") from None
        return [], f" (the tools field is {raw.strip()!r}; the system prompt's <tools> block does not parse)"
    if literal:
        repairs.append("read the system prompt's <tools> block as a Python literal")
    return _tool_list(value, "the system prompt's <tools> block"), ""


def _parse_call(body: str, tools: list[Tool], call_id: str, repairs: list[str]) -> ToolCall:
    text = body.strip()
    stripped = _strip_block(body)
    if stripped != text:
        repairs.append("dropped literal \\n around a <tool_call> body")
    try:
        obj, literal = loads_json_or_literal(stripped)
    except ValueError as err:
        raise RowError(f"unparseable tool_call: {err}: {stripped[:80]!r}") from None
    if literal:
        repairs.append("read a <tool_call> as a Python literal")
    if not isinstance(obj, dict):
        raise RowError(f"bad call: a <tool_call> holds {type(obj).__name__}, not an object")
    name, arguments = obj.get("name"), obj.get("arguments")
    if name is None and isinstance(arguments, dict) and isinstance(arguments.get("name"), str):
        tool = next((t for t in tools if t.name == arguments["name"]), None)
        if tool is not None and "name" not in tool.function.parameters.get("properties", {}):
            name, arguments = arguments["name"], {k: v for k, v in arguments.items() if k != "name"}
            repairs.append("lifted 'name' out of the call's arguments")
    if "arguments" not in obj:
        raise RowError(f"bad call: call to {name!r} has no 'arguments'")
    return make_call(name, arguments, call_id)


def _tool_content(body: str) -> tuple[str, str | None]:
    """A ``<tool_response>`` body -> ``(content, function name or None)``."""
    text = body.strip()
    try:
        obj, _ = loads_json_or_literal(text)
    except ValueError:
        return text, None
    if isinstance(obj, dict) and "content" in obj:
        content = obj["content"]
        name = obj.get("name") if isinstance(obj.get("name"), str) else None
        return (content if isinstance(content, str) else json.dumps(content, ensure_ascii=False)), name
    return text, None


def hermes_row_to_example(row: dict[str, Any], where: str, i: int) -> Example:
    """One Hermes/ShareGPT row -> canonical messages and tools.

    Raises:
        RowError: see the module docstring for what is rejected.
    """
    turns = field(row, "conversations", list)
    repairs: list[str] = []
    system = next((t.get("value") for t in turns if isinstance(t, dict) and t.get("from") == "system"), None)
    tools, tool_note = hermes_tools(row, system if isinstance(system, str) else None, repairs)
    tools, dropped = dedupe_tools(tools)
    messages: list[Message] = []
    pending: list[ToolCall] = []
    n_calls = 0
    for k, turn in enumerate(turns):
        if not isinstance(turn, dict) or not isinstance(turn.get("value"), str):
            raise RowError(f"bad turn: conversations[{k}] is not {{'from': ..., 'value': str}}")
        role = _ROLES.get(turn["from"]) if isinstance(turn.get("from"), str) else None
        value = turn["value"]
        if role is None:
            raise RowError(f"bad turn: conversations[{k}] has unknown 'from' {turn.get('from')!r}")
        if role == "system":
            tools_block = find_tools_block(value)
            if tools_block is not None:
                value = value[:tools_block.start()].rstrip() + "\n" + value[tools_block.end():].lstrip()
            messages.append(Message(role="system", content=value.strip()))
        elif role == "user":
            pending = []
            messages.append(Message(role="user", content=value))
        elif role == "assistant":
            calls = []
            for block in _TOOL_CALL.finditer(value):
                calls.append(_parse_call(block["body"], tools, f"call_{n_calls}", repairs))
                n_calls += 1
            check_declared(calls, tools, tool_note)
            pending = list(calls)
            if calls:  # text beside the <tool_call> blocks, if any, stays as content
                text = _strip_block(_TOOL_CALL.sub("", value))
                messages.append(Message(role="assistant", content=text or None, tool_calls=calls))
            else:
                messages.append(Message(role="assistant", content=value))
        else:
            if not pending:
                raise RowError(f"tool turn without a call: conversations[{k}] answers no pending <tool_call>")
            for body in [b["body"] for b in _TOOL_RESPONSE.finditer(value)] or [value]:
                if not pending:
                    raise RowError(f"more tool responses than calls: conversations[{k}]")
                content, name = _tool_content(body)
                call = next((c for c in pending if c.name == name), pending[0])
                pending.remove(call)
                messages.append(Message(role="tool", content=content, tool_call_id=call.id, name=call.name))
    if not messages:
        raise RowError("empty conversation: no turns")
    meta: dict[str, Any] = {key: row[key] for key in ("id", "category", "subcategory", "task")
                            if row.get(key) is not None}
    if repairs:
        meta["repairs"] = sorted(set(repairs))
    if dropped:
        meta["dropped_duplicate_tools"] = dropped
    return Example(messages=messages, tools=tools, source=where, row=i, meta=meta)


def load_hermes(path_or_id: str | Path, split: str = "train", rejects: Rejects | None = None,
                limit: int | None = None) -> list[Example]:
    """Read hermes-function-calling-v1 (one of its JSON files, or the hub id) into `Example`s.

    Args:
        path_or_id: e.g. ``func-calling.json`` or ``NousResearch/hermes-function-calling-v1`` (the
            hub's default config, ``func_calling_singleturn``).
        split: hub split (only ``train``).
        rejects: rows that cannot be used are added here with the reason, not raised.
        limit: convert only the first `limit` rows.

    Raises:
        SourceError: file missing/empty/unreadable, a row that is not an object, or no
            ``conversations`` column.
    """
    where, rows = read_rows(path_or_id, split)
    require_columns(where, rows, HERMES_COLUMNS)
    return convert_rows(where, rows, hermes_row_to_example, rejects, limit)
