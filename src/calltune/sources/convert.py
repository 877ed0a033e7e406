"""Helpers shared by the tool-calling sources (xLAM, glaive, llama_functions, OpenAI JSONL, Hermes).

Owns:
- `RowError`: one row cannot be used; its message is the reject reason, ``"kind: detail"`` (the part
  before the first colon is what `Rejects.counts` groups by).
- `read_rows` + `require_columns` + `convert_rows`: the loader skeleton every source shares (read,
  check the layout, turn each row into an `Example` or a reject).
- tolerant parsing: `loads_json` (strict JSON, no ``NaN``/``Infinity``) and `loads_json_or_literal`
  (JSON, else a Python literal via `ast.literal_eval`, for rows written with Python quoting).
- tool-schema conversion: `python_type_to_schema` / `xlam_parameters_to_schema` (xLAM's flat
  ``param -> {description, type, default}`` map with Python-ish type strings), `param_list_to_schema`
  (llama_functions' list of parameter objects), `normalize_parameters` (JSON-Schema-like dicts).
- `make_tool`, `dedupe_tools`, `make_call`, `check_declared`: building canonical tools and calls
  with a reject reason instead of a pydantic traceback.
"""

from __future__ import annotations

import ast
import json
import math
import re
from pathlib import Path
from typing import Any, Callable, Iterable

from calltune.errors import CalltuneError
from calltune.schema import Example, Function, FunctionSpec, SchemaError, Tool, ToolCall
from calltune.sources.base import Rejects, SourceError, read_table, read_text


class RowError(CalltuneError):
    """One row cannot be used. The message is the reject reason: ``"kind: detail"``."""


# ---------------------------------------------------------------------------------------------
# Reading rows

class _BadLine(str):
    """A JSONL line that did not parse: the raw line, with the parser's complaint in `error`."""

    error: str = ""


def read_rows(path_or_id: str | Path, split: str = "train") -> tuple[str, list[Any]]:
    """Read the rows of a local JSON / JSONL file with the standard library, anything else with `read_table`.

    Local JSON goes through `json` rather than `datasets` on purpose: Arrow needs one type per
    column, so it refuses files whose nested values change type from row to row (OpenAI JSONL with
    `arguments` as a string in one row and an object in the next). A ``.json`` file may hold one
    array of rows or JSON Lines. A JSONL line that is not JSON is kept as a ``_BadLine`` row so the
    loader can reject it with its line number; rows are not checked to be objects here.

    Returns:
        ``(where, rows)`` as `read_table` does.

    Raises:
        SourceError: missing, empty, unreadable or non-UTF-8 file, a directory, not JSON at all, or
            a top-level value that is not an array. A UTF-8 byte-order mark is accepted.
    """
    path = Path(path_or_id)
    if path.suffix.lower() not in (".json", ".jsonl"):
        return read_table(path_or_id, split=split)
    where = str(path_or_id)
    text = read_text(path, where)  # a leading UTF-8 BOM is dropped
    if not text.strip():
        raise SourceError(where, None, None, "file is empty; give a file with rows")
    whole: Any = None
    if path.suffix.lower() == ".json":
        try:
            whole = json.loads(text)
        except json.JSONDecodeError:
            if len(text.strip().splitlines()) <= 1:
                raise SourceError(where, None, None, "cannot be read as JSON or JSON Lines") from None
    if whole is None:  # JSON Lines
        rows: list[Any] = []
        for line in text.splitlines():
            if not line.strip():
                continue
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError as err:
                bad = _BadLine(line)
                bad.error = f"{err.msg} at column {err.colno}"
                rows.append(bad)
    elif isinstance(whole, list):
        rows = whole
    elif isinstance(whole, dict):
        rows = [whole]
    else:
        raise SourceError(where, None, None, f"expected a JSON array of row objects, got {type(whole).__name__}")
    if not rows:
        raise SourceError(where, None, None, "has no rows")
    return where, rows


def require_columns(where: str, rows: list[Any], required: Iterable[str]) -> None:
    """Raise `SourceError` if any row is not an object, or a required column occurs in no row.

    A column present in some rows but not others is left to the row converter (it rejects the row).
    """
    seen: set[str] = set()
    for i, row in enumerate(rows):
        if isinstance(row, _BadLine):
            continue
        if not isinstance(row, dict):
            raise SourceError(where, i, None, f"row is not a JSON object but {type(row).__name__}: {str(row)[:80]!r}")
        seen.update(row)
    missing = [c for c in required if c not in seen]
    if missing:
        raise SourceError(where, None, missing[0], f"missing column(s) {missing}; found {sorted(seen)}; "
                                                   "check that the file is in this source's layout")


