"""Supplied text stays text: a special-token string in an example's data never becomes a special token.

Message contents, tool results, tool-call names and arguments and tool specs come from clients and
datasets. The formats join them with the template's own control strings and tokenize the result in
one pass, so a user message holding ``<|im_end|>\\n<|im_start|>system\\n...`` would otherwise become
a real system turn. `literal_scope`, entered by `PromptFormat.render` and `PromptFormat.prompt` for
every format, prevents that in one place:

1. `protect` replaces each special-token string of the tokenizer (`chat.special_tokens`; leftmost,
   longest first) in every string of the example's messages and tools (deep, dict keys too) by a
   placeholder: a character of Unicode supplementary private use area B that occurs nowhere in the
   example's text, and neither does its JSON escape;
2. the format renders the protected example as usual; placeholders pass unchanged through chat
   templates and ``json.dumps(ensure_ascii=False)``;
3. `chat.encode`, through which all rendered text becomes ids, spells each placeholder as its
   special-token string in plain-text tokens (``split_special_tokens=True``) and tokenizes the rest
   normally, so the template's own control strings stay special tokens.

JSON escapes: ``json.dumps(..., ensure_ascii=True)`` (e.g. a template calling
``tojson(ensure_ascii=True)``) writes a placeholder as a surrogate-pair escape such as
``\\udbc0\\udc00``. `chat.encode` treats that escape as the placeholder too, so the text reads as the
ASCII special-token string did, in plain-text tokens. A tool result that is JSON is decoded by the
formats (`tool_json.result_value`), which would turn an escaped ``"\\u003c|im_end|>"`` back into a
special-token string: such a result is decoded here, protected, and re-encoded with `tool_json.dumps`.

An example whose data holds no special-token string is returned as it is and nothing is made
active, so its ids are exactly those of the plain tokenization. Not covered: text the format or
template writes itself (trusted), and added tokens the tokenizer does not mark special (such as
Qwen2.5's ``<tool_call>``), which remain single tokens wherever they appear.
"""

from __future__ import annotations

import json
import re
from contextlib import contextmanager
from functools import lru_cache
from typing import Any, Callable, Iterator

from transformers import PreTrainedTokenizerBase

from calltune.formats.chat import ACTIVE_LITERALS, FormatError, Literals, special_tokens
from calltune.formats.tool_json import dumps, result_value
from calltune.schema import Example

PRIVATE_USE_B = range(0x100000, 0x10FFFE)  # U+100000..U+10FFFD


@lru_cache(maxsize=32)
def _finder(specials: tuple[str, ...]) -> re.Pattern:
    return re.compile("|".join(map(re.escape, sorted(specials, key=lambda s: (-len(s), s)))))


def _strings(value: Any) -> Iterator[str]:
    """Every string in nested dicts (keys and values) and lists."""
    if isinstance(value, str):
        yield value
    elif isinstance(value, dict):
        for key, item in value.items():
            yield from _strings(key)
            yield from _strings(item)
    elif isinstance(value, (list, tuple)):
        for item in value:
            yield from _strings(item)


def _map(value: Any, f: Callable[[str], str]) -> Any:
    """`value` with `f` applied to every string in it (dict keys too)."""
    if isinstance(value, str):
        return f(value)
    if isinstance(value, dict):
        return {_map(key, f): _map(item, f) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [_map(item, f) for item in value]
    return value


def _decoded_result(message: dict[str, Any]) -> Any:
    """A tool message's JSON object/array as the formats decode it, if escapes may hide text in it; else None."""
    content = message.get("content")
    if message.get("role") != "tool" or not content or "\\" not in content:
        return None  # without a backslash, decoding can't create a string the raw text lacks
    value = result_value(content)
    return value if isinstance(value, (dict, list)) else None


def protect(example: Example, tokenizer: PreTrainedTokenizerBase) -> tuple[Example, Literals | None]:
    """``(example with placeholders, their Literals)``, or ``(example, None)`` (the same object) when
    no string of its messages and tools contains a special-token string of `tokenizer`.

    Raises:
        FormatError: no free placeholder is left (the example uses the whole private use area B).
    """
    specials = special_tokens(tokenizer)
    if not specials:
        return example, None
    finder = _finder(tuple(specials))
    data = example.model_dump()
    decoded = [_decoded_result(m) for m in data["messages"]]
    texts = list(_strings([data["messages"], data["tools"], decoded]))
    found = sorted({match.group() for text in texts for match in finder.finditer(text)})
    if not found:
        return example, None
    blob = "\0".join(texts)
    codes = iter(PRIVATE_USE_B)
    placeholder: dict[str, str] = {}
    table: dict[str, str] = {}
    for special in found:
        for code in codes:
            char = chr(code)
            escape = json.dumps(char)[1:-1]  # what ensure_ascii=True writes for it
            if char not in blob and escape not in blob:
                break
        else:
            raise FormatError(f"{example.where}: no private-use character is free to stand for {special!r}")
        placeholder[special] = char
        table[char] = table[escape] = special

    def sub(text: str) -> str:
        return finder.sub(lambda match: placeholder[match.group()], text)

    data["messages"] = _map(data["messages"], sub)
    data["tools"] = _map(data["tools"], sub)
    for message, value in zip(data["messages"], decoded):
        if value is not None and any(finder.search(text) for text in _strings(value)):
            message["content"] = dumps(_map(value, sub))
    pattern = re.compile("|".join(map(re.escape, sorted(table, key=len, reverse=True))))
    return type(example)(**data), Literals(table=table, pattern=pattern)


@contextmanager
def literal_scope(example: Example, tokenizer: PreTrainedTokenizerBase) -> Iterator[Example]:
    """Render inside this: yields the example to render (`protect`ed) and makes its placeholders
    active for `chat.encode` until the block ends. A `FormatError` raised inside gets its message's
    placeholders turned back into the special-token strings."""
    safe, literals = protect(example, tokenizer)
    if literals is None:
        yield example
        return
    token = ACTIVE_LITERALS.set(literals)
    try:
        yield safe
    except FormatError as err:
        message = literals.pattern.sub(lambda match: literals.table[match.group()], str(err))
        raise FormatError(message) from None
    finally:
        ACTIVE_LITERALS.reset(token)
