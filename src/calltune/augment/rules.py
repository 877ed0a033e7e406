"""Data augmentation over canonical examples: new tool-calling examples made from existing ones.

Owns `augment` (examples -> originals kept + new examples + a report) and the rules it runs. It sits
between cleaning and rendering and works on any source's examples. Every random choice comes from one
`random.Random(cfg.seed)`, so the same input and config give the same output. Each new example records
``meta["augment"] = {"rule": ..., "sources": [[source, row], ...], ...}`` and is checked by the
cleaning stage's schema check (`calltune.sources.repair.check_calls`, unknown arguments rejected):
one that fails goes to the rejects (stage ``augment``) and is counted, never kept.

A *single-call example* is one user request (optionally after a system turn) answered by one
assistant turn with exactly one call; most rules draw from these. The rules:

- ``irrelevance``: a request with the tools it calls removed becomes a no-call example whose answer
  is ``reply`` (the technique of the Hammer and xLAM irrelevance sets, Lin et al. 2024, Liu et al.
  2024). The tools it keeps are its other tools or, for a ``borrow`` share (and whenever none are
  left), the tools of an unrelated example; any tool whose name is close to a removed one
  (`similar_names`) is dropped too, so the request is not servable by a near-namesake.
- ``parallel``: 2-4 single-call requests that call the same function (same name and parameter
  schema) joined into one user turn; the answer is their calls in parallel (BFCL's "parallel").
- ``parallel_multiple``: the same with different functions, the tool lists merged (BFCL's
  "parallel_multiple"); a combination whose tool names clash with different definitions is skipped.
- ``distractors``: 1-3 tools of other examples added to an example's tool list, all shuffled.
- ``self_correction``: a single call broken the way small models break calls (a wrong type, a missing
  required argument, an unknown argument), a ``tool`` turn carrying the error calltune's schema check
  writes for it, then the original call. The broken turn has ``weight=0`` (OpenAI's per-message
  fine-tuning weight): it and the error are context, only the corrected call is trained.
- ``answer_after_results``: a single call, a ``tool`` turn with a result that fits it, then a short
  text answer that states the result, so the model learns to stop calling once it has what it needs.
  The result is synthetic: a JSON object with one or two fields named after the function
  (``get_current_weather`` -> ``current_weather``) and, when the call has arguments, the first
  argument echoed; its values are seeded random numbers or words. The answer is one of a few
  sentence templates that names the function and states every field of the result.
"""

from __future__ import annotations

import copy
import difflib
import json
import random
import re
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Any

from calltune.augment.config import AugmentConfig
from calltune.schema import Example, Message, Tool, ToolCall
from calltune.sources.base import Rejects
from calltune.sources.clean import CleanConfig
from calltune.sources.repair import check_calls
from calltune.sources.split import call_category, count_categories
from calltune.sources.tool_schema import SchemaValidators

STAGE = "augment"
RULES = ("irrelevance", "parallel", "parallel_multiple", "distractors", "self_correction", "answer_after_results")
_CHECK = CleanConfig(coerce_types=False, parse_nested_json=False, reject_unknown_arguments=True)
_JOINERS = (" Also, ", " And ", " Then ", "\n")
_WORDS = ("ok", "done", "available", "pending", "blue", "north", "active", "approved", "closed", "open")


@dataclass
class AugmentResult:
    """What `augment` returns: originals kept (after `max_tools` and `mix`), new examples, and the report."""

    originals: list[Example]
    new: list[Example]
    report: dict[str, Any] = field(default_factory=dict)

    @property
    def examples(self) -> list[Example]:
        return self.originals + self.new


# ---------------------------------------------------------------------------------------------
# Helpers

@dataclass
class _Single:
    """A single-call example taken apart: its leading system turn, the request, the call and its tool."""

    example: Example
    system: Message | None
    user: Message
    call: ToolCall
    tool: Tool


def _single(example: Example) -> _Single | None:
    m = example.messages
    system = m[0] if m and m[0].role == "system" else None
    rest = m[1:] if system else m
    if len(rest) != 2 or rest[0].role != "user" or rest[1].role != "assistant":
        return None
    calls = rest[1].tool_calls or []
    if len(calls) != 1 or rest[1].weight == 0:
        return None
    tool = next((t for t in example.tools if t.name == calls[0].name), None)
    return _Single(example, system, rest[0], calls[0], tool) if tool else None