def convert_rows(where: str, rows: list[Any], row_to_example: Callable[[Any, str, int], Example],
                 rejects: Rejects | None, limit: int | None) -> list[Example]:
    """Apply `row_to_example` to each row (the first `limit` of them); a `ValueError` becomes a reject.

    `RowError` and `SchemaError` are both `ValueError`s; anything else (a bug) propagates.
    """
    rejects = rejects if rejects is not None else Rejects()
    examples = []
    for i, row in enumerate(rows[:limit] if limit else rows):
        if isinstance(row, _BadLine):
            rejects.add(where, i, f"not JSON: the line does not parse ({row.error})", str(row))
            continue
        try:
            examples.append(row_to_example(row, where, i))
        except SourceError:
            raise
        except ValueError as err:
            rejects.add(where, i, str(err), row)
    return examples


def field(row: dict[str, Any], name: str, kind: type = str) -> Any:
    """``row[name]``, which must be present, not null and of type `kind` (else `RowError`)."""
    value = row.get(name)
    if value is None:
        raise RowError(f"missing field: {name!r} is missing or null")
    if not isinstance(value, kind):
        raise RowError(f"bad field: {name!r} must be {kind.__name__}, got {type(value).__name__}")
    return value


# ---------------------------------------------------------------------------------------------
# Tolerant parsing

def _no_constant(name: str) -> Any:
    raise ValueError(f"non-JSON constant {name}")


def check_finite(value: Any) -> None:
    """Raise `ValueError` if `value` holds a float NaN or infinity anywhere (they are not JSON)."""
    if isinstance(value, float) and not math.isfinite(value):
        raise ValueError(f"non-finite number {value!r}")
    if isinstance(value, dict):
        for item in value.values():
            check_finite(item)
    elif isinstance(value, (list, tuple)):
        for item in value:
            check_finite(item)


def loads_json(text: str) -> Any:
    """Strict JSON: like `json.loads`, but ``NaN``/``Infinity`` raise `ValueError` (they are not JSON)."""
    return json.loads(text, parse_constant=_no_constant)


def loads_json_or_literal(text: str) -> tuple[Any, bool]:
    """Parse `text` as strict JSON, else as a Python literal (``{'a': True}``).

    Returns:
        ``(value, used_literal)``.

    Raises:
        ValueError: neither parses (the message gives the JSON error), or a number is not finite.
    """
    try:
        return loads_json(text), False
    except ValueError as json_err:
        try:
            value = ast.literal_eval(text)
        except (ValueError, SyntaxError, TypeError, MemoryError, RecursionError):
            raise ValueError(f"neither JSON nor a Python literal ({json_err})") from None
        if isinstance(value, (set, frozenset, bytes, complex)):
            raise ValueError(f"a Python {type(value).__name__}, not JSON data") from None
        check_finite(value)
        return (list(value) if isinstance(value, tuple) else value), True


# ---------------------------------------------------------------------------------------------
# Tool schemas

_SIMPLE_TYPES = {
    "str": "string", "string": "string", "int": "integer", "integer": "integer", "float": "number",
    "number": "number", "bool": "boolean", "boolean": "boolean", "dict": "object", "object": "object",
    "list": "array", "array": "array", "tuple": "array", "set": "array", "none": "null", "nonetype": "null",
}
_GENERIC = re.compile(r"^(?P<name>[A-Za-z_][\w.]*)\s*(?:\[(?P<args>.*)\])?$", re.S)
_OPTIONAL_SUFFIX = re.compile(r",\s*optional\s*$", re.I)


def _split_args(text: str) -> list[str]:
    """``"int, List[str]"`` -> ``["int", "List[str]"]`` (commas inside brackets don't split)."""
    parts, depth, start = [], 0, 0
    for pos, char in enumerate(text):
        if char == "[":
            depth += 1
        elif char == "]":
            depth -= 1
        elif char == "," and depth == 0:
            parts.append(text[start:pos].strip())
            start = pos + 1
    parts.append(text[start:].strip())
    return [p for p in parts if p]


