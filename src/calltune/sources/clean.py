"""Dataset cleaning over canonical `Example`s: validate calls, repair safe mismatches, drop what cannot train.

Owns `CleanConfig` (one switch per rule), `clean` (examples -> kept examples + a report) and
`clean_command`, the body of ``calltune data clean``. The pieces it drives live beside it:
`calltune.sources.tool_schema` (JSON-Schema checks), `calltune.sources.repair` (argument repairs and
the per-call check), `calltune.sources.split` (categories, dedupe key, no-call balance, validation
split) and `calltune.sources.canonical_jsonl` (the files it writes).

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
   (else reject) and its arguments must validate against that tool's ``parameters`` JSON Schema
   (else reject); a tool whose schema is not valid JSON Schema -> reject. Before validating, two
   repairs (``parse_nested_json``, ``coerce_types``; `calltune.sources.repair`) fix strings whose
   meaning is unambiguous, each appended to ``meta["repairs"]``.
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
The report counts the call categories of `calltune.sources.split` before and after
(``report["categories_before"/"categories_after"]``).
"""

from __future__ import annotations

import json
import random
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from calltune.schema import Example
from calltune.sources.base import Rejects
from calltune.sources.canonical_jsonl import read_jsonl, write_jsonl
from calltune.sources.repair import check_calls, repair_value
from calltune.sources.split import (CATEGORIES, call_category, canonical_key, count_categories, is_multi_turn,
                                    max_kept_no_call, split_validation)
from calltune.sources.tool_schema import SchemaValidators, defaults_not_required, first_error

# Moved to the modules above; still importable from here.
__all__ = ["CATEGORIES", "CleanConfig", "CleanResult", "SchemaValidators", "call_category", "canonical_key",
           "check_calls", "clean", "clean_command", "count_categories", "defaults_not_required", "first_error",
           "is_multi_turn", "max_kept_no_call", "read_jsonl", "repair_value", "split_validation", "write_jsonl"]

STAGE = "clean"


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
# The rules

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


def _raw(example: Example) -> dict[str, Any]:
    return json.loads(example.to_json())


def _kind(reason: str) -> str:
    return reason.split(":")[0]


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