def _origin(example: Example) -> list:
    return [example.source, example.row]


def _tool_key(tool: Tool) -> str:
    return json.dumps(tool.to_dict(), sort_keys=True, default=str)


def _name_core(name: str) -> str:
    return re.sub(r"[^a-z]", "", name.lower())


def similar_names(a: str, b: str, threshold: float = 0.6) -> bool:
    """True when two function names are close enough to serve the same request.

    Compared on their lower-case letters only (``Movies_3_FindMovies`` ~ ``Media_3_FindMovies``), by
    `difflib.SequenceMatcher` ratio at least `threshold`, or one containing the other.
    """
    x, y = _name_core(a), _name_core(b)
    if not x or not y:
        return x == y
    return x in y or y in x or difflib.SequenceMatcher(None, x, y).ratio() >= threshold


def _lower_first(text: str) -> str:
    # "What is..." -> "what is..."; "NASA ..." and "iPhone ..." stay as they are.
    if len(text) > 1 and text[0].isupper() and text[1].islower():
        return text[0].lower() + text[1:]
    return text


def join_requests(texts: list[str], rng: random.Random) -> str:
    """User requests joined into one turn: ``"A Also, b And c"`` (seeded connector choice)."""
    out = texts[0].strip()
    for text in texts[1:]:
        joiner = rng.choice(_JOINERS)
        out += joiner + (_lower_first(text.strip()) if joiner.strip() else text.strip())
    return out


def _prefix(parts: list[_Single]) -> list[Message]:
    system = next((p.system for p in parts if p.system is not None), None)
    return [system.model_copy(deep=True)] if system else []


def _merge_tools(parts: list[_Single]) -> list[Tool] | None:
    """The union of the parts' tool lists by name; None if a name has two different definitions."""
    tools: dict[str, Tool] = {}
    for part in parts:
        for tool in part.example.tools:
            kept = tools.get(tool.name)
            if kept is None:
                tools[tool.name] = tool.model_copy(deep=True)
            elif _tool_key(kept) != _tool_key(tool):
                return None
    return list(tools.values())


def _new(messages: list[Message], tools: list[Tool], rule: str, sources: list[_Single] | list[Example],
         **details: Any) -> Example:
    origins = [_origin(s.example if isinstance(s, _Single) else s) for s in sources]
    return Example(messages=messages, tools=tools, source=f"augment:{rule}", row=None,
                   meta={"augment": {"rule": rule, "sources": origins, **details}})


# ---------------------------------------------------------------------------------------------
# The rules. Each takes the pool, the rng and its settings and returns up to `count` new examples.

def _irrelevance(singles: list[_Single], pool: list[Example], rng: random.Random, cfg) -> list[Example]:
    out = []
    for part in rng.sample(singles, min(cfg.count, len(singles))):
        removed = part.call.name
        keep = [t for t in part.example.tools if not similar_names(t.name, removed)]
        borrowed_from = None
        if not keep or rng.random() < cfg.borrow:
            donors = [e for e in pool if e.tools and not any(similar_names(t.name, removed) for t in e.tools)]
            if not donors:
                continue
            donor = rng.choice(donors)
            keep, borrowed_from = [t.model_copy(deep=True) for t in donor.tools], donor
        rng.shuffle(keep)
        messages = _prefix([part]) + [part.user.model_copy(deep=True), Message(role="assistant", content=cfg.reply)]
        sources = [part.example] + ([borrowed_from] if borrowed_from is not None else [])
        out.append(_new(messages, keep, "irrelevance", sources, removed_tools=[removed],
                        tools_from="borrowed" if borrowed_from is not None else "own"))
    return out


def _join(parts: list[_Single], rng: random.Random, rule: str) -> Example | None:
    tools = _merge_tools(parts)
    if tools is None:
        return None
    rng.shuffle(tools)
    calls = [ToolCall.of(p.call.name, copy.deepcopy(p.call.arguments)) for p in parts]
    user = Message(role="user", content=join_requests([p.user.content or "" for p in parts], rng))
    return _new(_prefix(parts) + [user, Message(role="assistant", tool_calls=calls)], tools, rule, parts)


