"""ViGGO (Juraska et al., INLG 2019) as function calls: the dialogue act is the function name, each
``attr[value]`` an argument.

Owns the meaning-representation (MR) grammar: `parse_mr` (string -> `ToolCall`) and `render_mr`
(`ToolCall` -> the exact original string), the nine dialogue-act tool specs, and `load_viggo`, which
reads the local CSV layout (``mr,ref``, ../shared/data/viggo) or the hub layout of ``GEM/viggo``
(``meaning_representation``, ``target``) into canonical `Example`s.

MR grammar, as the corpus writes it: ``act(attr[value], attr[value], ...)``. Values of the list
attributes (`LIST_ATTRIBUTES`) are comma-separated (``genres[driving/racing, sport]``) and become JSON
lists; every other value is a string, and an empty value (``has_mac_release[]``) is kept as ``""``.
"""

from __future__ import annotations

import re
from pathlib import Path

from calltune.errors import CalltuneError
from calltune.schema import Example, FunctionSpec, Message, Tool, ToolCall
from calltune.sources.base import Rejects, SourceError, read_table

DIALOGUE_ACTS = ("inform", "request", "give_opinion", "confirm", "verify_attribute", "suggest",
                 "request_explanation", "recommend", "request_attribute")
ATTRIBUTES = ("name", "release_year", "exp_release_date", "developer", "esrb", "rating", "genres",
              "player_perspective", "platforms", "available_on_steam", "has_linux_release",
              "has_mac_release", "has_multiplayer", "specifier")
LIST_ATTRIBUTES = frozenset({"genres", "player_perspective", "platforms"})

_MR = re.compile(r"^(?P<act>[a-z_]+)\((?P<body>.*)\)$", re.S)
_ITEM = re.compile(r"(?P<attr>[a-z_]+)\[(?P<value>[^\[\]]*)\]")


class MRParseError(CalltuneError):
    """A string is not a ViGGO meaning representation; the message says where it stops parsing."""


def parse_mr(text: str) -> ToolCall:
    """Parse ``inform(name[X], genres[a, b])`` into ``ToolCall(name="inform", arguments={...})``.

    Raises:
        MRParseError: not of the form ``act(attr[value], ...)``, or a duplicate attribute.
    """
    match = _MR.match(text.strip())
    if not match:
        raise MRParseError(f"not of the form act(attr[value], ...): {text!r}")
    body, arguments, pos = match["body"], {}, 0
    while pos < len(body):
        item = _ITEM.match(body, pos)
        if not item:
            raise MRParseError(f"expected attr[value] at character {pos} of {body!r}")
        attr, value = item["attr"], item["value"]
        if attr in arguments:
            raise MRParseError(f"attribute {attr!r} given twice in {text!r}")
        arguments[attr] = value.split(", ") if (attr in LIST_ATTRIBUTES and value) else value
        pos = item.end()
        if pos < len(body):
            if not body.startswith(", ", pos):
                raise MRParseError(f"expected ', ' between attributes at character {pos} of {body!r}")
            pos += 2
            if pos == len(body):
                raise MRParseError(f"trailing ', ' at the end of {body!r}")
    return ToolCall.of(match["act"], arguments)


def render_mr(call: ToolCall) -> str:
    """The inverse of `parse_mr`: ``render_mr(parse_mr(s)) == s`` for every corpus MR."""
    items = []
    for attr, value in call.arguments.items():
        text = ", ".join(map(str, value)) if isinstance(value, list) else str(value)
        items.append(f"{attr}[{text}]")
    return f"{call.name}({', '.join(items)})"


def viggo_tools() -> list[Tool]:
    """One tool per dialogue act; every act may take any ViGGO attribute."""
    properties = {a: ({"type": "array", "items": {"type": "string"}} if a in LIST_ATTRIBUTES else {"type": "string"})
                  for a in ATTRIBUTES}
    return [Tool(function=FunctionSpec(name=act, description=f"ViGGO dialogue act '{act}'",
                                       parameters={"type": "object", "properties": properties}))
            for act in DIALOGUE_ACTS]


# Kept short on purpose: every token of it is paid for in every training step and every prompt.
VIGGO_INSTRUCTION = (
    "Convert the sentence into a function call act(attr[value], ...). "
    f"Acts: {', '.join(DIALOGUE_ACTS)}."
)


def load_viggo(path_or_id: str | Path, split: str = "train", rejects: Rejects | None = None,
               limit: int | None = None) -> list[Example]:
    """Read ViGGO into `Example`s: system instruction, user utterance, assistant tool call.

    Args:
        path_or_id: a CSV with columns ``mr,ref`` (the slug2slug layout), or ``GEM/viggo`` (or a
            local file in its layout) with ``meaning_representation,target``.
        split: hub split (``train``, ``validation``, ``test``).
        rejects: rows whose MR does not parse are added here (and counted), not raised.
        limit: keep only the first `limit` rows (for smoke tests).

    Raises:
        SourceError: file missing or empty, or neither column layout present.
    """
    where, rows = read_table(path_or_id, split=split)
    columns = set(rows[0])
    if {"mr", "ref"} <= columns:
        mr_key, ref_key = "mr", "ref"
    elif {"meaning_representation", "target"} <= columns:
        mr_key, ref_key = "meaning_representation", "target"
    else:
        field = "mr" if "ref" in columns else ("ref" if "mr" in columns else "mr")
        raise SourceError(where, None, field, f"ViGGO needs columns mr,ref (or meaning_representation,target); "
                                              f"found {sorted(columns)}")
    rejects = rejects if rejects is not None else Rejects()
    tools = viggo_tools()
    examples = []
    for i, row in enumerate(rows[:limit] if limit else rows):
        mr, ref = row.get(mr_key), row.get(ref_key)
        if not isinstance(ref, str) or not ref.strip():
            rejects.add(where, i, f"empty field {ref_key!r}", row)
            continue
        try:
            call = parse_mr(mr or "")
        except MRParseError as err:
            rejects.add(where, i, f"unparseable field {mr_key!r}: {err}", row)
            continue
        examples.append(Example(
            messages=[Message(role="system", content=VIGGO_INSTRUCTION), Message(role="user", content=ref),
                      Message(role="assistant", tool_calls=[call])],
            tools=tools, source=where, row=i, meta={"mr": mr}))
    return examples
