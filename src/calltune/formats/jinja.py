"""A prompt format as a Jinja chat template, so runtimes that only read the tokenizer's template
(``transformers.apply_chat_template`` and those built on it, such as vLLM) lay out prompts as
calltune trained them. The templates are written in the subset of Jinja that both transformers'
sandboxed Jinja2 and llama.cpp's own engine (``llama-server --jinja``) read; where the two engines
differ (llama.cpp's ``tojson`` writes floats with six digits), ``common.jinja`` tells them apart and
writes JSON itself under llama.cpp (tests/test_llama_cpp_template.py; docs/design.md says what still
differs there).

Owns `chat_template_for` (format + tokenizer -> template text), `write_chat_template` (what
`calltune.formats.save_format` calls to put that template into a saved tokenizer folder) and
`restore_base_template` (what `calltune.models.load_tokenizer` calls so calltune itself keeps
rendering through the format and the base template, never through both twice).

How a template is built (the pieces are the ``.jinja`` files in ``calltune/formats/templates/``):

1. a header comment starting with `MARKER`, then ``{% set calltune_... %}`` lines holding the
   format's options and constants (instruction texts, bos/eos text) written from the Python format,
   so the two can't drift;
2. ``common.jinja``: a JSON parser (Jinja has none; tool call arguments may arrive as JSON strings and
   tool results are re-serialised as the formats do), the tools normalised as calltune's schema
   writes them, and the function name each tool message answers;
3. the format's file. Chat formats (hermes, tool_uses, chat_template, viggo) turn the OpenAI-shaped
   ``messages``/``tools`` into the format's text chat (what `PromptFormat.to_chat` returns), rebind
   ``messages`` and ``tools`` to it and output nothing;
4. for those chat formats, the base tokenizer's own template, verbatim: it lays the text chat out
   exactly as `calltune.formats.chat.render_chat` has it do. Raw-text formats (xlam, function_call)
   write the whole text themselves and take no base template.

The result renders byte for byte what the format's `render` (whole conversation) and `prompt`
(``add_generation_prompt=True``) tokenize, for OpenAI-shaped messages: assistant ``tool_calls`` with
``function.arguments`` as an object or a JSON string, ``tool`` messages with ``tool_call_id``/``name``,
tools as ``{"type": "function", "function": {...}}`` (or bare function dicts). Where calltune's format
raises `FormatError`, the template raises a ``TemplateError`` (``raise_exception``).

What a template can't reproduce:
- special-token strings in the data (calltune.formats.literal): calltune tokenizes them as plain text,
  a template only writes text. ``apply_chat_template(..., sanitize_control_tokens=True)`` (transformers
  5) does the same marking and gives calltune's ids; without it the ids differ exactly there.
- xlam's training ids: calltune tokenizes its answer apart from its ``<calls>`` prompt
  (`calltune.formats.chat.render_segments` cuts), which one tokenization of the whole text can't
  reproduce where tokens merge across the cut (SmolLM2 merges ``></`` of the no-call answer
  ``<calls></calls>``); the text and the prompt ids are the same.

The saved folder's ``chat_template.jinja`` becomes the composed template; the base template is kept
in ``calltune_format.json`` under ``base_chat_template`` (`BASE_KEY`), and a chat format's template
also ends with it (`embedded_base`, for a folder without the format file, such as a GGUF's).
"""

from __future__ import annotations

import json
import logging
from functools import lru_cache
from pathlib import Path
from typing import TYPE_CHECKING, Any

from calltune.formats.chat import FormatError, bos_prefix, end_of_turn

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

    from calltune.formats.base import PromptFormat

TEMPLATES = Path(__file__).parent / "templates"
MARKER = "{#- calltune chat template"
BASE_KEY = "base_chat_template"
CHAT_TEMPLATE_FILE = "chat_template.jinja"  # transformers reads it before tokenizer_config.json's chat_template
# the last tag before the base template: keeps the base's leading whitespace (trim_blocks eats one newline after it)
BASE_FOLLOWS = "{%- set calltune_base_follows = true %}"
# formats whose chat the base template lays out, and raw-text formats that write everything themselves
COMPOSED = ("hermes", "tool_uses", "chat_template", "viggo")
STANDALONE = ("xlam", "function_call")

log = logging.getLogger(__name__)


@lru_cache(maxsize=None)
def _piece(name: str) -> str:
    return (TEMPLATES / f"{name}.jinja").read_text(encoding="utf-8").strip()


