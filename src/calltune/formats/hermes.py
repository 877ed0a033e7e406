"""The Hermes / ChatML tool format, built in: for models whose chat template ignores ``tools=``.

Renders through the model's chat template (SmolLM2's prints every role as ``<|im_start|>ROLE``),
with the tool-calling convention of NousResearch Hermes 2 Pro and Qwen2.5 written out by the format
itself:

- **tools**: the system turn gets an instruction and the tools as JSON, one per line, inside
  ``<tools>\\n...\\n</tools>`` (after the example's own system text, if any; no system turn is added
  when the example has no tools);
- **calls**: each call is a block ``<tool_call>\\n{"name": ..., "arguments": {...}}\\n</tool_call>``;
  parallel calls are several blocks joined by ``\\n``; text content (stripped), if any, comes before them;
- **tool results**: consecutive ``tool`` messages become ONE ``tool`` turn of blocks
  ``<tool_response>\\n{"name": ..., "content": ...}\\n</tool_response>`` joined by ``\\n`` (as in
  hermes-function-calling-v1); ``content`` is the result's JSON object/array when the text is one,
  else the text.

Parsing (`parse`) is lenient where it can't change the meaning: whitespace around blocks, a missing
final ``</tool_call>`` (generation stopped at end-of-turn), arguments given as a JSON string. A block
that is not a JSON call object, ``</tool_call>`` without ``<tool_call>``, or an unclosed block followed
by another is an error. Text outside the blocks is returned as ``content``.

Option ``compact`` (off by default) writes the tools as compact JSON of their function objects
(``{"name":...,"description":...,"parameters":...}``, no ``"type": "function"`` wrapper, no spaces)
after a shorter instruction, `COMPACT_INSTRUCTION`; calls, results and parsing are unchanged.

Dotted function names (BFCL's ``math.factorial``) are kept as they are by default: JSON strings hold
dots, and the model should call the name it was shown. Option ``dot_replacement`` (e.g. ``"_dot_"``)
renders every ``.`` in tool and call names as that string instead, for models or APIs that want
``[A-Za-z0-9_-]`` names, and `parse` turns it back into ``.``; a name that already contains the
replacement can't round-trip and raises `FormatError` at render time.
"""

from __future__ import annotations

import copy
import json
from typing import Any

from calltune.formats.base import Parsed, PromptFormat
from calltune.formats.chat import FormatError
from calltune.formats.tool_json import CallError, call_from_object, dumps, loads_call_json, result_value, tool_names
from calltune.schema import Message, ToolCall

OPEN, CLOSE = "<tool_call>", "</tool_call>"

INSTRUCTION = (
    "You are a function calling AI model. You may call one or more functions to assist with the user query. "
    "You are provided with function signatures within <tools></tools> XML tags:\n<tools>\n{tools}\n</tools>\n\n"
    "For each function call, return a JSON object with the function name and arguments within "
    "<tool_call></tool_call> XML tags:\n<tool_call>\n{{\"name\": <function-name>, \"arguments\": "
    "<args-json-object>}}\n</tool_call>"
)


# `compact=True`: a shorter instruction and tools as compact JSON of their function objects, for
# small models whose every prompt token costs training and prefill time.
COMPACT_INSTRUCTION = (
    "You can call these functions:\n<tools>\n{tools}\n</tools>\n"
    "To call one or more, answer with <tool_call>\n{{\"name\": <function-name>, \"arguments\": <args-json-object>}}"
    "\n</tool_call> blocks. If none of them fits the request, say so in plain text."
)


def parse_tool_call_blocks(text: str, argument_keys: tuple[str, ...] = ("arguments",),
                           restore_name=lambda name: name) -> Parsed | None:
    """Read ``<tool_call>`` blocks out of `text`; None when it has none (and no stray ``</tool_call>``)."""
    if OPEN not in text:
        if CLOSE in text:
            return Parsed(content=text, error=f"{CLOSE} without {OPEN}: {text.strip()[:80]!r}")
        return None
    outside: list[str] = []
    calls: list[ToolCall] = []
    pos = 0
    try:
        while True:
            start = text.find(OPEN, pos)
            if start < 0:
                outside.append(text[pos:])
                break
            outside.append(text[pos:start])
            body_start = start + len(OPEN)
            end, following = text.find(CLOSE, body_start), text.find(OPEN, body_start)
            if following >= 0 and (end < 0 or following < end):
                raise CallError(f"tool call {len(calls)}: {OPEN} is not closed before the next {OPEN}")
            if end < 0:  # generation stopped at end-of-turn before the final </tool_call>
                body, pos = text[body_start:], len(text)
            else:
                body, pos = text[body_start:end], end + len(CLOSE)
            what = f"tool call {len(calls)}"
            call = call_from_object(loads_call_json(body.strip(), what), what, argument_keys=argument_keys)
            calls.append(ToolCall.of(restore_name(call.name), call.arguments))
            if pos >= len(text):
                break
    except CallError as err:
        return Parsed(content=text, error=str(err))
    content = "\n".join(part.strip() for part in outside if part.strip())
    return Parsed(tool_calls=calls, content=content or None)


