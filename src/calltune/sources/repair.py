"""Repairs of call arguments whose meaning is unambiguous, and the per-call schema check of cleaning.

Owns `repair_value` and `check_calls` (rule ``validate_calls`` of `calltune.sources.clean`). Repairs
apply at any depth the schema describes (``properties``, ``items``, ``additionalProperties``), only
where the value is a string and the schema's ``type`` does not allow a string:

- ``parse_nested_json``: a string holding JSON where the schema expects an object or array -> the
  parsed value, if it is of that type (the top-level ``arguments`` string is already parsed by the
  schema);
- ``coerce_types``: ``"42"`` -> 42 for ``integer``; ``"3.5"`` -> 3.5 (``"3"`` -> 3) for ``number``;
  ``"true"`` / ``"false"`` (any case) -> bool for ``boolean``.

Each repair is reported as ``(kind, text)``, the text naming the path (``coerced
messages[1].tool_calls[0].arguments.n: '42' -> 42 (integer)``); `clean` appends the texts to
``meta["repairs"]``.
"""

from __future__ import annotations

import json
import re
from typing import TYPE_CHECKING, Any

from jsonschema.exceptions import SchemaError as JSONSchemaError

from calltune.schema import Example, Tool, ToolCall
from calltune.sources.tool_schema import SchemaValidators, defaults_not_required, first_error

if TYPE_CHECKING:  # annotations only: clean imports this module
    from calltune.sources.clean import CleanConfig

_REPAIR_TEXT = {"coerced integer": ("coerced", "integer"), "coerced number": ("coerced", "number"),
                "coerced boolean": ("coerced", "boolean"), "parsed nested JSON": ("parsed", "JSON string")}
_INTEGER = re.compile(r"-?\d+")
_NUMBER = re.compile(r"-?\d+(\.\d+)?([eE][+-]?\d+)?")


def _types(schema: dict[str, Any]) -> list[str]:
    kind = schema.get("type")
    if isinstance(kind, str):
        return [kind]
    return [k for k in kind if isinstance(k, str)] if isinstance(kind, list) else []


def _coerce_string(text: str, types: list[str], cfg: CleanConfig) -> tuple[Any, str] | None:
    """The repaired value of a string where the schema allows only `types`, and the repair kind; or None."""
    stripped = text.strip()
    if cfg.parse_nested_json and ("object" in types or "array" in types) and stripped[:1] in ("{", "["):
        try:
            value = json.loads(stripped)
        except json.JSONDecodeError:
            value = None
        if (isinstance(value, dict) and "object" in types) or (isinstance(value, list) and "array" in types):
            return value, "parsed nested JSON"
    if not cfg.coerce_types:
        return None
    if "integer" in types and _INTEGER.fullmatch(stripped):
        return int(stripped), "coerced integer"
    if "number" in types and _NUMBER.fullmatch(stripped):
        number = float(stripped)
        return (int(stripped) if _INTEGER.fullmatch(stripped) else number), "coerced number"
    if "boolean" in types and stripped.lower() in ("true", "false"):
        return stripped.lower() == "true", "coerced boolean"
    return None


def repair_value(value: Any, schema: Any, path: str, cfg: CleanConfig, repairs: list[tuple[str, str]]) -> Any:
    """`value` with the safe repairs of the module docstring applied where `schema` describes it.

    Appends ``(kind, text)`` to `repairs` for each change; returns a new value (the input is not mutated).
    """
    if not isinstance(schema, dict):
        return value
    types = _types(schema)
    if isinstance(value, str) and types and "string" not in types:
        fixed = _coerce_string(value, types, cfg)
        if fixed is not None:
            new, kind = fixed
            shown = json.dumps(new, ensure_ascii=False)
            verb, what = _REPAIR_TEXT[kind]
            repairs.append((kind, f"{verb} {path}: {value[:60]!r} -> {shown[:60]} ({what})"))
            value = new
    if isinstance(value, dict):
        properties = schema.get("properties") if isinstance(schema.get("properties"), dict) else {}
        extra = schema.get("additionalProperties")
        return {k: repair_value(v, properties.get(k, extra), f"{path}.{k}", cfg, repairs) for k, v in value.items()}
    if isinstance(value, list) and isinstance(schema.get("items"), dict):
        return [repair_value(v, schema["items"], f"{path}[{i}]", cfg, repairs) for i, v in enumerate(value)]
    return value