def _joins(draw, rng: random.Random, cfg, rule: str) -> list[Example]:
    """Up to ``cfg.count`` joined examples from `draw()` (parts to join, or None to skip a draw)."""
    out: list[Example] = []
    for _ in range(cfg.count * 4):  # bounded attempts: a draw may repeat a request or clash
        if len(out) >= cfg.count:
            break
        parts = draw()
        if parts is None:
            break
        example = _join(parts, rng, rule) if parts else None
        if example is not None:
            out.append(example)
    return out


def _parallel(singles: list[_Single], rng: random.Random, cfg) -> list[Example]:
    groups: dict[str, list[_Single]] = defaultdict(list)
    for part in singles:
        groups[_tool_key(part.tool)].append(part)
    groups_ok = [g for g in groups.values() if len(g) >= cfg.min_calls]

    def draw() -> list[_Single] | None:  # [] : a draw that repeats a request; None: nothing to draw from
        if not groups_ok:
            return None
        group = rng.choice(groups_ok)
        parts = rng.sample(group, rng.randint(cfg.min_calls, min(cfg.max_calls, len(group))))
        return parts if len({p.user.content for p in parts}) == len(parts) else []

    return _joins(draw, rng, cfg, "parallel")


def _parallel_multiple(singles: list[_Single], rng: random.Random, cfg) -> list[Example]:
    def draw() -> list[_Single] | None:  # [] : a draw that repeats a function; None: too few requests
        if len(singles) < cfg.min_calls:
            return None
        parts = rng.sample(singles, rng.randint(cfg.min_calls, min(cfg.max_calls, len(singles))))
        return parts if len({p.call.name for p in parts}) == len(parts) else []

    return _joins(draw, rng, cfg, "parallel_multiple")


def _distractors(pool: list[Example], rng: random.Random, cfg) -> list[Example]:
    with_tools = [e for e in pool if e.tools]
    out = []
    for example in rng.sample(with_tools, min(cfg.count, len(with_tools))):
        names = {t.name for t in example.tools}
        candidates = {t.name: t for e in rng.sample(with_tools, min(len(with_tools), 12)) if e is not example
                      for t in e.tools if t.name not in names}
        if not candidates:
            continue
        added = rng.sample(sorted(candidates), min(len(candidates), rng.randint(cfg.min_tools, cfg.max_tools)))
        tools = [t.model_copy(deep=True) for t in example.tools] + [candidates[n].model_copy(deep=True) for n in added]
        rng.shuffle(tools)
        out.append(_new([m.model_copy(deep=True) for m in example.messages], tools, "distractors", [example],
                        added_tools=added))
    return out