def _literal(value: Any) -> str:
    """`value` (str, bool or None) as a Jinja literal that evaluates back to it exactly.

    Jinja decodes string literals with ``unicode-escape`` after encoding non-ASCII characters as
    backslash escapes, so only the backslash, the quote and line breaks need escaping here.
    """
    if value is None:
        return "none"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        escaped = value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n").replace("\r", "\\r")
        return f'"{escaped}"'
    raise TypeError(f"no Jinja literal for {type(value).__name__}")


def _around(text: str, field: str) -> tuple[str, str]:
    """The parts of a ``str.format`` pattern before and after its one ``{field}``, braces unescaped."""
    head, _, tail = text.format(**{field: "\0"}).partition("\0")
    return head, tail


def _settings(fmt: PromptFormat, tokenizer: PreTrainedTokenizerBase) -> dict[str, Any]:
    """The ``calltune_*`` variables the format's template file reads."""
    from calltune.formats import chat_template, function_call, hermes, tool_uses

    if fmt.name == "hermes":
        instruction = hermes.COMPACT_INSTRUCTION if fmt.compact else hermes.INSTRUCTION
        head, tail = _around(instruction, "tools")
        return {"instruction_head": head, "instruction_tail": tail, "compact": fmt.compact,
                "dot_replacement": fmt.dot_replacement}
    if fmt.name == "tool_uses":
        head, tail = _around(tool_uses.SYSTEM, "functions")
        return {"system_head": head, "system_tail": tail}
    if fmt.name == "chat_template":
        return {"renders_tools": chat_template.template_renders_tools(tokenizer)}
    if fmt.name == "function_call":
        return {"bos": bos_prefix(tokenizer), "eos": end_of_turn(tokenizer), "instruction": function_call.INSTRUCTION}
    if fmt.name == "xlam":
        return {"bos": bos_prefix(tokenizer), "eos": end_of_turn(tokenizer)}
    return {}


def is_calltune_template(template: Any) -> bool:
    """Whether `template` is one `chat_template_for` wrote (it starts with `MARKER`)."""
    return isinstance(template, str) and template.startswith(MARKER)


def chat_template_for(fmt: PromptFormat, tokenizer: PreTrainedTokenizerBase) -> str:
    """The Jinja chat template that renders what `fmt` renders with `tokenizer` (see the module docstring).

    Chat formats append ``tokenizer.chat_template`` (the base template) to their transformation; raw-text
    formats take only the tokenizer's bos/eos text from it.

    Raises:
        FormatError: the format has no template (a format calltune doesn't ship); a chat format and a
            tokenizer without a chat template, with several named templates (a dict: transformers
            would pick one by ``tools=``), or whose template is already a calltune one.
    """
    if fmt.name not in COMPOSED + STANDALONE:
        raise FormatError(f"the {fmt.name!r} format has no chat template; templates exist for "
                          f"{', '.join(COMPOSED + STANDALONE)}")
    base = tokenizer.chat_template
    if fmt.name in COMPOSED:
        if base is None:
            raise FormatError(f"the {fmt.name!r} format is laid out by the tokenizer's chat template, and this "
                              "tokenizer has none")
        if not isinstance(base, str):
            raise FormatError(f"the tokenizer has several named chat templates ({', '.join(base)}); the {fmt.name!r} "
                              "format can be composed with one template only")
        if is_calltune_template(base):
            raise FormatError("the tokenizer's chat template is already a calltune template; compose with the base "
                              "template (see restore_base_template)")
    options = json.dumps({"name": fmt.name, "options": fmt.options()}, ensure_ascii=False)
    header = (f"{MARKER}: the prompt format {options.replace('#}', '# }')} as a chat template, written by "
              "calltune.formats.jinja; the base model's template (if any) follows the format's part and is also "
              f"kept in calltune_format.json as {BASE_KEY}. -#}}")
    settings = "".join(f"{{%- set calltune_{key} = {_literal(value)} -%}}\n"
                       for key, value in _settings(fmt, tokenizer).items())
    parts = [header, settings + _piece("common"), _piece(fmt.name)]
    if fmt.name in STANDALONE:
        return "\n".join(parts) + "\n"
    return "\n".join(parts) + "\n" + BASE_FOLLOWS + ("\n" if base.startswith("\n") else "") + base


def embedded_base(template: str) -> str | None:
    """The base template a composed template ends with (after `BASE_FOLLOWS`); None for a raw-text
    format's template, which holds none."""
    _, found, base = template.partition("\n" + BASE_FOLLOWS)
    if not found:
        return None
    return base[1:] if base.startswith("\n") else base


# -- saved folders ------------------------------------------------------------------------------------------

