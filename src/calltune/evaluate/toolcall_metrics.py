"""Tool-calling metrics (tasks ``toolcall`` and ``bfcl``). Extraction (a format's `parse` -> `Parsed`)
happens before; this module only scores.

Owns `toolcall_metrics` (parsed outputs + reference examples -> metrics and per-example records) for
JSON-Schema tool-calling data (xLAM, glaive, Hermes, llama_functions, OpenAI JSONL). The reference of
an example is its final assistant turn: its ``tool_calls``, or "no call" when it has only content.

Definitions (each a share of examples in [0, 1], higher is better; named as in every task,
`calltune.evaluate.tasks`):

- function name accuracy: the multiset of predicted function names equals the reference's
  (order-free; a parallel answer must name each function as many times as the reference). The
  ViGGO metric of the same name (Levanter ViGGO tutorial; `calltune.evaluate.viggo_metrics`)
  generalised to several calls. A correct no-call (both empty) counts as correct.
- exact-call accuracy: the predicted calls equal the reference calls as multisets of canonical JSON
  (``{"name", "arguments"}`` with sorted keys; numbers compare by value, so ``2.0 == 2``, but
  ``true != 1`` and ``"2" != 2``). This is BFCL's AST-match idea (Berkeley Function Calling
  Leaderboard, https://gorilla.cs.berkeley.edu/blogs/8_berkeley_function_calling_leaderboard.html;
  ``ast_checker.py``: same function, same parameters and values, and for parallel calls
  ``parallel_function_checker_no_order``: the same number of calls, matched in any order), with one
  reference answer per call instead of BFCL's list of accepted values per parameter.
- parseable rate: share of outputs that parsed without error (``Parsed.error is None``). A
  plain-text answer parses (as no call).
- schema-valid rate: share of outputs that parsed and whose every call names a tool the example
  provides and has arguments that validate against that tool's ``parameters`` JSON Schema (the
  `jsonschema` library via `calltune.sources.tool_schema`, Draft 2020-12 unless the schema names
  another; a parameter with a ``default`` counts as optional, as in cleaning). An output with no
  call is vacuously schema-valid, so also reported: schema-valid call rate, the same share among outputs
  that call at least one tool (None if none does). BFCL's AST checker likewise rejects a call to a
  function not in the given list and a parameter of the wrong type.
- no-call precision and recall, with "the model should not call" as the positive class (BFCL's
  irrelevance detection: with only irrelevant functions given, the right answer is no call;
  accuracy there = recall here). Precision = of the outputs with no call, the share whose
  reference has no call; recall = of the references with no call, the share whose output has no
  call. An output "has no call" when it parsed (no error) with an empty ``tool_calls``. Either is
  **None when its denominator is 0** (no output without a call / no reference without a call).

An output that did not parse (``error`` set) is wrong on every metric: no name or exact match, not
parseable, not schema-valid, and not a no-call (it tried to call).
"""

from __future__ import annotations

import json
from collections import Counter
from typing import TYPE_CHECKING, Any

from calltune.errors import CalltuneError
from calltune.schema import Example, Tool, ToolCall
from calltune.sources.tool_schema import SchemaValidators, defaults_not_required, first_error

if TYPE_CHECKING:  # imported for annotations only: calltune.formats pulls in transformers
    from calltune.formats import Parsed

def reference_calls(example: Example) -> list[ToolCall]:
    """The calls of the example's final assistant turn ([] = the reference is "no call").

    Raises:
        ValueError: the example has no assistant turn (names its file and row).
    """
    final = example.final_assistant()
    if final is None:
        raise CalltuneError(f"{example.where}: no assistant turn, so there is no reference to score against")
    return list(final.tool_calls or [])