def _wrong_type(value: Any) -> Any:
    """A value of another JSON type than `value`, as small models write them (numbers as strings ...)."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return str(value)
    if isinstance(value, str):
        return [value]
    if isinstance(value, list):
        return ", ".join(map(str, value))
    if isinstance(value, dict):
        return json.dumps(value)
    return "null"


def break_call(part: _Single, kind: str, rng: random.Random, pool_names: list[str]) -> ToolCall | None:
    """The call of `part` broken by `kind` (``wrong_type``, ``missing_required``, ``unknown_argument``);
    None when the call offers nothing to break that way."""
    args = copy.deepcopy(part.call.arguments)
    properties = part.tool.function.parameters.get("properties") or {}
    if kind == "wrong_type":
        typed = [k for k in args if isinstance(properties.get(k), dict) and "type" in properties[k]]
        if not typed:
            return None
        key = rng.choice(typed)
        args[key] = _wrong_type(args[key])
    elif kind == "missing_required":
        required = part.tool.function.parameters.get("required") or []
        present = [k for k in required if k in args and not (isinstance(properties.get(k), dict)
                                                             and "default" in properties[k])]
        if not present:
            return None
        del args[rng.choice(present)]
    else:
        unknown = [n for n in pool_names if n not in properties and n not in args]
        if not unknown or not args:
            return None
        args[rng.choice(unknown)] = args[rng.choice(sorted(args))]
    return ToolCall.of(part.call.name, args, id="call_0")


def _self_correction(singles: list[_Single], rng: random.Random, cfg) -> list[Example]:
    validators = SchemaValidators()
    pool_names = sorted({k for p in singles for k in (p.tool.function.parameters.get("properties") or {})})
    out = []
    for part in rng.sample(singles, len(singles)):
        if len(out) >= cfg.count:
            break
        for kind in rng.sample(cfg.kinds, len(cfg.kinds)):
            broken = break_call(part, kind, rng, pool_names)
            if broken is None:
                continue
            error = call_error(broken, part.tool, validators)
            if error is None:  # the schema accepts the change (e.g. a loose "type"): not a broken call
                continue
            messages = _prefix([part]) + [
                part.user.model_copy(deep=True),
                Message(role="assistant", tool_calls=[broken], weight=0),
                Message(role="tool", tool_call_id="call_0", name=part.call.name, content=json.dumps({"error": error})),
                Message(role="assistant", tool_calls=[ToolCall.of(part.call.name, copy.deepcopy(part.call.arguments))]),
            ]
            out.append(_new(messages, [t.model_copy(deep=True) for t in part.example.tools], "self_correction",
                            [part], broken=kind, error=error))
            break
    return out


def call_error(call: ToolCall, tool: Tool, validators: SchemaValidators | None = None) -> str | None:
    """The error calltune's schema check reports for `call` against `tool`, or None if it passes.

    Unknown arguments count as errors (`CleanConfig.reject_unknown_arguments`), no repairs are made.
    """
    probe = Example(messages=[Message(role="user", content="-"), Message(role="assistant", tool_calls=[call])],
                    tools=[tool])
    reason = check_calls(probe, _CHECK, validators or SchemaValidators(), [])
    if reason is None:
        return None
    # "schema violation: messages[1].tool_calls[0] (f): ..." -> "schema violation: (f): ...": the probe's position means nothing
    return re.sub(r"messages\[\d+\]\.tool_calls\[\d+\] ", "", reason)


def _field_name(function: str) -> str:
    words = [w for w in re.split(r"[^A-Za-z0-9]+|(?<=[a-z])(?=[A-Z])", function.split(".")[-1]) if w]
    words = [w.lower() for w in words if not w.isdigit()]
    if len(words) > 1 and words[0] in ("get", "find", "search", "lookup", "fetch", "calculate", "compute", "list",
                                       "check", "create", "set", "update", "book", "make", "add"):
        words = words[1:]
    return "_".join(words) or "result"


def synthetic_result(call: ToolCall, rng: random.Random) -> dict[str, Any]:
    """A JSON object that could be `call`'s result (see the module docstring)."""
    result: dict[str, Any] = {}
    if call.arguments:
        key = sorted(call.arguments)[0]
        if isinstance(call.arguments[key], (str, int, float)) and not isinstance(call.arguments[key], bool):
            result[key] = call.arguments[key]
    value = round(rng.uniform(1, 500), rng.choice((0, 1, 2))) if rng.random() < 0.6 else rng.choice(_WORDS)
    result[_field_name(call.name)] = int(value) if isinstance(value, float) and value.is_integer() else value
    if rng.random() < 0.3:
        result["status"] = "ok"
    return result


_ANSWERS = ("{name} returned {facts}.", "Here is the result from {name}: {facts}.", "Done. {facts_cap}.",
            "According to {name}, {facts}.")


def answer_text(call: ToolCall, result: dict[str, Any], rng: random.Random) -> str:
    """A short answer stating every field of `result` (one of a few templates, seeded)."""
    facts = ", ".join(f"{k.replace('_', ' ')} is {v}" for k, v in result.items())
    return rng.choice(_ANSWERS).format(name=call.name, facts=facts, facts_cap=facts[:1].upper() + facts[1:])


def _answer_after_results(singles: list[_Single], rng: random.Random, cfg) -> list[Example]:
    out = []
    for part in rng.sample(singles, min(cfg.count, len(singles))):
        call = ToolCall.of(part.call.name, copy.deepcopy(part.call.arguments), id="call_0")
        result = synthetic_result(call, rng)
        messages = _prefix([part]) + [
            part.user.model_copy(deep=True), Message(role="assistant", tool_calls=[call]),
            Message(role="tool", tool_call_id="call_0", name=call.name, content=json.dumps(result)),
            Message(role="assistant", content=answer_text(call, result, rng)),
        ]
        out.append(_new(messages, [t.model_copy(deep=True) for t in part.example.tools], "answer_after_results",
                        [part], result=result))
    return out


# ---------------------------------------------------------------------------------------------
# Shaping the originals

