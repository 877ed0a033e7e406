"""Dataset cleaning over canonical `Example`s: validate calls, repair safe mismatches, drop what cannot train.

Owns `CleanConfig` (one switch per rule), `clean` (examples -> kept examples + a report), the
category counts (`call_category`, `is_multi_turn`), `split_validation`, the canonical JSONL files
(`write_jsonl` / `read_jsonl`, one `Example.to_json()` per line) and `clean_command`, the body of
``calltune data clean``.

The rules follow the Llama-3 LoRA project on glaive-function-calling-v2 (michaelnny/Llama3-FunctionCalling,
whose ``clean_dataset.py`` "removes invalid samples with malformed function call responses",
"standardizes conversation endings with assistant responses" and has ``--remove-no-fc``); the
malformed *syntax* is already rejected by the sources, so here "invalid" means invalid against the
tool's JSON Schema. Applied in this order, each switchable in `CleanConfig`:

1. ``trailing_user``: a conversation whose last turn is not an assistant turn (it ends on a user or
   tool turn) is kept, dropped, or trimmed back to its last assistant turn (rejected if it has none).
2. ``drop_empty_assistant``: an assistant turn with neither calls nor text (xLAM's ``answers == "[]"``
   becomes one, see `calltune.sources.xlam`) -> reject; it would teach the model to say nothing.
3. ``validate_calls``: every call of every assistant turn must name one of the example's tools
   (else reject) and its arguments must validate against that tool's ``parameters`` JSON Schema with
   the `jsonschema` library (the validator the schema's ``$schema`` names, Draft 2020-12 when it
   names none; else reject). A tool whose schema is not valid JSON Schema -> reject. Before
   validating, two repairs (``parse_nested_json``, ``coerce_types``) fix values whose meaning is
   unambiguous, at any depth the schema describes (``properties``, ``items``,
   ``additionalProperties``), only where the value is a string and the schema's ``type`` does not
   allow a string:
   - a string holding JSON where the schema expects an object or array -> the parsed value, if it
     is of that type (the top-level ``arguments`` string is already parsed by the schema);
   - ``"42"`` -> 42 for ``integer``; ``"3.5"`` -> 3.5 (``"3"`` -> 3) for ``number``; ``"true"`` /
     ``"false"`` (any case) -> bool for ``boolean``.
   Each repair is appended to ``meta["repairs"]`` as text naming the path (``coerced
   messages[1].tool_calls[0].arguments.n: '42' -> 42 (integer)``).
   Two leniencies, both on by default: ``defaults_optional`` lets a call omit a parameter that has
   a ``default`` even when ``required`` lists it (xLAM declares defaults without ``, optional``, and
   the real xLAM row with id 8 omits ``speed_of_light``); ``resolve_duplicate_tools`` checks a
   tool name the source saw declared twice (the later definitions are in
   ``meta["dropped_duplicate_tools"]``, glaive does this upstream) against each definition and
   keeps the first one all its calls fit (recorded in ``meta["repairs"]``).
   ``reject_unknown_arguments`` (off by default) additionally rejects an argument the tool's ``properties`` do not
   declare (JSON Schema allows them unless ``additionalProperties`` is false; BFCL's AST checker
   counts an unexpected parameter as wrong).
4. ``remove_no_call`` (that project's ``--remove-no-fc``): reject examples in which no assistant turn calls.
5. ``dedupe``: an example whose messages and tools (canonical JSON: sorted keys, call ids included,
   source/row/meta excluded) equal an earlier kept one's -> reject, naming the first one's row.
6. ``max_no_call_fraction``: if no-call examples are more than this share of the kept examples,
   reject a seeded random choice of them (reason ``balance``) until they are at most that share.

Every dropped example goes to the `Rejects` with ``stage="clean"``, its source and row, the
reason as ``"kind: detail"`` and the example as it came in. `clean` never raises on bad data.

Categories (counted before and after, in ``report["categories_before"/"categories_after"]``):
- ``no_call``: no assistant turn has tool calls;
- ``single_call``: exactly one assistant turn has calls, and it has exactly one;
- ``parallel_call``: some assistant turn has more than one call (BFCL's "parallel");
- ``sequential_call``: several assistant turns have calls, each exactly one (not one of the four
  defined by the brief of this module; added so that the four call categories are exclusive and
  sum to the number of examples);
- ``multi_turn``: more than one user turn or more than one assistant turn (overlaps the others).
"""

