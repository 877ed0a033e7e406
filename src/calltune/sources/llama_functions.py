"""marclove/llama_functions as canonical `Example`s.

Owns the parser of the dataset's Llama-2 chat prompts::

    [INST] <<SYS>>\\n<<API>>\\n{instruction}\\n\\n```\\n{"functions":[...]}\\n```\\n<</API>>\\n<</SYS>>\\n\\n{user} [/INST]

with earlier turns as ``[INST] {user} [/INST] {answer} </s><s>[INST] ...``, and of the ``output``
(`` {"function_call":{"name":...,"arguments":{...}}} `` or plain text, with a space on each side).

Layout (dataset card https://huggingface.co/datasets/marclove/llama_functions, one parquet file of
``{"input", "output"}``; ../shared/data/samples/llama_functions.jsonl is the same as JSONL). Also
read: the ``prompt,response`` CSV that the Scale LLM Engine fine-tuning tutorial writes from it.

Mapping: the <<API>> instruction text (and any other <<SYS>> text) is the system turn, the functions
become tools (their parameter LIST converted to a JSON Schema object by
`convert.param_list_to_schema`: ``optional: true`` -> not required, ``enum``/``items``/
``properties``/``minimum``/... kept); each ``[INST]`` is a user turn, each answer (history and
``output``) an assistant turn, a ``{"function_call": ...}`` answer an assistant tool call (ids
``call_0``, ...). The dataset has no tool results, so a call in the history is followed directly by
the next user turn. Rows without <<API>> (the Guanaco/OASST1 half) become plain chats without tools.

Rejected: an input that is not ``[INST] ... [/INST]`` turns, a functions block that is not JSON, an
empty answer, a ``function_call`` that does not parse, or a call to an undeclared function.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

from calltune.schema import Example, Message, Tool
from calltune.sources.base import Rejects, SourceError
from calltune.sources.convert import (RowError, check_declared, convert_rows, dedupe_tools, field, make_call,
                                      make_tool, param_list_to_schema, read_rows, require_columns)

LAYOUTS = (("input", "output"), ("prompt", "response"))

_SEGMENT_BREAK = re.compile(r"\s*</s>\s*<s>\s*")
_SEGMENT = re.compile(r"^\[INST\](?P<user>.*?)\[/INST\](?P<answer>.*)$", re.S)
_SYS = re.compile(r"^\s*<<SYS>>(?P<sys>.*?)<</SYS>>(?P<rest>.*)$", re.S)
_API = re.compile(r"<<API>>(?P<api>.*?)<</API>>", re.S)
_FUNCTIONS = re.compile(r"^(?P<instruction>.*?)```[a-z]*\s*(?P<json>\{.*\})\s*```\s*$", re.S)


def parse_api_block(api: str) -> tuple[str, list[Tool]]:
    """``instruction + ```{"functions":[...]}``` `` -> ``(instruction, tools)``.

    Raises:
        RowError: no fenced JSON, JSON that does not parse, or no ``functions`` list.
    """
    match = _FUNCTIONS.match(api.strip())
    if match is None:
        raise RowError("bad <<API>> block: no ```{\"functions\": [...]}``` in it")
    try:
        functions = json.loads(match["json"]).get("functions")
    except (json.JSONDecodeError, AttributeError) as err:
        raise RowError(f"broken functions JSON: in the <<API>> block: {err}") from None
    if not isinstance(functions, list):
        raise RowError("bad <<API>> block: 'functions' is not a list")
    return match["instruction"].strip(), [make_tool(spec, param_list_to_schema) for spec in functions]


def _answer(text: str, call_id: str) -> Message:
    """An answer (history or output) -> an assistant message with a call or text."""
    text = text.strip()
    if not text:
        raise RowError(f"empty answer: assistant turn for {call_id} is empty")
    if text.startswith("{") and '"function_call"' in text[:40]:
        try:
            obj = json.loads(text)
            call = obj["function_call"]
            return Message(role="assistant", tool_calls=[make_call(call.get("name"), call.get("arguments"), call_id)])
        except (json.JSONDecodeError, KeyError, TypeError, AttributeError) as err:
            raise RowError(f"unparseable function_call: {err}: {text[:80]!r}") from None
    return Message(role="assistant", content=text)


def llama_functions_row_to_example(row: dict[str, Any], where: str, i: int) -> Example:
    """One row (``input``/``output`` or ``prompt``/``response``) -> system, user/assistant turns, tools.

    Raises:
        RowError: see the module docstring.
    """
    in_key, out_key = next((layout for layout in LAYOUTS if layout[0] in row), LAYOUTS[0])
    prompt, output = field(row, in_key), field(row, out_key)
    segments = _SEGMENT_BREAK.split(prompt.strip())
    system_parts: list[str] = []
    tools: list[Tool] = []
    dropped: list[dict[str, Any]] = []
    messages: list[Message] = []
    n_calls = 0
    for k, segment in enumerate(segments):
        match = _SEGMENT.match(segment)
        if match is None:
            raise RowError(f"bad prompt: segment {k} is not '[INST] ... [/INST] ...': {segment[:60]!r}")
        user, answer = match["user"], match["answer"]
        if k == 0 and (sys_match := _SYS.match(user)):
            system, user = sys_match["sys"], sys_match["rest"]
            if api := _API.search(system):
                instruction, tools = parse_api_block(api["api"])
                tools, dropped = dedupe_tools(tools)
                system_parts.append(instruction)
                system = system[:api.start()] + system[api.end():]
            system_parts.append(system.strip())
        if not user.strip():
            raise RowError(f"bad prompt: segment {k} has an empty user turn")
        messages.append(Message(role="user", content=user.strip()))
        last = k == len(segments) - 1
        if last and answer.strip():
            raise RowError(f"bad prompt: text after the last [/INST]: {answer.strip()[:60]!r}")
        reply = _answer(output if last else answer, f"call_{n_calls}")
        n_calls += bool(reply.tool_calls)
        messages.append(reply)
    system = "\n\n".join(part for part in system_parts if part)
    if system:
        messages.insert(0, Message(role="system", content=system))
    check_declared([c for m in messages for c in (m.tool_calls or [])], tools)
    meta: dict[str, Any] = {"dropped_duplicate_tools": dropped} if dropped else {}
    return Example(messages=messages, tools=tools, source=where, row=i, meta=meta)


def load_llama_functions(path_or_id: str | Path, split: str = "train", rejects: Rejects | None = None,
                         limit: int | None = None) -> list[Example]:
    """Read marclove/llama_functions (hub id, parquet, JSONL, or LLM Engine's ``prompt,response`` CSV).

    Args:
        path_or_id: a local file or ``marclove/llama_functions``.
        split: hub split (the dataset has no splits; it loads as ``train``).
        rejects: rows that cannot be used are added here with the reason, not raised.
        limit: convert only the first `limit` rows.

    Raises:
        SourceError: file missing/empty/unreadable, a row that is not an object, or neither
            ``input,output`` nor ``prompt,response`` columns.
    """
    where, rows = read_rows(path_or_id, split)
    require_columns(where, rows, ())
    columns = {key for row in rows if isinstance(row, dict) for key in row}
    layout = next((layout for layout in LAYOUTS if set(layout) <= columns), None)
    if layout is None:
        partial = next((layout for layout in LAYOUTS if set(layout) & columns), LAYOUTS[0])
        missing = [c for c in partial if c not in columns]
        raise SourceError(where, None, missing[0], f"llama_functions needs columns input,output (or prompt,response); "
                                                   f"missing {missing}, found {sorted(columns)}")
    return convert_rows(where, rows, llama_functions_row_to_example, rejects, limit)