def python_type_to_schema(type_text: str) -> tuple[dict[str, Any], bool]:
    """Map a Python-ish type string (xLAM's ``type``) to a JSON Schema fragment.

    ``str``/``int``/``float``/``bool`` -> string/integer/number/boolean; ``List[X]`` (also ``list``,
    ``Tuple``, ``Set``) -> array, with ``items`` when X maps exactly; ``Dict[...]`` -> object;
    ``Any`` -> no constraint. ``Union[...]``, ``Optional[...]`` and unknown names -> no type
    constraint (``{}``). The ``, optional`` suffix is not handled here (see `xlam_parameters_to_schema`).

    Returns:
        ``(schema, exact)``: `exact` is False when information was lost (the caller keeps the
        original string then).
    """
    match = _GENERIC.match(type_text.strip())
    if not match:
        return {}, False
    name, args = match["name"].lower().split(".")[-1], match["args"]
    if name == "any":
        return {}, True
    if name in ("union", "optional"):
        return {}, False
    json_type = _SIMPLE_TYPES.get(name)
    if json_type is None:
        return {}, False
    schema: dict[str, Any] = {"type": json_type}
    if json_type == "array" and args:
        inner = _split_args(args)
        if name == "tuple" and not (len(inner) == 2 and inner[1] == "..."):
            return schema, False  # a fixed-length tuple: the items differ per position
        item_schema, exact = python_type_to_schema(inner[0])
        if item_schema:
            schema["items"] = item_schema
        return schema, exact  # List[Any] is exact without items; List[Union[...]] is not
    return schema, True


def xlam_parameters_to_schema(parameters: Any, tool_name: str = "?") -> dict[str, Any]:
    """Convert xLAM's flat ``{param: {"description", "type", "default"?}}`` map to a JSON Schema object.

    - ``type`` goes through `python_type_to_schema`; when that loses information the original
      string is kept as ``"x-original-type"``.
    - A ``, optional`` suffix on ``type`` makes the parameter not required; all others are required.
    - ``default`` is kept as is (even when its type differs from ``type``) unless it is ``""``.
    - A map that already is a JSON Schema object (``"type": "object"`` + ``properties``) passes through.

    Raises:
        RowError: `parameters` is not a dict, or one parameter is not an object.
    """
    if parameters is None or parameters == {}:
        return {"type": "object", "properties": {}}
    if not isinstance(parameters, dict):
        raise RowError(f"bad tool parameters: tool {tool_name!r} has parameters of type "
                       f"{type(parameters).__name__}, expected an object")
    if parameters.get("type") == "object" and isinstance(parameters.get("properties"), dict):
        return normalize_parameters(parameters, tool_name)
    properties: dict[str, Any] = {}
    required: list[str] = []
    for pname, spec in parameters.items():
        if not isinstance(spec, dict):
            raise RowError(f"bad tool parameters: parameter {pname!r} of tool {tool_name!r} is "
                           f"{type(spec).__name__}, expected an object")
        type_text = spec.get("type")
        optional = False
        prop: dict[str, Any] = {}
        if isinstance(type_text, str) and type_text.strip():
            optional = bool(_OPTIONAL_SUFFIX.search(type_text))
            schema, exact = python_type_to_schema(_OPTIONAL_SUFFIX.sub("", type_text))
            prop.update(schema)
            if not exact:
                prop["x-original-type"] = type_text
        elif type_text is not None:
            prop["x-original-type"] = type_text
        if spec.get("description") is not None:
            prop["description"] = spec["description"]
        if "default" in spec and spec["default"] != "":
            prop["default"] = spec["default"]
        properties[pname] = prop
        if not optional:
            required.append(pname)
    out: dict[str, Any] = {"type": "object", "properties": properties}
    if required:
        out["required"] = required
    return out


def param_list_to_schema(parameters: Any, tool_name: str = "?") -> dict[str, Any]:
    """Convert llama_functions' list of parameter objects to a JSON Schema object.

    Each ``{"name", "type", "description", "optional"?, "enum"?, "items"?, ...}`` becomes
    ``properties[name]`` with every key but ``name`` and ``optional`` kept; a parameter is
    required unless ``optional`` is true (a boolean ``required`` key is honoured too). A dict is
    taken as JSON Schema already.

    Raises:
        RowError: not a list of objects, a parameter without a string name, or a name given twice.
    """
    if parameters is None or parameters == [] or parameters == {}:
        return {"type": "object", "properties": {}}
    if isinstance(parameters, dict):
        return normalize_parameters(parameters, tool_name)
    if not isinstance(parameters, list):
        raise RowError(f"bad tool parameters: tool {tool_name!r} has parameters of type "
                       f"{type(parameters).__name__}, expected a list")
    properties: dict[str, Any] = {}
    required: list[str] = []
    for k, param in enumerate(parameters):
        if not isinstance(param, dict) or not isinstance(param.get("name"), str) or not param["name"]:
            raise RowError(f"bad tool parameters: parameter {k} of tool {tool_name!r} is not an object with a name")
        pname = param["name"]
        if pname in properties:
            raise RowError(f"bad tool parameters: tool {tool_name!r} declares parameter {pname!r} twice")
        prop = {key: value for key, value in param.items() if key not in ("name", "optional", "required")}
        optional = param.get("optional") is True or param.get("required") is False
        properties[pname] = prop
        if not optional:
            required.append(pname)
    out: dict[str, Any] = {"type": "object", "properties": properties}
    if required:
        out["required"] = required
    return out