def _check_call(call: ToolCall, tool: Tool, where: str, cfg: CleanConfig, validators: SchemaValidators,
                repairs: list[tuple[str, str]]) -> tuple[dict[str, Any], str | None]:
    """``(repaired arguments, reject reason or None)`` of one call against one tool definition."""
    schema = tool.function.parameters
    arguments = call.arguments
    if cfg.coerce_types or cfg.parse_nested_json:
        arguments = repair_value(arguments, schema, f"{where}.arguments", cfg, repairs)
    validator = validators.get(defaults_not_required(schema) if cfg.defaults_optional else schema)
    if isinstance(validator, JSONSchemaError):
        return arguments, f"invalid tool schema: tool {call.name!r}: {validator.message}"
    error = first_error(validator, arguments)
    if error is not None:
        return arguments, f"schema violation: {where} ({call.name}): {error[0]} (at {error[1]})"
    properties = schema.get("properties")
    if cfg.reject_unknown_arguments and isinstance(properties, dict):
        unknown = sorted(set(arguments) - set(properties))
        if unknown:
            return arguments, (f"unknown argument: {where} ({call.name}) passes {unknown}, not among the tool's "
                               f"parameters {sorted(properties)}")
    return arguments, None


def check_calls(example: Example, cfg: CleanConfig, validators: SchemaValidators,
                repairs: list[tuple[str, str]]) -> str | None:
    """Repair (in place, on `example`) and validate every call; the reject reason, or None if all pass.

    Calls of assistant turns with ``weight=0`` are context, not targets, and are not checked.
    Calls are checked per function name, in order of first appearance. With
    ``resolve_duplicate_tools``, a name the source declared twice (the later definitions are in
    ``meta["dropped_duplicate_tools"]``) is checked against each definition in turn, and the first
    one that all its calls fit replaces the kept one.
    """
    tools = {t.name: t for t in example.tools}
    groups: dict[str, list[tuple[str, ToolCall]]] = {}
    for k, message in enumerate(example.messages):
        if message.weight == 0:  # a context turn (e.g. a deliberately broken call): not a training target
            continue
        for j, call in enumerate(message.tool_calls or []):
            groups.setdefault(call.name, []).append((f"messages[{k}].tool_calls[{j}]", call))
    dropped = example.meta.get("dropped_duplicate_tools") or []
    for name, calls in groups.items():
        if name not in tools:
            return (f"undeclared tool: {calls[0][0]} calls {name!r}, but the example declares "
                    f"{sorted(tools) or 'no tools'}")
        candidates = [tools[name]]
        if cfg.resolve_duplicate_tools:
            candidates += [Tool(**d) for d in dropped if isinstance(d, dict) and d.get("function", {}).get("name") == name]
        first_reason = None
        for n, tool in enumerate(candidates):
            found: list[tuple[str, str]] = []
            results = [_check_call(call, tool, where, cfg, validators, found) for where, call in calls]
            reason = next((r for _, r in results if r is not None), None)
            if reason is None:
                for (_, call), (arguments, _) in zip(calls, results):
                    call.function.arguments = arguments
                repairs.extend(found)
                if n > 0:
                    i = example.tools.index(tools[name])
                    example.meta["dropped_duplicate_tools"] = [d for d in dropped if d != tool.to_dict()] + \
                        [tools[name].to_dict()]
                    example.tools[i] = tools[name] = tool
                    dropped = example.meta["dropped_duplicate_tools"]
                    repairs.append(("chose duplicate tool definition",
                                    f"chose definition {n + 1} of {name!r}: its calls do not fit the first"))
                break
            first_reason = first_reason or reason
        else:
            return first_reason
    return None