from __future__ import annotations

import io
import json
import math
import random
import re
from collections import Counter
from dataclasses import dataclass, field
from fractions import Fraction
from pathlib import Path
from typing import Any, Literal

import jsonschema
import referencing
from jsonschema.exceptions import SchemaError as JSONSchemaError
from jsonschema.exceptions import best_match
from pydantic import BaseModel, ConfigDict, Field
from referencing.exceptions import Unresolvable

from calltune.schema import Example, SchemaError, Tool, ToolCall
from calltune.sources.base import Rejects, SourceError, read_text

STAGE = "clean"
CATEGORIES = ("no_call", "single_call", "parallel_call", "sequential_call", "multi_turn")


class CleanConfig(BaseModel):
    """Switches of the cleaning rules (see the module docstring for what each does and in which order)."""

    model_config = ConfigDict(extra="forbid")

    trailing_user: Literal["keep", "drop", "trim"] = Field(
        "trim", description="conversations that end on a user or tool turn: keep them, drop them, or trim them "
                            "back to their last assistant turn (rejected if there is none)")
    drop_empty_assistant: bool = Field(
        True, description="reject examples with an assistant turn that has neither tool calls nor text")
    validate_calls: bool = Field(
        True, description="reject calls to undeclared tools and arguments that fail the tool's JSON Schema")
    coerce_types: bool = Field(
        True, description="before validating, repair strings where the schema wants integer/number/boolean "
                          "('42' -> 42, '3.5' -> 3.5, 'true' -> true); recorded in meta['repairs']")
    parse_nested_json: bool = Field(
        True, description="before validating, parse a string holding JSON where the schema wants an object or "
                          "array; recorded in meta['repairs']")
    defaults_optional: bool = Field(
        True, description="with validate_calls: a parameter that has a 'default' may be omitted even if 'required' "
                          "lists it (xLAM declares defaults without ', optional')")
    resolve_duplicate_tools: bool = Field(
        True, description="with validate_calls: when the source dropped a second definition of a tool name, use "
                          "the first definition the calls fit (recorded in meta['repairs'])")
    reject_unknown_arguments: bool = Field(
        False, description="with validate_calls: also reject an argument the tool's 'properties' do not declare")
    remove_no_call: bool = Field(
        False, description="reject examples in which no assistant turn calls a tool (as --remove-no-fc of the "
                           "Llama-3 glaive-v2 project)")
    dedupe: bool = Field(
        True, description="reject examples whose messages and tools equal an earlier example's")
    max_no_call_fraction: float | None = Field(
        None, ge=0.0, le=1.0, description="if set, drop a seeded random choice of no-call examples until they are "
                                          "at most this share of the kept examples (reason 'balance')")
    seed: int = Field(0, description="seed of the balance choice (and of `clean_command`'s validation split)")


@dataclass
class CleanResult:
    """What `clean` returns: the kept examples (in input order) and the report (see `clean`)."""

    examples: list[Example]
    report: dict[str, Any] = field(default_factory=dict)


# ---------------------------------------------------------------------------------------------
# Categories

def call_category(example: Example) -> str:
    """``no_call``, ``single_call``, ``parallel_call`` or ``sequential_call`` (module docstring)."""
    counts = [len(m.tool_calls) for m in example.messages if m.role == "assistant" and m.tool_calls]
    if not counts:
        return "no_call"
    if max(counts) > 1:
        return "parallel_call"
    return "single_call" if len(counts) == 1 else "sequential_call"


def is_multi_turn(example: Example) -> bool:
    """More than one user turn or more than one assistant turn."""
    roles = Counter(m.role for m in example.messages)
    return roles["user"] > 1 or roles["assistant"] > 1


def count_categories(examples: list[Example]) -> dict[str, int]:
    """``{category: n}`` for every name in `CATEGORIES` (zeros included)."""
    out = dict.fromkeys(CATEGORIES, 0)
    for example in examples:
        out[call_category(example)] += 1
        out["multi_turn"] += is_multi_turn(example)
    return out


# ---------------------------------------------------------------------------------------------
# Repairs and validation

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


