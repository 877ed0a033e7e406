"""Salesforce/xlam-function-calling-60k (APIGen, Liu et al. 2024) as canonical `Example`s.

Owns the mapping of one xLAM row to one example: the ``query`` is the user turn; all ``answers``
together are ONE assistant turn with parallel tool calls (ids ``call_0``, ``call_1``, ...); the
``tools`` become canonical tools, their parameters converted from xLAM's flat Python-typed map to
JSON Schema by `convert.xlam_parameters_to_schema` (``str`` -> string, ``List[int]`` -> array of
integer, ``, optional`` -> not required, ``default`` kept unless ``""``, ...). No system turn.

Layout (dataset card https://huggingface.co/datasets/Salesforce/xlam-function-calling-60k, file
``xlam_function_calling_60k.json``, one JSON array): ``{"id": int, "query": str, "answers": str,
"tools": str}``, `answers` and `tools` being JSON encoded as strings. See
../shared/data/samples/README.md for the quirks.

Decisions:
- ``answers == "[]"`` (not known upstream; sample row 27) is kept as a no-call example: the assistant
  turn has content ``""`` (the schema needs content or calls) and ``meta["no_call"] = True``, so a
  later stage can drop it or fill in a reply.
- A tool name declared twice keeps its first definition (the others in
  ``meta["dropped_duplicate_tools"]``).
- A call to a function the row's tools do not declare is rejected; argument values are not checked
  against the declared types (upstream has ``"42"`` for an ``int``; cleaning decides).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from calltune.schema import Example, Message
from calltune.sources.base import Rejects
from calltune.sources.convert import (RowError, check_declared, convert_rows, dedupe_tools, field, loads_json,
                                      make_call, make_tool, read_rows, require_columns,
                                      xlam_parameters_to_schema)

XLAM_COLUMNS = ("query", "tools", "answers")


def _json_field(row: dict[str, Any], name: str) -> list[Any]:
    text = field(row, name)
    try:
        value = loads_json(text)
    except ValueError as err:
        raise RowError(f"broken JSON in {name!r}: {err}") from None
    if not isinstance(value, list):
        raise RowError(f"bad field: {name!r} must hold a JSON list, got {type(value).__name__}")
    return value


def xlam_row_to_example(row: dict[str, Any], where: str, i: int) -> Example:
    """One xLAM row -> user query + one assistant turn with all answers as parallel calls.

    Raises:
        RowError: a field missing or not JSON, a bad tool or call, or a call to an undeclared function.
    """
    query = field(row, "query")
    if not query.strip():
        raise RowError("missing field: 'query' is empty")
    tools, dropped = dedupe_tools([make_tool(spec, xlam_parameters_to_schema) for spec in _json_field(row, "tools")])
    calls = []
    for k, answer in enumerate(_json_field(row, "answers")):
        if not isinstance(answer, dict):
            raise RowError(f"bad call: answer {k} is {type(answer).__name__}, expected an object")
        if "arguments" not in answer:
            raise RowError(f"bad call: answer {k} ({answer.get('name')!r}) has no 'arguments'")
        calls.append(make_call(answer.get("name"), answer["arguments"], f"call_{k}"))
    check_declared(calls, tools)
    meta: dict[str, Any] = {"id": row.get("id")}
    if dropped:
        meta["dropped_duplicate_tools"] = dropped
    if calls:
        answer_turn = Message(role="assistant", tool_calls=calls)
    else:
        answer_turn = Message(role="assistant", content="")
        meta["no_call"] = True
    return Example(messages=[Message(role="user", content=query), answer_turn], tools=tools,
                   source=where, row=i, meta=meta)


def load_xlam(path_or_id: str | Path, split: str = "train", rejects: Rejects | None = None,
              limit: int | None = None) -> list[Example]:
    """Read xLAM-60k (local ``.json``/``.jsonl``/``.parquet`` or the hub id) into `Example`s.

    Args:
        path_or_id: ``xlam_function_calling_60k.json`` or ``Salesforce/xlam-function-calling-60k``.
        split: hub split (the dataset has only ``train``).
        rejects: rows that cannot be used are added here with the reason, not raised.
        limit: convert only the first `limit` rows.

    Raises:
        SourceError: file missing/empty/unreadable, a row that is not an object, or a column of
            ``query, tools, answers`` missing.
    """
    where, rows = read_rows(path_or_id, split)
    require_columns(where, rows, XLAM_COLUMNS)
    return convert_rows(where, rows, xlam_row_to_example, rejects, limit)
