"""glaiveai/glaive-function-calling-v2 as canonical `Example`s.

Owns the parser of glaive's flat text: the ``system`` field (a preamble plus the functions as
pretty-printed JSON objects) and the ``chat`` field (turns headed ``USER:``, ``ASSISTANT:``,
``FUNCTION RESPONSE:``), including the not-quite-JSON call syntax
``<functioncall> {"name": "f", "arguments": '{"k": "v"}'} <|endoftext|>``.

Layout (dataset card https://huggingface.co/datasets/glaiveai/glaive-function-calling-v2, file
``glaive-function-calling-v2.json``, one JSON array of ``{"system": str, "chat": str}``); the quirks
are listed in ../shared/data/samples/README.md.

Mapping: the system preamble (without ``SYSTEM:`` and without the function JSON, since formats
re-render tools) is the system turn; ``USER`` -> user; ``ASSISTANT`` -> assistant with
``<|endoftext|>`` stripped; a ``<functioncall>`` turn -> an assistant turn with one tool call (ids
``call_0``, ``call_1``, ... in order); ``FUNCTION RESPONSE`` -> a `tool` message answering the call
just before it (``tool_call_id`` and ``name`` set). Rows ending on a USER turn and rows with
functions but no call are kept as they are (cleaning decides). A function name declared twice: the
first definition is kept, the others go to ``meta["dropped_duplicate_tools"]``.

Repairs (each listed in ``meta["repairs"]``), applied only where the meaning is unambiguous:
- ``\\'`` inside the quoted arguments (not a JSON escape) is read as ``'``;
- closing braces after a complete call (``...'}}``) are dropped.

Rejected, with the reason (kind before the colon): a call that does not parse (broken JSON,
``Infinity``/``NaN``, truncated text), arguments that are an array or null, ``"parameters"`` instead
of ``"arguments"``, prose before ``<functioncall>``, another call syntax (its FUNCTION RESPONSE then
follows no call), a call to an undeclared name, an assistant turn that does not end with
``<|endoftext|>``, a stray ``<|endoftext|>`` elsewhere or two ASSISTANT turns in a row.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

from calltune.schema import Example, Message, Tool, ToolCall
from calltune.sources.base import Rejects
from calltune.sources.convert import (RowError, check_declared, convert_rows, dedupe_tools, field, loads_json,
                                      make_call, make_tool, read_rows, require_columns)

GLAIVE_COLUMNS = ("system", "chat")
END = "<|endoftext|>"
CALL = "<functioncall>"

_TURN = re.compile(r"(?:\A|\n\n)(USER|ASSISTANT|FUNCTION RESPONSE):[ \t]?")
_ROLES = {"USER": "user", "ASSISTANT": "assistant", "FUNCTION RESPONSE": "tool"}
_FUNCTION_START = re.compile(r"^\{", re.M)
# The quoted form: {"name": "f", "arguments": '...'} -- the arguments are everything between the
# first quote after "arguments": and the last quote that is followed by the closing brace.
_QUOTED_CALL = re.compile(r"""^\{\s*"name"\s*:\s*"(?P<name>[^"]*)"\s*,\s*"(?P<key>arguments|parameters)"\s*:\s*"""
                          r"""'(?P<args>.*)'\s*\}(?P<rest>.*)$""", re.S)
_BAD_QUOTE_ESCAPE = re.compile(r"(?<!\\)((?:\\\\)*)\\'")


def parse_glaive_system(system: str) -> tuple[str, list[Tool], list[dict[str, Any]]]:
    """Split glaive's ``system`` field into ``(preamble, tools, dropped_duplicates)``.

    Raises:
        RowError: no ``SYSTEM:`` prefix, or a function definition that is not JSON.
    """
    if not system.startswith("SYSTEM:"):
        raise RowError(f"bad system field: does not start with 'SYSTEM:': {system[:60]!r}")
    body = system[len("SYSTEM:"):].strip()
    start = _FUNCTION_START.search(body)
    if start is None:
        return body, [], []
    preamble, pos, specs = body[:start.start()].strip(), start.start(), []
    decoder = json.JSONDecoder()
    while pos < len(body):
        try:
            spec, pos = decoder.raw_decode(body, pos)
        except json.JSONDecodeError as err:
            raise RowError(f"broken function definition: system field, {err.msg} at character {err.pos}") from None
        specs.append(spec)
        while pos < len(body) and body[pos].isspace():
            pos += 1
    tools, dropped = dedupe_tools([make_tool(spec) for spec in specs])
    return preamble, tools, dropped


def split_glaive_chat(chat: str) -> list[tuple[str, str]]:
    """``"USER: hi\\n\\n\\nASSISTANT: yo <|endoftext|>"`` -> ``[("USER", "hi"), ("ASSISTANT", "yo <|endoftext|>")]``.

    Raises:
        RowError: text before the first turn header, or no turn at all.
    """
    parts = _TURN.split(chat)
    if parts[0].strip():
        raise RowError(f"bad chat field: text before the first turn header: {parts[0][:60]!r}")
    turns = [(parts[k], parts[k + 1].strip()) for k in range(1, len(parts), 2)]
    if not turns:
        raise RowError("bad chat field: no USER/ASSISTANT turn")
    return turns