def trim_tools(example: Example, max_tools: int, rng: random.Random) -> Example:
    """`example` with at most `max_tools` tools: every called one plus a seeded choice of the others,
    in their original order; the dropped names go to ``meta["trimmed_tools"]``. Returns a copy if trimmed."""
    if len(example.tools) <= max_tools:
        return example
    called = {c.name for m in example.messages for c in (m.tool_calls or [])}
    others = [i for i, t in enumerate(example.tools) if t.name not in called]
    room = max(0, max_tools - (len(example.tools) - len(others)))
    kept = set(range(len(example.tools))) - set(others) | set(rng.sample(others, min(room, len(others))))
    out = example.model_copy(deep=True)
    out.tools = [t for i, t in enumerate(out.tools) if i in kept]
    out.meta["trimmed_tools"] = [t.name for i, t in enumerate(example.tools) if i not in kept]
    return out


def mix_group(example: Example) -> str:
    """The group `AugmentConfig.mix` counts an example in: its BFCL category, else its call category."""
    bfcl = example.meta.get("bfcl")
    if isinstance(bfcl, dict) and bfcl.get("category"):
        return str(bfcl["category"])
    return call_category(example)


def augment(examples: list[Example], cfg: AugmentConfig | None = None, rejects: Rejects | None = None) -> AugmentResult:
    """Shape the originals and run every rule whose ``count`` is above 0 (module docstring).

    Args:
        examples: cleaned canonical examples (not modified).
        cfg: the rules' settings; default: no rule runs, no trimming, every original kept.
        rejects: new examples that fail the schema check are added here (``stage="augment"``).

    Returns:
        `AugmentResult`; its report::

            {"input": n, "originals": n, "trimmed_tool_lists": n, "mix": {group: {"available": n, "kept": n}},
             "rules": {rule: {"asked": n, "made": n, "rejected": n}}, "new": n, "output": n,
             "categories_after": {...}}

        ``made`` counts the new examples kept; ``asked - made - rejected`` is what the rule could not
        build from these examples (too few candidates); ``output == originals + new``.
    """
    cfg = cfg or AugmentConfig()
    rejects = rejects if rejects is not None else Rejects()
    rng = random.Random(cfg.seed)
    pool = [trim_tools(e, cfg.max_tools, rng) for e in examples] if cfg.max_tools else list(examples)
    trimmed = sum(a is not b for a, b in zip(pool, examples))

    groups: dict[str, list[int]] = defaultdict(list)
    for i, example in enumerate(pool):
        groups[mix_group(example)].append(i)
    keep: set[int] = set()
    mix_report = {}
    for group, ids in groups.items():
        limit = cfg.mix.get(group)
        chosen = ids if limit is None or limit >= len(ids) else rng.sample(ids, limit)
        keep.update(chosen)
        if limit is not None:
            mix_report[group] = {"available": len(ids), "kept": len(chosen)}
    originals = [e for i, e in enumerate(pool) if i in keep]

    singles = [s for s in map(_single, pool) if s is not None]
    makers = {
        "irrelevance": lambda c: _irrelevance(singles, pool, rng, c),
        "parallel": lambda c: _parallel(singles, rng, c),
        "parallel_multiple": lambda c: _parallel_multiple(singles, rng, c),
        "distractors": lambda c: _distractors(pool, rng, c),
        "self_correction": lambda c: _self_correction(singles, rng, c),
        "answer_after_results": lambda c: _answer_after_results(singles, rng, c),
    }
    validators = SchemaValidators()
    new: list[Example] = []
    rules_report = {}
    for rule in RULES:
        rule_cfg = getattr(cfg, rule)
        if rule_cfg.count == 0:
            continue
        made = rejected = 0
        for n, example in enumerate(makers[rule](rule_cfg)):
            example.row = n
            if cfg.max_tools:
                example = trim_tools(example, cfg.max_tools, rng)
            reason = check_calls(example, _CHECK, validators, [])
            if reason is not None:
                rejects.add(example.source, n, reason, json.loads(example.to_json()), stage=STAGE)
                rejected += 1
                continue
            new.append(example)
            made += 1
        rules_report[rule] = {"asked": rule_cfg.count, "made": made, "rejected": rejected}
    report = {"input": len(examples), "originals": len(originals), "trimmed_tool_lists": trimmed, "mix": mix_report,
              "rules": rules_report, "new": len(new), "output": len(originals) + len(new),
              "categories_after": count_categories(originals + new)}
    return AugmentResult(originals, new, report)
