"""Prompt formats: how canonical examples become model text (with loss masks) and back.

Owns the format registry: `get_format(name)` and `FORMATS`. Each format renders for training and
parses for inference (see `calltune.formats.base.PromptFormat`).

Tool-calling formats: ``hermes`` (built-in ``<tool_call>`` convention, for templates that ignore
tools), ``chat_template`` (the model's own template with ``tools=``), ``xlam`` (the raw text of the
Phi-3 QLoRA recipe on xLAM-60k), ``function_call`` (the Llama-2 raw text of llama_functions),
``tool_uses`` (the Llama-3 LoRA project on glaive-v2). ``get_format("auto", tokenizer=tok)`` picks
chat_template or hermes for a tokenizer (`default_format_for`).
"""

from __future__ import annotations

import difflib

from calltune.formats.base import FORMAT_FILE, Parsed, PromptFormat, load_format, save_format
from calltune.formats.chat import FormatError
from calltune.formats.chat_template import ChatTemplateFormat, default_format_for, template_renders_tools
from calltune.formats.function_call import FunctionCallFormat
from calltune.formats.hermes import HermesFormat
from calltune.formats.tool_uses import ToolUsesFormat
from calltune.formats.viggo import ViggoFormat
from calltune.formats.xlam import XlamFormat

FORMATS: dict[str, type[PromptFormat]] = {
    f.name: f for f in (ViggoFormat, HermesFormat, ChatTemplateFormat, XlamFormat, FunctionCallFormat, ToolUsesFormat)
}


def get_format(name: str, **options) -> PromptFormat:
    """The format called `name`; an unknown name raises ValueError with "did you mean" and the choices.

    ``get_format("auto", tokenizer=tok)`` is `default_format_for(tok)`: chat_template if the tokenizer's
    template renders tools, else hermes.
    """
    if name == "auto":
        tokenizer = options.pop("tokenizer", None)
        if tokenizer is None or options:
            raise FormatError("get_format('auto') takes exactly one option, tokenizer=, to pick chat_template or hermes")
        return default_format_for(tokenizer)
    if name not in FORMATS:
        close = difflib.get_close_matches(name, FORMATS, n=1)
        hint = f" Did you mean {close[0]!r}?" if close else ""
        raise FormatError(f"unknown prompt format {name!r}.{hint} Choices: {', '.join(sorted(FORMATS))}")
    return FORMATS[name](**options)


__all__ = ["FORMATS", "FORMAT_FILE", "FormatError", "Parsed", "PromptFormat", "default_format_for", "get_format",
           "load_format", "save_format", "template_renders_tools"]