def _folder_template(directory: Path) -> tuple[Any, bool]:
    """``(template, has_tokenizer)`` of a saved tokenizer folder: ``chat_template.jinja`` first, then
    ``tokenizer_config.json``'s ``chat_template``, as transformers reads them; a dict when the folder holds
    named templates (``chat_templates/``) or the config a list of them."""
    config = directory / "tokenizer_config.json"
    if not config.is_file():
        return None, False
    named = sorted((directory / "chat_templates").glob("*.jinja")) if (directory / "chat_templates").is_dir() else []
    jinja = directory / CHAT_TEMPLATE_FILE
    template = jinja.read_text(encoding="utf-8") if jinja.is_file() else None
    if template is None:
        template = json.loads(config.read_text(encoding="utf-8")).get("chat_template")
        if isinstance(template, list):
            template = {t["name"]: t["template"] for t in template}
    if named:
        template = {"default": template, **{p.stem: p.read_text(encoding="utf-8") for p in named}}
    return template, True


def saved_base_template(directory: str | Path, template: str, format_data: dict[str, Any] | None = None) -> Any:
    """The base chat template of a saved folder whose template is calltune's `template`: the one
    ``calltune_format.json`` keeps (`format_data` if given), else the one a chat format's template ends
    with (a folder without the format file, e.g. a GGUF's template), else None (logged)."""
    from calltune.formats.base import FORMAT_FILE

    directory = Path(directory)
    if format_data is None:
        path = directory / FORMAT_FILE
        format_data = json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}
    if BASE_KEY in format_data:
        return format_data[BASE_KEY]
    base = embedded_base(template)
    if base is None:
        log.warning("%s: the chat template is a calltune raw-text format's and no %s keeps the base template; "
                    "the tokenizer gets no chat template", directory, FORMAT_FILE)
    return base


def folder_base_template(directory: str | Path, format_data: dict[str, Any]) -> tuple[bool, Any]:
    """``(has_tokenizer, base template)`` of a saved folder: its own chat template, or, when that is
    already a calltune template (a folder saved twice), the base `saved_base_template` finds with
    `format_data` (the folder's previous ``calltune_format.json``). ``(False, None)`` without a tokenizer."""
    template, has_tokenizer = _folder_template(Path(directory))
    if is_calltune_template(template):
        return has_tokenizer, saved_base_template(directory, template, format_data)
    return has_tokenizer, template


def write_chat_template(fmt: PromptFormat, directory: str | Path, base: Any) -> str | None:
    """Make `fmt`'s chat template, composed with `base` (`folder_base_template`), the template of the
    tokenizer saved in `directory`; returns the template written.

    It goes to ``chat_template.jinja`` and, if ``tokenizer_config.json`` carries a ``chat_template``
    too, there as well, so every reader sees the same one. A base the format can't be composed with
    (see `chat_template_for`) is logged and written back as it is: calltune still renders as before,
    and other runtimes see the base template.
    """
    from transformers import AutoTokenizer

    directory = Path(directory)
    try:
        if isinstance(base, dict):
            raise FormatError(f"the tokenizer has several named chat templates ({', '.join(base)}), and transformers "
                              "picks one of them by tools=; a format's template can replace one template only")
        tokenizer = AutoTokenizer.from_pretrained(directory)
        tokenizer.chat_template = base
        composed = chat_template_for(fmt, tokenizer)
    except FormatError as err:
        log.warning("%s: no chat template written for the %r format: %s", directory, fmt.name, err)
        composed = base if isinstance(base, str) else None
    jinja = directory / CHAT_TEMPLATE_FILE
    if composed is None:
        if jinja.is_file() and is_calltune_template(jinja.read_text(encoding="utf-8")):
            jinja.unlink()  # a stale calltune template of an earlier save
        return None
    jinja.write_text(composed, encoding="utf-8")
    config_path = directory / "tokenizer_config.json"
    config = json.loads(config_path.read_text(encoding="utf-8"))
    if isinstance(config.get("chat_template"), str):
        config["chat_template"] = composed
        config_path.write_text(json.dumps(config, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    return composed


def restore_base_template(tokenizer: PreTrainedTokenizerBase, directory: str | Path) -> PreTrainedTokenizerBase:
    """Give a tokenizer loaded from a calltune-saved folder its base chat template back (in place).

    calltune renders through the format and the base template; the composed template in the folder
    would apply the format a second time. A tokenizer whose template is not calltune's is left alone;
    where the base comes from: `saved_base_template`.
    """
    if is_calltune_template(tokenizer.chat_template):
        tokenizer.chat_template = saved_base_template(directory, tokenizer.chat_template)
    return tokenizer