class SchemaValidators:
    """JSON-Schema validators of tool parameter schemas, built once per distinct schema.

    A schema comes from a dataset or a request, so it is untrusted: its ``$ref`` resolve only inside
    the schema itself (a `referencing.Registry` with no retriever). jsonschema would otherwise fetch
    an ``http(s)://`` reference; here an external one is unresolvable, see `first_error`.
    """

    def __init__(self) -> None:
        self._cache: dict[str, Any] = {}

    def get(self, schema: dict[str, Any]) -> Any:
        """A validator for `schema`, or the `jsonschema.SchemaError` saying why it is not a valid schema."""
        key = json.dumps(schema, sort_keys=True, default=str)
        if key not in self._cache:
            cls = jsonschema.validators.validator_for(schema, default=jsonschema.Draft202012Validator)
            try:
                cls.check_schema(schema)
                self._cache[key] = cls(schema, registry=referencing.Registry())
            except JSONSchemaError as err:
                self._cache[key] = err
        return self._cache[key]


def first_error(validator: Any, instance: Any) -> tuple[str, str] | None:
    """``(message, "arguments.path")`` of the most relevant JSON-Schema error of `instance`, or None.

    A ``$ref`` that points outside the schema (a URL or a file) is reported as an error of its own
    (``external $ref ... is not resolved``): nothing is fetched or opened.
    """
    try:
        error = best_match(validator.iter_errors(instance))
    except Unresolvable as err:
        return f"external $ref {getattr(err, 'ref', str(err))!r} is not resolved (only references inside the " \
               "schema are)", "arguments"
    return None if error is None else (error.message, _where_in(error))


def _where_in(error: jsonschema.ValidationError) -> str:
    return "arguments" + "".join(f"[{p}]" if isinstance(p, int) else f".{p}" for p in error.absolute_path)


def defaults_not_required(schema: Any) -> Any:
    """`schema` with every property that has a ``default`` removed from ``required``, at every depth."""
    if not isinstance(schema, dict):
        return schema
    out = dict(schema)
    properties = schema.get("properties")
    if isinstance(properties, dict):
        out["properties"] = {k: defaults_not_required(v) for k, v in properties.items()}
        if isinstance(schema.get("required"), list):
            out["required"] = [r for r in schema["required"]
                               if not (isinstance(properties.get(r), dict) and "default" in properties[r])]
    if isinstance(schema.get("items"), dict):
        out["items"] = defaults_not_required(schema["items"])
    return out


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


# ---------------------------------------------------------------------------------------------
# The other rules

def _trailing(example: Example, mode: str) -> str | None:
    """Apply `trailing_user` in place; the reject reason, or None."""
    last = example.messages[-1]
    if mode == "keep" or last.role == "assistant":
        return None
    k = len(example.messages) - 1
    if mode == "drop":
        return f"ends on {last.role} turn: the last turn is messages[{k}] ({last.role})"
    ends = [i for i, m in enumerate(example.messages) if m.role == "assistant"]
    if not ends:
        return f"no assistant turn: nothing to keep after trimming the trailing {last.role} turn(s)"
    cut = len(example.messages) - ends[-1] - 1
    example.messages = example.messages[:ends[-1] + 1]
    example.meta.setdefault("repairs", []).append(f"trimmed {cut} turn(s) after the last assistant turn")
    return None


def _empty_assistant(example: Example) -> str | None:
    for k, m in enumerate(example.messages):
        if m.role == "assistant" and not m.tool_calls and not (m.content or "").strip():
            return f"empty assistant turn: messages[{k}] has neither tool calls nor text"
    return None


def canonical_key(example: Example) -> str:
    """Canonical JSON of messages and tools (sorted keys): equal for duplicates, whatever their source/row."""
    return json.dumps({"messages": example.messages_as_dicts(), "tools": example.tools_as_dicts()},
                      sort_keys=True, ensure_ascii=False, separators=(",", ":"), default=str)


def _raw(example: Example) -> dict[str, Any]:
    return json.loads(example.to_json())


def _kind(reason: str) -> str:
    return reason.split(":")[0]


