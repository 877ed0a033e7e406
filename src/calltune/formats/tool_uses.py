"""The ``tool_uses`` layout of the Llama-3 LoRA project on glaive-v2 (michaelnny/Llama3-FunctionCalling),
through the model's chat template.

The project's three design points, as its repository implements them (``solution_design.md``,
``llama3/core/prompt.py``, ``llama3/core/tokenizer.py``):

- **function metadata in the system prompt**: an OpenAI-style ``# Tools / ## functions / namespace
  functions {...}`` section, placed before the example's own system text. The repository serialized
  each function as a TypeScript-like signature; here each function is its JSON spec
  ``{"name", "description", "parameters"}`` (one per line), which keeps nested schemas that the
  TypeScript form drops;
- **calls**: the assistant answers ``{"tool_uses": [{"recipient_name": "functions.NAME",
  "parameters": {...}}]}``, one entry per call (parallel calls in one list), JSON inside a
  ```` ```json ```` fence as the repository's tokenizer wrote it; text content, if any, comes before
  the fence, separated by a blank line. The project's README does not give the inner shape; this is the
  one the repository documents (it mirrors OpenAI's ``multi_tool_use.parallel``);
- **results**: a ``tool`` role turn holding a fenced JSON list of the results, one entry per call
  (consecutive ``tool`` messages are merged); a result is its JSON object/array when the text is one,
  else the text.

`parse`: a completion that never mentions ``tool_uses`` is a plain answer. Otherwise the JSON object around it
is read (fence optional, a missing closing fence is fine); it must be ``{"tool_uses": [...]}`` with a
non-empty list of ``{"recipient_name": str, "parameters": object}``, else the result is an error.
The ``functions.`` namespace is removed from names (a name without it is accepted as is). Text
outside the object is returned as ``content``.
"""

from __future__ import annotations

import json
from typing import Any

from calltune.formats.base import Parsed, PromptFormat
from calltune.formats.tool_json import CallError, call_from_object, dumps, result_value, snippet
from calltune.schema import Message, ToolCall

NAMESPACE = "functions."
FENCE_OPEN, FENCE_CLOSE = "```json\n", "\n```"

SYSTEM = """# Tools

## functions

namespace functions {{

{functions}

}} // namespace functions

## multi_tool_use

// To call functions, answer with one JSON object in a ```json block:
// {{"tool_uses": [{{"recipient_name": "functions.<name>", "parameters": {{<arguments>}}}}]}}
// with one entry per call; several entries run in parallel. The results come back in a tool message
// as a JSON list, one entry per call, in the same order."""


class ToolUsesFormat(PromptFormat):
    """Tools as JSON in an OpenAI-style system section; ``{"tool_uses": [...]}`` answers; ``tool`` result turns."""

    name = "tool_uses"

    def assistant_text(self, message: Message) -> str:
        parts = [message.content.strip()] if message.content and message.content.strip() else []
        if message.tool_calls:
            uses = [{"recipient_name": NAMESPACE + c.name, "parameters": c.arguments} for c in message.tool_calls]
            parts.append(FENCE_OPEN + dumps({"tool_uses": uses}) + FENCE_CLOSE)
        return "\n\n".join(parts)

    def to_chat(self, messages: list[Message], tools: list[dict[str, Any]]) -> tuple[list[dict], list[dict] | None]:
        has_system = bool(messages) and messages[0].role == "system"
        system = messages[0].content if has_system else None
        if tools:
            block = SYSTEM.format(functions="\n".join(dumps(t["function"]) for t in tools))
            system = f"{block}\n\n{system}" if system else block
        out: list[dict[str, Any]] = [{"role": "system", "content": system}] if system is not None else []
        results: list[Any] = []
        for m in messages[1:] if has_system else messages:
            if m.role == "tool":
                results.append(result_value(m.content))
                continue
            if results:
                out.append({"role": "tool", "content": FENCE_OPEN + dumps(results) + FENCE_CLOSE})
                results = []
            text = self.assistant_text(m) if m.role == "assistant" else m.content or ""
            out.append({"role": m.role, "content": text})
        if results:
            out.append({"role": "tool", "content": FENCE_OPEN + dumps(results) + FENCE_CLOSE})
        return out, None

    def parse(self, text: str) -> Parsed:
        key = text.find("tool_uses")  # unquoted too: a Python-literal attempt is an error, not plain text
        if key < 0:
            return Parsed(content=text.strip() or None)
        start = text.rfind("{", 0, key)
        try:
            if start < 0:
                raise CallError(f"'tool_uses' outside a JSON object: {snippet(text)}")
            try:
                obj, end = json.JSONDecoder().raw_decode(text, start)
            except json.JSONDecodeError as err:
                raise CallError(f"the tool_uses object is not JSON ({err.msg} at character {err.pos}): "
                                f"{snippet(text[start:])}") from None
            uses = obj.get("tool_uses") if isinstance(obj, dict) else None
            if not isinstance(uses, list) or not uses:
                raise CallError(f"'tool_uses' must be a non-empty list: {snippet(text[start:end])}")
            calls = []
            for k, use in enumerate(uses):
                call = call_from_object(use, f"tool_uses[{k}]", name_key="recipient_name",
                                        argument_keys=("parameters",))
                calls.append(ToolCall.of(call.name.removeprefix(NAMESPACE) or call.name, call.arguments))
        except CallError as err:
            return Parsed(content=text, error=str(err))
        before = text[:start].rstrip()
        before = before.removesuffix("```json").removesuffix("```")
        after = text[end:].lstrip().removeprefix("```")
        content = "\n\n".join(part.strip() for part in (before, after) if part.strip())
        return Parsed(tool_calls=calls, content=content or None)
