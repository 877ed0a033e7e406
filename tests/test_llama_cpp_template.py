"""The saved chat templates under llama-server (``--jinja``): llama.cpp's own chat code, built from the
llama-cpp-python sdist (`llama_cpp_jinja`).

- For every format calltune ships, llama-server builds the prompt transformers' ``apply_chat_template``
  builds (which `test_chat_template` holds to the format's own prompt) for the last turn of every shared
  sample, a third of `test_chat_template`'s BFCL examples and its plain chats, with the earlier turns'
  calls and results, sent as an OpenAI client sends them (arguments as JSON strings); it raises where
  transformers raises. For the formats that take whole tool conversations its capability probe must find
  tools, tool calls, a system role and object arguments, so it hands the template parsed arguments; where
  it finds no system role (xlam) it merges the system turn into the next, and transformers gets that too.
- For hermes and chat_template, llama-server parses the calls the format writes back into the same
  tool_calls.
- Under llama.cpp's engine the template writes floats and Python strings as Python does.

What llama.cpp's engine can't write the same way, and so is left out where it occurs: an integer beyond
2^53 in JSON the template parses (llama.cpp reads it through a double); a ``\\uXXXX``
escape of a non-ASCII or control character in JSON the template parses (tool results; string arguments
for xlam and viggo, whose probe fails so llama-server passes them as sent): the engine can't make a
character from its code and keeps the escape's text; a float whose shortest repr needs 16 or 17
significant digits (the template's repr, in double arithmetic, may differ in the last digit); for
chat_template, floats in the tools and calls the base model's own template writes with llama.cpp's
``tojson`` (six significant digits).
"""

from __future__ import annotations

import json
import random
import re

import pytest
from jinja2.exceptions import TemplateError

from calltune.formats import get_format
from calltune.formats.jinja import TEMPLATES, chat_template_for
from llama_cpp_jinja import capabilities, render, server_chat
from test_chat_template import CASE_IDS, CASES, PLAIN, bfcl_examples, context_of, openai_messages  # noqa: F401


# The formats whose templates take whole tool conversations (system, tools, calls, results, more turns):
# llama-server's probe must find each capability in them. xlam and viggo take one exchange by design
# (the probe's conversation raises), and chat_template over SmolLM2's base refuses tools (its base
# template ignores them).
TOOL_CONVERSATIONS = [(name, base) for name, _, base in CASES
                      if name not in ("xlam", "viggo") and (name, base) != ("chat_template", "smollm2")]


@pytest.fixture(scope="module")
def base_tokenizers(tokenizer, qwen_tokenizer):
    return {"smollm2": tokenizer, "qwen": qwen_tokenizer}


def _system_merged(chat: list[dict], caps: dict) -> list[dict]:
    """`chat` with its system turn merged into the next, as llama-server does for a template whose probe
    found no system role (``system_message_not_supported`` in ``common/chat.cpp``)."""
    if caps["supports_system_role"] or not chat or chat[0]["role"] != "system":
        return chat
    rest = [dict(m) for m in chat[1:]]
    if rest:
        rest[0]["content"] = chat[0]["content"] + "\n" + rest[0]["content"]
    return rest


def _engine_limits(ex, name: str, caps: dict) -> bool:
    """Whether `ex` holds what llama.cpp's engine writes differently (see the module docstring)."""
    calls = [tc.arguments for m in ex.messages for tc in (m.tool_calls or [])]
    results = [_json_or_none(m.content) for m in ex.messages if m.role == "tool"]
    escapes = [int(h, 16) for m in ex.messages if m.role == "tool"
               for h in re.findall(r"\\u([0-9a-fA-F]{4})", m.content or "")]
    if not caps["supports_object_arguments"]:  # string arguments reach the template, written with json.dumps
        escapes += [ord(c) for args in calls for c in json.dumps(args, ensure_ascii=False) if ord(c) > 127]
    if any(not (32 <= c < 127 or c in (8, 9, 10, 12, 13)) for c in escapes):
        return True
    leaves = [v for value in calls + results for v in _leaves(value)]
    if any(_digits(v) >= 16 for v in leaves if isinstance(v, float)):
        return True
    parsed = results + ([] if caps["supports_object_arguments"] else calls)  # JSON the template itself parses
    if any(isinstance(v, int) and abs(v) > 2 ** 53 for value in parsed for v in _leaves(value)):
        return True
    # the chat_template format's tools and calls are written by the base template, with llama.cpp's tojson
    written = calls + ex.tools_as_dicts()
    return name == "chat_template" and caps["supports_tools"] and any(
        format(v, ".6g") != repr(v) for value in written for v in _leaves(value) if isinstance(v, float))