def _numbers_by_value(value: Any) -> Any:
    if isinstance(value, float) and value.is_integer():
        return int(value)
    if isinstance(value, dict):
        return {k: _numbers_by_value(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_numbers_by_value(v) for v in value]
    return value


def canonical_call(call: ToolCall) -> str:
    """``{"arguments": ..., "name": ...}`` as compact JSON with sorted keys; integral floats as ints."""
    return json.dumps({"name": call.name, "arguments": _numbers_by_value(call.arguments)},
                      sort_keys=True, ensure_ascii=False, separators=(",", ":"), default=str)


def schema_problems(calls: list[ToolCall], tools: list[Tool], validators: SchemaValidators | None = None) -> list[str]:
    """Why each call is not schema-valid against `tools` ([] = all valid): undeclared name, invalid
    tool schema, or the first JSON-Schema error of its arguments."""
    from jsonschema.exceptions import SchemaError as JSONSchemaError

    validators = validators or SchemaValidators()
    by_name = {t.name: t for t in tools}
    problems = []
    for j, call in enumerate(calls):
        tool = by_name.get(call.name)
        if tool is None:
            problems.append(f"call {j}: {call.name!r} is not a provided tool ({sorted(by_name) or 'none provided'})")
            continue
        validator = validators.get(defaults_not_required(tool.function.parameters))
        if isinstance(validator, JSONSchemaError):
            problems.append(f"call {j}: tool {call.name!r} has an invalid schema: {validator.message}")
            continue
        error = first_error(validator, call.arguments)
        if error is not None:
            problems.append(f"call {j} ({call.name}): {error[0]} (at {error[1]})")
    return problems


def score_toolcall(parsed: "Parsed", example: Example, validators: SchemaValidators | None = None) -> dict[str, Any]:
    """The per-example record: what was expected, what came out, and each metric's verdict for it."""
    ref = reference_calls(example)
    ok = parsed.error is None
    pred = list(parsed.tool_calls) if ok else []
    problems = schema_problems(pred, example.tools, validators) if ok else []
    return {
        "where": example.where,
        "reference": [canonical_call(c) for c in ref],
        "predicted": [canonical_call(c) for c in parsed.tool_calls],
        "error": parsed.error,
        "parseable": ok,
        "schema_valid": ok and not problems,
        "schema_problems": problems,
        "calls": ok and bool(pred),
        "name_match": ok and Counter(c.name for c in pred) == Counter(c.name for c in ref),
        "exact_match": ok and Counter(map(canonical_call, pred)) == Counter(map(canonical_call, ref)),
        "reference_no_call": not ref,
        "predicted_no_call": ok and not pred,
    }


def _share(hits: int, total: int) -> float | None:
    return hits / total if total else None


def toolcall_metrics(parsed: list["Parsed"], examples: list[Example]) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """Aggregate the tool-calling metrics of the module docstring over a split.

    Args:
        parsed: the format's parse of each model output, aligned with `examples`.
        examples: the reference examples (the final assistant turn is the reference).

    Returns:
        ``(metrics, records)``: the metrics of `calltune.evaluate.tasks.TOOLCALL_METRICS` plus ``n``,
        ``n_reference_no_call`` and ``n_predicted_no_call``; a rate whose denominator is 0 is None
        (all of them when there are no examples). Records: one `score_toolcall` dict per example,
        with its ``index``.

    Raises:
        ValueError: `parsed` and `examples` differ in length, or an example has no assistant turn.
    """
    if len(parsed) != len(examples):
        raise ValueError(f"{len(parsed)} predictions for {len(examples)} reference examples")
    validators = SchemaValidators()
    records = [{"index": i, **score_toolcall(p, e, validators)} for i, (p, e) in enumerate(zip(parsed, examples))]
    n = len(records)
    count = lambda key, among=records: sum(1 for r in among if r[key])  # noqa: E731
    calling = [r for r in records if r["calls"]]
    predicted_none = [r for r in records if r["predicted_no_call"]]
    reference_none = [r for r in records if r["reference_no_call"]]
    metrics: dict[str, Any] = {
        "function_name_accuracy": _share(count("name_match"), n),
        "exact_call_accuracy": _share(count("exact_match"), n),
        "parseable_rate": _share(count("parseable"), n),
        "schema_valid_rate": _share(count("schema_valid"), n),
        "schema_valid_call_rate": _share(count("schema_valid", calling), len(calling)),
        "no_call_precision": _share(count("reference_no_call", predicted_none), len(predicted_none)),
        "no_call_recall": _share(count("predicted_no_call", reference_none), len(reference_none)),
        "n": n,
        "n_reference_no_call": len(reference_none),
        "n_predicted_no_call": len(predicted_none),
    }
    return metrics, records