def parse_glaive_call(text: str, call_id: str) -> tuple[ToolCall, list[str]]:
    """Parse the text after ``<functioncall>`` (``<|endoftext|>`` already removed).

    Returns:
        ``(call, repairs)``: the repairs applied (see the module docstring), usually none.

    Raises:
        RowError: the call cannot be read safely; the message says why.
    """
    repairs: list[str] = []
    try:
        obj, end = json.JSONDecoder().raw_decode(text)
        rest = text[end:].strip()
        if not isinstance(obj, dict):
            raise RowError(f"bad call: <functioncall> holds {type(obj).__name__}, not an object")
        key = "arguments" if "arguments" in obj else ("parameters" if "parameters" in obj else None)
        name, arguments = obj.get("name"), obj.get(key) if key else None
    except json.JSONDecodeError:
        match = _QUOTED_CALL.match(text)
        if match is None:
            snippet = text if len(text) < 80 else text[:77] + "..."
            raise RowError(f"unparseable call: neither JSON nor {{\"name\": ..., \"arguments\": '...'}} "
                           f"(truncated?): {snippet!r}") from None
        name, key, arguments, rest = match["name"], match["key"], match["args"], match["rest"].strip()
        if _BAD_QUOTE_ESCAPE.search(arguments):
            try:
                loads_json(arguments)
            except ValueError:
                arguments = _BAD_QUOTE_ESCAPE.sub(r"\1'", arguments)
                repairs.append("read \\' in call arguments as '")
    if rest:
        if set(rest) != {"}"}:
            raise RowError(f"unparseable call: text after the call object: {rest[:60]!r}")
        repairs.append(f"dropped {len(rest)} extra closing brace(s) after the call")
    if key is None:
        raise RowError(f"bad call: call to {name!r} has no 'arguments'")
    if key == "parameters":
        raise RowError(f"bad call: call to {name!r} has 'parameters' instead of 'arguments'")
    return make_call(name, arguments, call_id), repairs


def glaive_row_to_example(row: dict[str, Any], where: str, i: int) -> Example:
    """One glaive row -> system turn, then the chat's turns with calls and tool responses.

    Raises:
        RowError: a malformed turn or call (see the module docstring for what is rejected).
    """
    preamble, tools, dropped = parse_glaive_system(field(row, "system"))
    messages = [Message(role="system", content=preamble)] if preamble else []
    repairs: list[str] = []
    pending: list[ToolCall] = []  # calls of the last assistant turn not yet answered
    n_calls = 0
    for k, (header, text) in enumerate(split_glaive_chat(field(row, "chat"))):
        turn = f"turn {k} ({header})"
        role = _ROLES[header]
        if role == "assistant":
            if messages and messages[-1].role == "assistant":
                raise RowError(f"consecutive assistant turns: {turn} follows another ASSISTANT turn "
                               "(a stray <|endoftext|> split one answer?)")
            if not text.endswith(END):
                raise RowError(f"truncated turn: {turn} does not end with {END}: ...{text[-60:]!r}")
            text = text[:-len(END)].rstrip()
            if END in text:
                raise RowError(f"stray {END}: inside {turn}")
            if CALL in text:
                if not text.startswith(CALL):
                    raise RowError(f"text before {CALL}: {turn} starts {text[:60]!r}")
                if text.count(CALL) > 1:
                    raise RowError(f"several calls in one turn: {turn} has {text.count(CALL)} {CALL}")
                call, fixed = parse_glaive_call(text[len(CALL):].strip(), f"call_{n_calls}")
                check_declared([call], tools)
                n_calls += 1
                repairs += fixed
                pending = [call]
                messages.append(Message(role="assistant", tool_calls=[call]))
            else:
                pending = []
                messages.append(Message(role="assistant", content=text))
        elif END in text:
            raise RowError(f"stray {END}: inside {turn}")
        elif role == "tool":
            if not pending:
                previous = messages[-1].content if messages and messages[-1].role == "assistant" else None
                hint = f" (the assistant turn before it is text: {previous[:60]!r})" if previous else ""
                raise RowError(f"function response without a call: {turn} follows no {CALL}{hint}")
            call = pending.pop(0)
            messages.append(Message(role="tool", content=text, tool_call_id=call.id, name=call.name))
        else:
            pending = []
            messages.append(Message(role="user", content=text))
    meta: dict[str, Any] = {}
    if repairs:
        meta["repairs"] = repairs
    if dropped:
        meta["dropped_duplicate_tools"] = dropped
    return Example(messages=messages, tools=tools, source=where, row=i, meta=meta)


def load_glaive(path_or_id: str | Path, split: str = "train", rejects: Rejects | None = None,
                limit: int | None = None) -> list[Example]:
    """Read glaive-function-calling-v2 (local JSON/JSONL/parquet or the hub id) into `Example`s.

    Args:
        path_or_id: ``glaive-function-calling-v2.json`` or ``glaiveai/glaive-function-calling-v2``.
        split: hub split (the dataset has only ``train``).
        rejects: malformed rows are added here with the reason, not raised.
        limit: convert only the first `limit` rows.

    Raises:
        SourceError: file missing/empty/unreadable, a row that is not an object, or column
            ``system`` or ``chat`` missing.
    """
    where, rows = read_rows(path_or_id, split)
    require_columns(where, rows, GLAIVE_COLUMNS)
    return convert_rows(where, rows, glaive_row_to_example, rejects, limit)
