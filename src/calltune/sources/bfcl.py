"""The Berkeley Function Calling Leaderboard (BFCL) single-turn AST categories as canonical `Example`s.

Owns `load_bfcl` (one category -> `Example`s), `bfcl_categories` and `bfcl_version`, plus the
conversion of BFCL's function docs to JSON-Schema tools and of BFCL's ground truth to one concrete
assistant turn. The data are the files the PyPI package ``bfcl-eval`` ships
(``bfcl_eval/data/BFCL_v<N>_<category>.json`` and ``data/possible_answer/...``, one JSON object a
line), found through importlib, never a hard-coded path. ``pip install --no-deps bfcl-eval`` is
enough: this module imports no code of the package, it only reads its data files.

What an example holds:
- messages: the question's system / user (and, in a few live_irrelevance rows, earlier assistant)
  turns; with ``with_answers=True`` also an assistant target turn (below).
- tools: the function docs as an OpenAI ``tools`` list, converted as BFCL's own OpenAI
  function-calling handler does (``bfcl_eval.utils._func_doc_language_specific_pre_processing``, then
  ``bfcl_eval.model_handler.utils.convert_to_tool`` with ``GORILLA_TO_OPENAPI``), so a model sees what
  BFCL shows to function-calling models: ``dict`` -> ``object``, ``float`` -> ``number`` (with
  ``format: float`` and BFCL's "This is a float type value." note), ``tuple`` -> ``array``,
  ``any`` -> ``string`` (BFCL maps it to string, and its checker wants a string for it: every
  ``any`` answer in the data is one), unknown or missing types -> ``string``; each function's
  description gets BFCL's language note ("... in Python 3 syntax."). For Java and JavaScript every
  parameter becomes a ``string`` whose description names the Java / JavaScript type, because the
  official checker only accepts those values as source-code literals in strings
  (``"new ArrayList<>(Arrays.asList(1, 2))"``, ``"true"``, ``"5L"``).
- meta["bfcl"]: ``id``, ``category``, ``language`` (python / java / javascript), ``function`` (the raw
  BFCL function docs, which the official checker reads) and ``ground_truth`` (the possible answers:
  a list with one ``{function_name: {arg: [acceptable values]}}`` per expected call; ``""`` among the
  values means the argument may be omitted; None for the relevance / irrelevance categories).

Function names keep BFCL's dots (``math.factorial``), in the tools, the target calls and the ground
truth. Whether a prompt format must rewrite them is the format's business: OpenAI-style APIs reject
dots, so BFCL's own OpenAI handler sends ``math_factorial`` and, for models flagged
``underscore_to_dot``, its checker compares against the rewritten name. A format that rewrites names
must map them back before `calltune.evaluate.bfcl_checker.score_bfcl`, which compares against the
original dotted names.

The assistant target turn (``with_answers=True``, meant for training on the live categories):
- categories with ground truth: one concrete call per ground-truth call, each argument taking its
  first acceptable value; an optional argument whose first acceptable value is ``""`` is omitted
  (a required one takes its first non-empty value, or ``""`` if there is none), and so is an
  argument the function doc does not declare, when ``""`` is acceptable. Values inside ``dict``
  arguments (and lists of dicts) are chosen the same way. Java / JavaScript values are rendered as
  the source literals the official type converters parse back (``True`` -> ``"true"``, ``[1, 2]``
  -> ``"new int[]{1, 2}"``). The official checker accepts these targets for every entry but 7 whose
  ground truth no call can satisfy (BFCL data bugs, listed in tests/test_bfcl.py: simple_java 36,
  64, 65; live_simple 106, 112; live_multiple 862, 964); their targets are kept but imperfect.
- irrelevance, live_irrelevance: no call; the assistant answers `NO_CALL_REPLY` (the schema needs
  content or tool calls on an assistant turn, so the "no call" target is this fixed text).
- live_relevance: BFCL gives no ground truth (any call passes), so no target turn is added.
"""

from __future__ import annotations