class HermesFormat(PromptFormat):
    """Tools in the system prompt, ``<tool_call>`` JSON blocks out, ``<tool_response>`` blocks in."""

    name = "hermes"

    def __init__(self, dot_replacement: str | None = None, compact: bool = False):
        if dot_replacement is not None and (not dot_replacement or "." in dot_replacement):
            raise FormatError(f"dot_replacement must be a non-empty string without '.', got {dot_replacement!r}")
        self.dot_replacement = dot_replacement
        self.compact = compact

    def options(self) -> dict[str, Any]:
        return {"dot_replacement": self.dot_replacement, "compact": self.compact}

    # -- names ---------------------------------------------------------------------------------
    def _render_name(self, name: str) -> str:
        if self.dot_replacement is None:
            return name
        if self.dot_replacement in name:
            raise FormatError(f"function name {name!r} already contains dot_replacement {self.dot_replacement!r}; "
                              "it could not be parsed back")
        return name.replace(".", self.dot_replacement)

    def _restore_name(self, name: str) -> str:
        return name if self.dot_replacement is None else name.replace(self.dot_replacement, ".")

    # -- rendering -----------------------------------------------------------------------------
    def call_json(self, call: ToolCall) -> str:
        return dumps({"name": self._render_name(call.name), "arguments": call.arguments})

    def assistant_text(self, message: Message) -> str:
        parts = [message.content.strip()] if message.content and message.content.strip() else []
        parts += [f"{OPEN}\n{self.call_json(c)}\n{CLOSE}" for c in message.tool_calls or []]
        return "\n".join(parts)

    def system_text(self, system: str | None, tools: list[dict[str, Any]]) -> str | None:
        """The system turn: the example's own text, then the tool instruction (None: no system turn)."""
        if not tools:
            return system
        tools = copy.deepcopy(tools)
        for tool in tools:
            tool["function"]["name"] = self._render_name(tool["function"]["name"])
        if self.compact:
            listed = "\n".join(json.dumps(t["function"], ensure_ascii=False, separators=(",", ":")) for t in tools)
            block = COMPACT_INSTRUCTION.format(tools=listed)
        else:
            block = INSTRUCTION.format(tools="\n".join(dumps(t) for t in tools))
        return f"{system}\n\n{block}" if system else block

    def tool_response(self, name: str | None, content: str | None) -> str:
        payload = {"name": self._render_name(name)} if name else {}
        payload["content"] = result_value(content)
        return f"<tool_response>\n{dumps(payload)}\n</tool_response>"

    def to_chat(self, messages: list[Message], tools: list[dict[str, Any]]) -> tuple[list[dict], list[dict] | None]:
        names = tool_names(messages)
        has_system = bool(messages) and messages[0].role == "system"
        system = self.system_text(messages[0].content if has_system else None, tools)
        out: list[dict[str, Any]] = [{"role": "system", "content": system}] if system is not None else []
        for i, m in enumerate(messages[1:] if has_system else messages, start=int(has_system)):
            if m.role == "assistant":
                out.append({"role": "assistant", "content": self.assistant_text(m)})
            elif m.role == "tool":
                block = self.tool_response(names.get(i), m.content)
                if out and out[-1]["role"] == "tool":
                    out[-1]["content"] += "\n" + block
                else:
                    out.append({"role": "tool", "content": block})
            else:
                out.append({"role": m.role, "content": m.content or ""})
        return out, None

    # -- parsing -------------------------------------------------------------------------------
    def parse(self, text: str) -> Parsed:
        parsed = parse_tool_call_blocks(text, restore_name=self._restore_name)
        if parsed is None:
            return Parsed(content=text.strip() or None)
        return parsed