def max_kept_no_call(n_call: int, n_no_call: int, fraction: float) -> int:
    """The largest n <= `n_no_call` with n / (n_call + n) <= `fraction`, i.e. n <= fraction * n_call / (1 - fraction).

    Computed in exact arithmetic on the decimal `fraction` as written (0.1 is 1/10, not the float).
    """
    share = Fraction(str(fraction))
    if share >= 1:
        return n_no_call
    return min(n_no_call, math.floor(share * n_call / (1 - share)))


def clean(examples: list[Example], cfg: CleanConfig | None = None, rejects: Rejects | None = None) -> CleanResult:
    """Apply the cleaning rules of the module docstring, in that order.

    Args:
        examples: canonical examples, e.g. from `calltune.sources.load_source`. Not modified: kept
            examples are deep copies (repairs and trims apply to the copies).
        cfg: the rule switches (default `CleanConfig()`).
        rejects: every dropped example is added here (``stage="clean"``); a fresh one if None.

    Returns:
        `CleanResult` with the kept examples in input order and ``report``::

            {"input": n, "kept": n, "rejected": {kind: n}, "repaired_examples": n,
             "repairs": {kind: n}, "trimmed": n,
             "categories_before": {...}, "categories_after": {...}}

        ``rejected`` keys are the reason kinds (the part before the colon); ``input == kept +
        sum(rejected.values())``. ``repaired_examples`` counts kept examples this stage changed
        (a repair, a chosen tool definition or a trim); ``repairs`` counts the changes by kind.
    """
    cfg = cfg or CleanConfig()
    rejects = rejects if rejects is not None else Rejects()
    rejected: Counter[str] = Counter()
    repair_kinds: Counter[str] = Counter()
    validators = SchemaValidators()
    repaired = trimmed = 0

    def reject(original: Example, reason: str) -> None:
        rejects.add(original.source, original.row, reason, _raw(original), stage=STAGE)
        rejected[_kind(reason)] += 1

    survivors: list[tuple[Example, Example]] = []  # (original, cleaned copy)
    for original in examples:
        example = original.model_copy(deep=True)
        before = len(example.meta.get("repairs", []))
        reason = _trailing(example, cfg.trailing_user)
        was_trimmed = len(example.messages) < len(original.messages)
        if reason is None and cfg.drop_empty_assistant:
            reason = _empty_assistant(example)
        if reason is None and cfg.validate_calls:
            found: list[tuple[str, str]] = []
            reason = check_calls(example, cfg, validators, found)
            if reason is None and found:
                example.meta.setdefault("repairs", []).extend(text for _, text in found)
                repair_kinds.update(kind for kind, _ in found)
        if reason is None and cfg.remove_no_call and call_category(example) == "no_call":
            reason = "no call: no assistant turn calls a tool (remove_no_call)"
        if reason is not None:
            reject(original, reason)
            continue
        trimmed += was_trimmed
        repair_kinds["trimmed trailing turns"] += was_trimmed
        repaired += len(example.meta.get("repairs", [])) > before
        survivors.append((original, example))

    if cfg.dedupe:
        first: dict[str, Example] = {}
        unique = []
        for original, example in survivors:
            key = canonical_key(example)
            if key in first:
                reject(original, f"duplicate: same messages and tools as {first[key].where}")
            else:
                first[key] = original
                unique.append((original, example))
        survivors = unique

    if cfg.max_no_call_fraction is not None:
        no_call = [i for i, (_, e) in enumerate(survivors) if call_category(e) == "no_call"]
        keep_n = max_kept_no_call(len(survivors) - len(no_call), len(no_call), cfg.max_no_call_fraction)
        if keep_n < len(no_call):
            kept_ids = set(random.Random(cfg.seed).sample(no_call, keep_n))
            dropped = set(no_call) - kept_ids
            share = f"{cfg.max_no_call_fraction:g}"
            for i in sorted(dropped):
                reject(survivors[i][0], f"balance: no-call examples limited to a share of {share} "
                                        f"(kept {keep_n} of {len(no_call)})")
            survivors = [s for i, s in enumerate(survivors) if i not in dropped]

    kept = [example for _, example in survivors]
    report = {
        "input": len(examples),
        "kept": len(kept),
        "rejected": dict(rejected),
        "repaired_examples": repaired,
        "repairs": {k: v for k, v in repair_kinds.items() if v},
        "trimmed": trimmed,
        "categories_before": count_categories(examples),
        "categories_after": count_categories(kept),
    }
    assert report["input"] == report["kept"] + sum(rejected.values()), report
    return CleanResult(kept, report)