import copy
import difflib
import json
import re
from importlib import metadata, resources, util
from pathlib import Path
from typing import Any

from calltune.errors import CalltuneError
from calltune.schema import Example, FunctionSpec, Message, SchemaError, Tool, ToolCall
from calltune.sources.base import Rejects, SourceError

# The single-turn categories BFCL scores with its AST checker (or the relevance rule), in its order.
CATEGORIES = ("simple_python", "multiple", "parallel", "parallel_multiple", "irrelevance", "simple_java",
              "simple_javascript", "live_simple", "live_multiple", "live_parallel", "live_parallel_multiple",
              "live_irrelevance", "live_relevance")
ALIASES = {"simple": "simple_python", "java": "simple_java", "javascript": "simple_javascript"}
# BFCL's non-live single-turn AST categories, every entry of its leaderboard's non-live table (the parts of
# `calltune.evaluate.bfcl_checker.NON_LIVE_SUMMARY`, plus irrelevance): the default job's held-out eval set
# and `calltune eval --benchmark bfcl`'s default. Join with "," where a comma string is wanted.
NON_LIVE_EVAL = ("simple_python", "simple_java", "simple_javascript", "multiple", "parallel", "parallel_multiple",
                 "irrelevance")
NO_ANSWER_CATEGORIES = frozenset({"irrelevance", "live_irrelevance", "live_relevance"})

NO_CALL_REPLY = "I can't help with that using the available tools."

# bfcl_eval.constants.type_mappings.GORILLA_TO_OPENAPI (copied: that module is light, but the source
# should not depend on the package's code layout, only on its data).
GORILLA_TO_OPENAPI = {
    "integer": "integer", "number": "number", "float": "number", "string": "string", "boolean": "boolean",
    "bool": "boolean", "array": "array", "list": "array", "dict": "object", "object": "object",
    "tuple": "array", "any": "string", "byte": "integer", "short": "integer", "long": "integer",
    "double": "number", "char": "string", "ArrayList": "array", "Array": "array", "HashMap": "object",
    "Hashtable": "object", "Queue": "array", "Stack": "array", "Any": "string", "String": "string",
    "Bigint": "integer",
}
_LANGUAGE_NOTE = {"python": " Note that the provided function is in Python 3 syntax.",
                  "java": " Note that the provided function is in Java 8 SDK syntax.",
                  "javascript": " Note that the provided function is in JavaScript syntax."}
_INSTALL_HINT = "install it with `pip install --no-deps bfcl-eval` (its own dependencies are not needed)"


class BFCLNotInstalledError(ImportError):
    """bfcl-eval, or a file calltune needs from it, is missing; the message says what and what to do."""


def bfcl_categories() -> list[str]:
    """The single-turn AST categories `load_bfcl` reads (aliases: ``simple``, ``java``, ``javascript``)."""
    return list(CATEGORIES)


def bfcl_version() -> str:
    """The installed bfcl-eval version (e.g. ``2026.3.23``); raises `BFCLNotInstalledError` if absent."""
    try:
        return metadata.version("bfcl-eval")
    except metadata.PackageNotFoundError:
        raise BFCLNotInstalledError(f"bfcl-eval is not installed; {_INSTALL_HINT}") from None


def category_language(category: str) -> str:
    """``java``, ``javascript`` or ``python``, decided from the name as BFCL does (`is_java`, `is_js`)."""
    if "javascript" in category:
        return "javascript"
    return "java" if "java" in category else "python"


def _data_dir() -> Path:
    if util.find_spec("bfcl_eval") is None:
        raise BFCLNotInstalledError(f"bfcl-eval is not installed; {_INSTALL_HINT}")
    data = Path(str(resources.files("bfcl_eval") / "data"))
    if not data.is_dir():
        raise BFCLNotInstalledError(f"bfcl-eval {bfcl_version()} has no data directory at {data}; "
                                    "calltune expects the data files inside the package (bfcl_eval/data)")
    return data