def _digits(value: float) -> int:
    """The significant digits of `value`'s repr."""
    return len(repr(abs(value)).split("e")[0].replace(".", "").strip("0"))


def _json_or_none(text):
    try:
        return json.loads(text or "")
    except ValueError:
        return None


def _leaves(value):
    if isinstance(value, dict):
        for v in value.values():
            yield from _leaves(v)
    elif isinstance(value, list):
        for v in value:
            yield from _leaves(v)
    else:
        yield value


@pytest.mark.parametrize("name, options, base", CASES, ids=CASE_IDS)
def test_llama_server_builds_the_prompt_transformers_builds(name, options, base, base_tokenizers, sample_examples,
                                                             bfcl_examples):  # noqa: F811
    fmt, tok = get_format(name, **options), base_tokenizers[base]
    template = chat_template_for(fmt, tok)
    caps = capabilities(template)
    if (name, base) in TOOL_CONVERSATIONS:
        for cap in ("supports_tools", "supports_tool_calls", "supports_system_role", "supports_object_arguments"):
            assert caps[cap], f"llama-server's probe finds no {cap} in the {name} template: {caps}"
    examples = [ex for ex in sample_examples + bfcl_examples[::3] + PLAIN if not _engine_limits(ex, name, caps)]
    everything = sample_examples + bfcl_examples[::3] + PLAIN
    assert len(examples) > 0.9 * len(everything), f"{len(everything) - len(examples)} of {len(everything)} left out"
    wants, requests, where = [], [], []
    for ex in examples:
        # the prompt of the last turn, with the earlier turns' calls and results, as a client sends it
        chat, tools = openai_messages(context_of(ex.messages), string_arguments=True), ex.tools_as_dicts()
        try:
            wants.append(tok.apply_chat_template(_system_merged(chat, caps), tools=tools or None,
                                                 chat_template=template, add_generation_prompt=True, tokenize=False))
        except TemplateError as err:
            wants.append(err)
        requests.append({"messages": chat, "tools": tools, "add_generation_prompt": True})
        where.append(ex.where)
    got = [g if isinstance(g, RuntimeError) else g["prompt"]
           for g in server_chat(template, tok.bos_token or "", tok.eos_token or "", requests)]
    problems = []
    for want, have, what in zip(wants, got, where):
        if isinstance(want, TemplateError) != isinstance(have, RuntimeError):
            problems.append(f"{what}: transformers {'raised ' + str(want) if isinstance(want, Exception) else 'rendered'}, "
                            f"llama.cpp {'raised ' + str(have)[:300] if isinstance(have, Exception) else 'rendered'}")
        elif isinstance(want, str) and want != have:
            at = next((i for i, (a, b) in enumerate(zip(want, have)) if a != b), min(len(want), len(have)))
            problems.append(f"{what}: differ at character {at}: transformers {want[at - 40:at + 80]!r}, "
                            f"llama.cpp {have[at - 40:at + 80]!r}")
    rendered = sum(isinstance(w, str) for w in wants)
    assert not problems, f"{len(problems)} of {len(wants)} prompts differ:\n" + "\n".join(problems[:5])
    assert rendered  # formats refuse some conversations (e.g. xlam's multi-turn ones), none refuses all


# The formats whose calls llama-server parses back into tool_calls with the parser it derives from the
# template; for tool_uses and function_call it reports that the output does not match its format, for xlam
# it returns the calls as text (docs/design.md). With dot_replacement a dotted name comes back replaced
# (the samples have none).
PARSED = [case for case in CASES
          if case[0] in ("hermes", "chat_template") and (case[0], case[2]) != ("chat_template", "smollm2")]