def normalize_parameters(parameters: Any, tool_name: str = "?") -> dict[str, Any]:
    """A JSON-Schema-like ``parameters`` made canonical: null/``{}`` -> an empty object schema,
    and ``"type": "object"`` added when it is missing. Everything else is kept as written.

    Raises:
        RowError: `parameters` is not a dict (or null).
    """
    if parameters is None or parameters == {}:
        return {"type": "object", "properties": {}}
    if not isinstance(parameters, dict):
        raise RowError(f"bad tool parameters: tool {tool_name!r} has parameters of type "
                       f"{type(parameters).__name__}, expected a JSON Schema object")
    if "type" not in parameters:
        parameters = {"type": "object", **parameters}
    return parameters


def make_tool(spec: Any, convert_parameters: Callable[[Any, str], dict[str, Any]] = normalize_parameters) -> Tool:
    """Build a `Tool` from ``{"name", "description"?, "parameters"?}``, wrapped in
    ``{"type": "function", "function": {...}}`` or not.

    Raises:
        RowError: not an object, no name, or a field the schema refuses.
    """
    if isinstance(spec, dict) and spec.get("type") == "function" and isinstance(spec.get("function"), dict):
        spec = spec["function"]
    if not isinstance(spec, dict):
        raise RowError(f"bad tool: a tool is {type(spec).__name__}, expected an object")
    name = spec.get("name")
    if not isinstance(name, str) or not name:
        raise RowError(f"bad tool: a tool has no name: {json.dumps(spec, default=str)[:120]}")
    description = spec.get("description")
    if description is not None and not isinstance(description, str):
        raise RowError(f"bad tool: tool {name!r} has a description of type {type(description).__name__}")
    try:
        return Tool(function=FunctionSpec(name=name, description=description or "",
                                          parameters=convert_parameters(spec.get("parameters"), name)))
    except SchemaError as err:
        raise RowError(f"bad tool: tool {name!r}: {err}") from None


def dedupe_tools(tools: list[Tool]) -> tuple[list[Tool], list[dict[str, Any]]]:
    """Keep the first tool of each name. Returns ``(kept, dropped)``, dropped as tool dicts."""
    kept, dropped, seen = [], [], set()
    for tool in tools:
        if tool.name in seen:
            dropped.append(tool.to_dict())
        else:
            seen.add(tool.name)
            kept.append(tool)
    return kept, dropped


def make_call(name: Any, arguments: Any, call_id: str | None = None) -> ToolCall:
    """Build a `ToolCall`; `arguments` must be a JSON object (a dict, or a string holding one).

    Raises:
        RowError: no name; arguments null, an array, a scalar, or a string that is not a JSON object.
    """
    if not isinstance(name, str) or not name:
        raise RowError(f"bad call: the call has no function name ({name!r})")
    if isinstance(arguments, str):
        try:
            arguments = loads_json(arguments) if arguments.strip() else {}
        except ValueError as err:
            raise RowError(f"broken JSON in call arguments: call to {name!r}: {err}") from None
    if arguments is None:
        raise RowError(f"bad call arguments: call to {name!r} has arguments null")
    if not isinstance(arguments, dict):
        kind = "a JSON array" if isinstance(arguments, list) else type(arguments).__name__
        raise RowError(f"bad call arguments: call to {name!r} has arguments that are {kind}, not an object")
    try:
        check_finite(arguments)
    except ValueError as err:
        raise RowError(f"broken JSON in call arguments: call to {name!r}: {err}") from None
    return ToolCall(id=call_id, function=Function(name=name, arguments=arguments))


def check_declared(calls: Iterable[ToolCall], tools: list[Tool], note: str = "") -> None:
    """Raise `RowError` if a call names a function that `tools` does not declare."""
    declared = [t.name for t in tools]
    for call in calls:
        if call.name not in declared:
            raise RowError(f"undeclared function: call to {call.name!r}, but the row declares "
                           f"{declared or 'no tools'}{note}")