# ---------------------------------------------------------------------------------------------
# Split and files

def split_validation(examples: list[Example], fraction: float = 0.1, seed: int = 0) -> tuple[list[Example], list[Example]]:
    """Hold out a seeded random `fraction` of `examples` for validation, as the hosted fine-tuning API
    (Scale LLM Engine) does when given no validation file ("LLM Engine will randomly split 10% of the
    data into a validation dataset").

    The validation size is ``round(n * fraction)`` (halves up), at most ``n - 1`` so training keeps at
    least one example. Both lists keep the input order. The same examples, fraction and seed give
    the same split.

    Raises:
        ValueError: `fraction` outside ``[0, 1)``.
    """
    if not 0.0 <= fraction < 1.0:
        raise ValueError(f"validation fraction must be in [0, 1), got {fraction}")
    n = len(examples)
    n_val = min(int(n * fraction + 0.5), max(n - 1, 0))
    val_ids = set(random.Random(seed).sample(range(n), n_val))
    train = [e for i, e in enumerate(examples) if i not in val_ids]
    val = [e for i, e in enumerate(examples) if i in val_ids]
    return train, val


def write_jsonl(examples: list[Example], path: str | Path) -> Path:
    """Write canonical JSONL: one `Example.to_json()` per line (UTF-8). Creates the parent folder."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", encoding="utf-8") as f:
        for example in examples:
            f.write(example.to_json() + "\n")
    return path


def read_jsonl(path: str | Path) -> list[Example]:
    """Read a file written by `write_jsonl` back into `Example`s (blank lines are skipped).

    Raises:
        SourceError: the file is missing, a directory, empty, unreadable or not UTF-8 (a leading BOM
            is accepted), or a line is not JSON or not a canonical example (the message names the line).
    """
    path = Path(path)
    out = []
    for i, line in enumerate(io.StringIO(read_text(path), newline=None)):  # universal newlines, as open()
        if not line.strip():
            continue
        try:
            out.append(Example.from_json(line))
        except json.JSONDecodeError as err:
            raise SourceError(str(path), i, None, f"line {i + 1} is not JSON ({err.msg})") from None
        except SchemaError as err:
            raise SourceError(str(path), i, None, f"line {i + 1} is not a canonical example: {err}") from None
    return out


def clean_command(source: str, input: str | Path, output: str | Path, val_output: str | Path | None = None,
                  rejects_path: str | Path | None = None, cfg: CleanConfig | None = None,
                  val_fraction: float = 0.1) -> dict[str, Any]:
    """Body of ``calltune data clean``: load `input` with `source`, clean, split, write the files.

    Writes the kept examples as canonical JSONL to `output`; with `val_output`, a seeded
    `val_fraction` of them go there instead (`split_validation`); with `rejects_path`, every
    row the source or the cleaning rejected (with stage and reason).

    Returns:
        The `clean` report plus ``source``, ``path``, ``rows`` (rows read = loaded + rejected on
        load), ``load_rejected`` (``{kind: n}``), ``train``, ``val`` and the paths written.

    Raises:
        ValueError: unknown source name. SourceError: the input is not what the source expects.
    """
    from calltune.sources import load_source

    cfg = cfg or CleanConfig()
    rejects = Rejects(Path(rejects_path) if rejects_path else None)
    examples = load_source(source, str(input), rejects=rejects)
    load_rejected = Counter(_kind(item["reason"]) for item in rejects.items)
    result = clean(examples, cfg, rejects)
    if val_output:
        train, val = split_validation(result.examples, val_fraction, cfg.seed)
    else:
        train, val = result.examples, []
    report: dict[str, Any] = {"source": source, "path": str(input), "rows": len(examples) + sum(load_rejected.values()),
                              "loaded": len(examples), "load_rejected": dict(load_rejected), **result.report,
                              "train": len(train), "val": len(val), "output": str(write_jsonl(train, output))}
    if val_output:
        report["val_output"] = str(write_jsonl(val, val_output))
    if rejects_path:
        report["rejects"] = str(rejects.write())
    return report