@pytest.mark.parametrize("name, options, base", PARSED, ids=["-".join([n, *o, b]) for n, o, b in PARSED])
def test_llama_server_parses_the_calls_the_format_writes(name, options, base, base_tokenizers, sample_examples):
    """Each sample's last assistant turn of calls, as the format writes it, is what the model generates;
    llama-server's chat code parses it back into the example's calls (names and arguments) and no text."""
    fmt, tok = get_format(name, **options), base_tokenizers[base]
    template = chat_template_for(fmt, tok)
    requests, wants = [], []
    for ex in sample_examples:
        if ex.messages[-1].role != "assistant" or not ex.messages[-1].tool_calls or ex.messages[-1].content:
            continue
        chat, tools = openai_messages(ex.messages, string_arguments=True), ex.tools_as_dicts() or None
        full = tok.apply_chat_template(chat, tools=tools, chat_template=template, tokenize=False)
        prompt = tok.apply_chat_template(chat[:-1], tools=tools, chat_template=template, tokenize=False,
                                         add_generation_prompt=True)
        assert full.startswith(prompt), ex.where
        # generation stops at the end-of-turn token, which the server does not return
        output = full[len(prompt):].removesuffix("\n").removesuffix(tok.eos_token)
        requests.append({"messages": chat[:-1], "tools": tools or [], "output": output})
        wants.append([(tc.name, tc.arguments) for tc in ex.messages[-1].tool_calls])
    assert len(requests) > 40
    got = server_chat(template, tok.bos_token or "", tok.eos_token or "", requests)
    wrong = []
    for want, answer, request in zip(wants, got, requests):
        calls = None if isinstance(answer, RuntimeError) else [
            (c["function"]["name"], json.loads(c["function"]["arguments"])) for c in answer["message"].get("tool_calls", [])]
        if calls != want or (answer["message"].get("content") or "").strip():
            wrong.append(f"{request['output'][:120]!r}: {answer}")
    assert not wrong, f"{len(wrong)} of {len(requests)} outputs parsed differently:\n" + "\n".join(wrong[:3])


def test_floats_and_python_strings_are_written_as_python_writes_them():
    """Under llama.cpp's engine, common.jinja writes a float as Python's repr (its own tojson keeps six
    digits), containers as json.dumps and str() write them; transformers' Jinja calls Python for both."""
    common = (TEMPLATES / "common.jinja").read_text(encoding="utf-8")
    rng = random.Random(0)
    floats = [1.0, 0.5, 25.0, 137481.25, 3.14159265, 1e-05, 1.5e-07, 0.0001, 1e16, 1.234e17, 1e22, 100000.0,
              1234567.0, 123456789012345.6, 9999999999999998.0, 0.1 + 0.2, 2 / 3, -2.5, -0.001, 0.0, -0.0,
              1e-300, 2.5e-250, 1.5e300]  # subnormals (below 2.2e-308) are beyond the template's arithmetic
    floats += [round(rng.uniform(-1e4, 1e4), rng.randint(0, 8)) for _ in range(300)]
    floats += [rng.uniform(-1, 1) * 10 ** rng.randint(-30, 30) for _ in range(100)]
    # the repr of a float needing 16 or 17 digits may differ in the last one (module docstring)
    floats = [v for v in floats if _digits(v) < 16]
    got = render(common + "{{- calltune_float_repr(x) -}}", [{"messages": [], "x": v} for v in floats])
    wrong = [(v, g) for v, g in zip(floats, got) if g != json.dumps(v)]
    assert not wrong, f"{len(wrong)} of {len(floats)} floats written differently: {wrong[:5]}"

    values = [{"a": [1, 2.5, {"b": None, "c": True, "d": 'x"\n\u00e9'}], "e": 1.0, "f": [], "g": {}}, [0.1, "s"], 7e-07]
    got = render(common + "{{- calltune_tojson(v) -}}|{{- calltune_tojson(v, true) -}}|{{- calltune_str(v) -}}",
                 [{"messages": [], "v": v} for v in values])
    assert got == [f"{json.dumps(v, ensure_ascii=False)}|{json.dumps(v, ensure_ascii=False, separators=(',', ':'))}|{v}"
                   for v in values]
    mixed = [1, "a'b", 'q"', "it's", 'both \' and "', None, 25.0, True]
    assert render(common + "{{- calltune_str(v) -}}", [{"messages": [], "v": mixed}]) == [str(mixed)]