def _data_file(directory: Path, category: str) -> Path | None:
    # BFCL_v<N>_<category>.json; the highest N if several versions sit side by side.
    pattern = re.compile(rf"^BFCL_v(\d+)_{re.escape(category)}\.json$")
    found = sorted(((int(m[1]), p) for p in directory.iterdir() if (m := pattern.match(p.name))), reverse=True)
    return found[0][1] if found else None


def bfcl_files(category: str) -> tuple[Path, Path | None]:
    """``(questions file, possible-answer file or None)`` of a category in the installed bfcl-eval."""
    category = _resolve(category)
    data = _data_dir()
    questions = _data_file(data, category)
    if questions is None:
        raise BFCLNotInstalledError(f"bfcl-eval {bfcl_version()} has no questions file BFCL_v*_{category}.json "
                                    f"in {data}")
    answers = _data_file(data / "possible_answer", category) if (data / "possible_answer").is_dir() else None
    if answers is None and category not in NO_ANSWER_CATEGORIES:
        raise BFCLNotInstalledError(f"bfcl-eval {bfcl_version()} has no possible-answer file "
                                    f"possible_answer/BFCL_v*_{category}.json in {data}")
    return questions, answers


def _resolve(category: str) -> str:
    category = ALIASES.get(category, category)
    if category not in CATEGORIES:
        close = difflib.get_close_matches(category, list(CATEGORIES) + list(ALIASES), n=1)
        hint = f" Did you mean {close[0]!r}?" if close else ""
        raise CalltuneError(f"unknown BFCL category {category!r}.{hint} Choices: {', '.join(CATEGORIES)}")
    return category


def _read_jsonl(path: Path) -> list[dict[str, Any]]:
    rows = []
    with path.open(encoding="utf-8") as f:
        for i, line in enumerate(f):
            if not line.strip():
                continue
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError as err:
                raise SourceError(str(path), i, None, f"not a JSON line ({err.msg})") from None
    return rows


# ---- function docs -> JSON-Schema tools ------------------------------------------------------------

def _language_preprocess(function: dict[str, Any], language: str) -> dict[str, Any]:
    """`bfcl_eval.utils._func_doc_language_specific_pre_processing`, for one function doc (a copy)."""
    function = copy.deepcopy(function)
    function["description"] = function.get("description", "") + _LANGUAGE_NOTE[language]
    if language == "python":
        return function
    name = "Java" if language == "java" else "JavaScript"
    array_type = ("ArrayList", "Array") if language == "java" else ("array",)
    for value in function["parameters"].get("properties", {}).values():
        kind = value.get("type", "")
        value.setdefault("description", "")
        if kind == "any":
            value["description"] += f" This parameter can be of any type of {name} object in string representation."
        else:
            value["description"] += f" This is {name} {kind} type parameter in string representation."
        if kind in array_type and "items" in value:
            value["description"] += (f" The list elements are of type {value['items'].get('type')}; "
                                     "they are not in string representation.")
            del value["items"]
        if language == "javascript" and kind == "dict" and "properties" in value:
            value["description"] += (" The dictionary entries have the following schema; they are not in "
                                     f"string representation. {json.dumps(value['properties'])}")
            del value["properties"]
        value["type"] = "string"
    return function


def _cast_schema(schema: dict[str, Any]) -> dict[str, Any]:
    """BFCL types -> JSON Schema types, recursively (BFCL's `_cast_to_openai_type` goes two levels)."""
    out = dict(schema)
    kind = out.get("type")
    if kind == "float":
        out["format"] = "float"
        out["description"] = out.get("description", "") + " This is a float type value."
    out["type"] = GORILLA_TO_OPENAPI.get(kind, "string") if isinstance(kind, str) else "string"
    if isinstance(out.get("properties"), dict):
        out["properties"] = {k: _cast_schema(v) for k, v in out["properties"].items()}
    if isinstance(out.get("items"), dict):
        out["items"] = _cast_schema(out["items"])
    return out


