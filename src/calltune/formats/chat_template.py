"""The model's own chat template with native tool support: ``tools=`` and structured ``tool_calls``.

For models whose template renders tools (Qwen2.5, Llama-3.1, Hermes-2-Pro, Mistral, ...): the
format passes the example's tools, assistant ``tool_calls`` (arguments as objects) and ``tool``
messages (with ``name`` and ``tool_call_id``) to ``apply_chat_template`` unchanged, so the model is
trained on exactly the text its template produces; the mask is found by `render_chat`.

Parsing can't know the template, so it reads the common conventions (extraction first, then the
call objects):
- ``<tool_call>{...}</tool_call>`` JSON blocks (Qwen2.5 / Hermes), leniently as in the hermes format;
- otherwise a bare JSON object or list of objects with ``name`` and ``arguments`` or ``parameters``
  (Llama-3.1 JSON tool calling; a leading ``<|python_tag|>`` or ``[TOOL_CALLS]`` is dropped);
- otherwise the text is a plain answer. JSON that has a ``name`` key but is not a well-formed call,
  and text that starts like a call object (``{"name"``) but is not JSON, are errors.

`template_renders_tools` tells whether a tokenizer's template uses ``tools=`` at all (SmolLM2's does
not), and `default_format_for` picks this format when it does, else the built-in hermes format.
"""

from __future__ import annotations

import json
import re
from typing import Any

from jinja2.exceptions import TemplateError
from transformers import PreTrainedTokenizerBase

from calltune.formats.base import Parsed, PromptFormat
from calltune.formats.chat import FormatError
from calltune.formats.hermes import HermesFormat, parse_tool_call_blocks
from calltune.formats.tool_json import CallError, call_from_object, tool_names
from calltune.schema import Example, Message

ARGUMENT_KEYS = ("arguments", "parameters")
_PREFIXES = ("<|python_tag|>", "[TOOL_CALLS]")
_CALL_START = re.compile(r'^\[?\s*\{\s*"name"\s*:')
_PROBE_NAME = "calltune_probe_function"
_PROBE_TOOL = {"type": "function", "function": {
    "name": _PROBE_NAME, "description": "Probe whether the chat template renders tools.",
    "parameters": {"type": "object", "properties": {"x": {"type": "string"}}, "required": ["x"]}}}
_renders_tools_cache: dict[str, bool] = {}


def template_renders_tools(tokenizer: PreTrainedTokenizerBase) -> bool:
    """Whether the tokenizer's chat template renders ``tools=``: a dummy conversation rendered with a
    tool must differ from the one without and contain the tool's name. A template that fails on
    ``tools=`` counts as not rendering them. Cached per template text."""
    template = tokenizer.chat_template
    if not isinstance(template, str):
        return False
    if template not in _renders_tools_cache:
        messages = [{"role": "user", "content": "Hi"}]
        try:
            plain = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
            with_tool = tokenizer.apply_chat_template(messages, tools=[_PROBE_TOOL], tokenize=False,
                                                      add_generation_prompt=True)
            _renders_tools_cache[template] = with_tool != plain and _PROBE_NAME in with_tool
        except (TemplateError, TypeError, ValueError):
            _renders_tools_cache[template] = False
    return _renders_tools_cache[template]


def default_format_for(tokenizer: PreTrainedTokenizerBase) -> PromptFormat:
    """`ChatTemplateFormat` if the tokenizer's template renders tools, else the built-in `HermesFormat`."""
    return ChatTemplateFormat() if template_renders_tools(tokenizer) else HermesFormat()


def _parse_bare_json(text: str) -> Parsed:
    """Llama-3.1 style: the whole completion is one call object or a list of them."""
    try:
        value, end = json.JSONDecoder().raw_decode(text)
    except json.JSONDecodeError as err:
        if _CALL_START.match(text):
            return Parsed(content=text, error=f"tool call is not JSON ({err.msg} at character {err.pos}): "
                                              f"{text[:80]!r}")
        return Parsed(content=text)
    items = value if isinstance(value, list) else [value]
    if not any(isinstance(item, dict) and "name" in item for item in items):
        return Parsed(content=text)  # JSON, but not a call (e.g. a JSON answer)
    rest = text[end:].strip()
    try:
        calls = [call_from_object(item, f"tool call {k}", argument_keys=ARGUMENT_KEYS) for k, item in enumerate(items)]
    except CallError as err:
        return Parsed(content=text, error=str(err))
    return Parsed(tool_calls=calls, content=rest or None)


class ChatTemplateFormat(PromptFormat):
    """Structured messages and ``tools=`` through the model's own template; parses the common call syntaxes."""

    name = "chat_template"

    def assistant_text(self, message: Message) -> str:
        raise FormatError("the chat_template format's assistant text is whatever the model's template renders; "
                          "use render() with a tokenizer")

    def to_chat(self, messages: list[Message], tools: list[dict[str, Any]]) -> tuple[list[dict], list[dict] | None]:
        names = tool_names(messages)
        out = []
        for i, m in enumerate(messages):
            d = m.to_dict()
            d["content"] = m.content or ""  # templates concatenate content; None would break them
            if m.role == "tool" and names.get(i) and "name" not in d:
                d["name"] = names[i]
            out.append(d)
        return out, tools or None

    def _check(self, example: Example, tokenizer: PreTrainedTokenizerBase) -> None:
        uses_tools = example.tools or any(m.tool_calls or m.role == "tool" for m in example.messages)
        if uses_tools and not template_renders_tools(tokenizer):
            raise FormatError(f"{example.where}: the tokenizer's chat template ignores tools=, so tools and calls "
                              "would vanish; use the 'hermes' format (or default_format_for(tokenizer))")

    def _render(self, example: Example, tokenizer: PreTrainedTokenizerBase, max_length: int | None = None,
                train_on: str = "all") -> tuple[list[int], list[int]]:
        self._check(example, tokenizer)
        try:
            return super()._render(example, tokenizer, max_length=max_length, train_on=train_on)
        except TemplateError as err:
            raise FormatError(f"{example.where}: the chat template refused the conversation: {err}") from None

    def _prompt(self, example: Example, tokenizer: PreTrainedTokenizerBase) -> list[int]:
        self._check(example, tokenizer)
        try:
            return super()._prompt(example, tokenizer)
        except TemplateError as err:
            raise FormatError(f"{example.where}: the chat template refused the conversation: {err}") from None

    def parse(self, text: str) -> Parsed:
        parsed = parse_tool_call_blocks(text, argument_keys=ARGUMENT_KEYS)
        if parsed is not None:
            return parsed
        stripped = text.strip()
        for prefix in _PREFIXES:
            stripped = stripped.removeprefix(prefix).lstrip()
        if stripped.startswith(("{", "[")):
            parsed = _parse_bare_json(stripped)
            if parsed.error:
                parsed.content = text
            return parsed
        return Parsed(content=stripped or None)