def bfcl_tool(function: dict[str, Any], language: str = "python") -> Tool:
    """One BFCL function doc as a canonical `Tool`; the name (dots and all) is kept."""
    function = _language_preprocess(function, language)
    parameters = dict(function.get("parameters") or {})
    parameters["type"] = "object"
    parameters["properties"] = {k: _cast_schema(v) for k, v in (parameters.get("properties") or {}).items()}
    return Tool(function=FunctionSpec(name=function["name"], description=function.get("description", ""),
                                      parameters=parameters))


# ---- ground truth -> one concrete call -------------------------------------------------------------

def _first(values: list[Any], required: bool) -> tuple[bool, Any]:
    """``(keep, value)``: the first acceptable value; ``""`` first means omit it, unless required."""
    if not values:
        return False, None
    if values[0] == "":
        if not required:
            return False, None
        rest = [v for v in values if v != ""]
        return True, (rest[0] if rest else "")
    return True, values[0]


def _pick_dict(answer: dict[str, list[Any]]) -> dict[str, Any]:
    # A dict argument's answer maps each key to its acceptable values (the checker's `dict_checker`).
    out = {}
    for key, values in answer.items():
        keep, value = _first(values if isinstance(values, list) else [values], required=False)
        if keep:
            out[key] = value
    return out


def _pick_value(value: Any, spec: dict[str, Any]) -> Any:
    kind = spec.get("type")
    if isinstance(value, dict) and kind in ("dict", "HashMap"):
        return _pick_dict(value)
    if isinstance(value, list) and kind in ("array", "ArrayList", "Array") and \
            (spec.get("items") or {}).get("type") == "dict" and all(isinstance(v, dict) for v in value):
        return [_pick_dict(v) for v in value]
    return value


def _java_literal(value: Any, kind: str, item_kind: str | None = None) -> str:
    """A Python value as the Java source literal `java_type_converter` parses back to it."""
    if isinstance(value, str):
        return value  # strings, and variable names standing for values of any type
    if isinstance(value, bool):
        return "true" if value else "false"
    if kind == "long":
        return f"{value}L"
    if kind == "float":
        return f"{value}f"
    if kind == "Array" and isinstance(value, list):
        element = {"String": "String", "integer": "int", "long": "long", "float": "float", "double": "double",
                   "boolean": "boolean", "char": "char"}.get(item_kind or "", "Object")
        items = ", ".join(_java_literal(v, item_kind or "", None) for v in value)
        return f"new {element}[]{{{items}}}"
    if kind == "ArrayList" and isinstance(value, list):
        if not value:
            return "new ArrayList<>()"
        items = ", ".join(_java_element(v, item_kind) for v in value)
        return f"new ArrayList<>(Arrays.asList({items}))"
    if kind == "HashMap" and isinstance(value, dict):
        puts = " ".join(f'put("{k}", {_java_element(v, None)});' for k, v in value.items())
        return f"new HashMap<String, Object>() {{{{ {puts} }}}}" if puts else "new HashMap<>()"
    return json.dumps(value) if isinstance(value, (list, dict)) else str(value)


def _java_element(value: Any, kind: str | None) -> str:
    # Elements inside ArrayList / HashMap literals: strings are quoted (chars in single quotes).
    if isinstance(value, str):
        return f"'{value}'" if kind == "char" else f'"{value}"'
    return _java_literal(value, kind or "", None)


def _js_literal(value: Any, kind: str) -> str:
    """A Python value as the JavaScript source literal `js_type_converter` parses back to it."""
    if isinstance(value, str):
        return value  # strings, and variable names standing for values of any type
    if kind == "Bigint" and isinstance(value, int):
        return f"{value}n"
    return _js_element(value)


def _js_element(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return f'"{value}"'
    if isinstance(value, list):
        return "[" + ", ".join(_js_element(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{" + ", ".join(f"{k}: {_js_element(v)}" for k, v in value.items()) + "}"
    return "null" if value is None else str(value)


def ground_truth_call(answer: dict[str, dict[str, list[Any]]], functions: list[dict[str, Any]],
                      language: str = "python") -> ToolCall:
    """One possible answer ``{name: {arg: [acceptable values]}}`` as a concrete `ToolCall`.

    Each argument takes its first acceptable value; an optional one whose first value is ``""`` is
    omitted. For Java / JavaScript the value is rendered as a source literal string.
    """
    (name, arguments), = answer.items()
    doc = next((f for f in functions if f["name"] == name), None)
    properties = (doc or {}).get("parameters", {}).get("properties", {})
    required = set((doc or {}).get("parameters", {}).get("required", []))
    out = {}
    for arg, values in arguments.items():
        keep, value = _first(values, arg in required)
        if not keep or (arg not in properties and "" in values):
            continue  # omitted; an argument the doc does not declare is left out when it may be
        spec = properties.get(arg, {})
        value = _pick_value(value, spec)
        if language == "java":
            value = _java_literal(value, spec.get("type", ""), (spec.get("items") or {}).get("type"))
        elif language == "javascript":
            value = _js_literal(value, spec.get("type", ""))
        out[arg] = value
    return ToolCall.of(name, out)


# ---- the loader ------------------------------------------------------------------------------------

def load_bfcl(category: str, limit: int | None = None, rejects: Rejects | None = None,
              with_answers: bool = True) -> list[Example]:
    """Read one BFCL single-turn category from the installed bfcl-eval into `Example`s.

    Args:
        category: one of `bfcl_categories()` (or an alias: ``simple``, ``java``, ``javascript``).
        limit: keep only the first `limit` entries (for smoke tests).
        rejects: entries that cannot be converted are added here (and counted), not raised.
        with_answers: add the assistant target turn (see the module docstring). The ground truth is
            in ``meta["bfcl"]["ground_truth"]`` either way; without the target turn an example ends
            with the question, ready for generation.

    Raises:
        ValueError: unknown category (with "did you mean" and the choices).
        BFCLNotInstalledError: bfcl-eval, or the category's data file, is missing.
        SourceError: a data file is not JSON lines, or questions and answers do not line up.
    """
    category = _resolve(category)
    language = category_language(category)
    questions_path, answers_path = bfcl_files(category)
    where = str(questions_path)
    questions = _read_jsonl(questions_path)
    answers: dict[str, Any] = {}
    if answers_path is not None:
        answers = {row["id"]: row.get("ground_truth") for row in _read_jsonl(answers_path)}
        missing = [q.get("id") for q in questions if q.get("id") not in answers]
        if missing:
            raise SourceError(str(answers_path), None, "id",
                              f"{len(missing)} question id(s) have no possible answer, e.g. {missing[0]!r}; "
                              "the bfcl-eval install looks incomplete (reinstall it)")
    rejects = rejects if rejects is not None else Rejects()
    examples = []
    for i, row in enumerate(questions[:limit] if limit else questions):
        try:
            turns = row["question"]
            if len(turns) != 1:
                raise ValueError(f"question has {len(turns)} turns; single-turn categories have one")
            messages = [Message(role=m["role"], content=m["content"]) for m in turns[0]]
            functions = row["function"]
            tools = [bfcl_tool(f, language) for f in functions]
            ground_truth = answers.get(row["id"]) if answers_path is not None else None
            if with_answers:
                if category in ("irrelevance", "live_irrelevance"):
                    messages.append(Message(role="assistant", content=NO_CALL_REPLY))
                elif ground_truth is not None:
                    calls = [ground_truth_call(a, functions, language) for a in ground_truth]
                    messages.append(Message(role="assistant", tool_calls=calls))
            examples.append(Example(
                messages=messages, tools=tools, source=where, row=i,
                meta={"bfcl": {"id": row["id"], "category": category, "language": language,
                               "function": functions, "ground_truth": ground_truth}}))
        except (KeyError, TypeError, ValueError, SchemaError) as err:
            reason = f"missing field {err}" if isinstance(err, KeyError) else str(err)
            rejects.add(where, i, f"unusable BFCL entry: {reason}", row)
    return examples
