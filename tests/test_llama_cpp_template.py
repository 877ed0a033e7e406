"""The saved chat templates under llama.cpp's own Jinja engine (``llama-server --jinja``), built from the
llama-cpp-python sdist (`llama_cpp_jinja`): for every format calltune ships, llama-server's capability
probe finds tools, tool calls, a system role and object arguments, and the template renders the shared
samples, a third of `test_chat_template`'s BFCL examples and its plain chats to the same text as
transformers' ``apply_chat_template`` (which `test_chat_template` holds to the format's own render), and
raises where it raises.

transformers gets the messages as an OpenAI client sends them (call arguments as JSON strings in whole
conversations, objects in prompts). llama.cpp gets them as llama-server passes them (``common/chat.cpp``):
call arguments parsed into objects (the template reads them as objects), ``content: ""`` where an
assistant turn with tool calls has none, and the variables ``messages``, ``tools`` only when there are
some, ``bos_token``, ``eos_token``, ``add_generation_prompt`` only when true.

What llama.cpp's engine can't write the same way, and so is left out where it occurs: a ``\\uXXXX``
escape of a non-ASCII or control character inside a tool result (the engine has no way to make a
character from its code; the escape's text is kept), and a float whose shortest repr needs 16
or 17 significant digits (the template's repr, in double arithmetic, may differ in the last digit).
"""

from __future__ import annotations

import json
import random
import re

import pytest
from jinja2.exceptions import TemplateError

from calltune.formats import get_format
from calltune.formats.jinja import TEMPLATES, chat_template_for
from llama_cpp_jinja import capabilities, render
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


def _as_llama_server_passes(chat: list[dict], caps: dict, objects: bool) -> list[dict]:
    """`chat` reshaped as llama-server reshapes it for a template with `caps` (``common/chat.cpp``): a
    system turn merged into the next where the probe found no system role, ``content: ""`` on assistant
    turns with calls but no content where it found tool calls, and (when `objects`) string call arguments
    parsed into objects where it found object arguments."""
    out = [dict(m) for m in chat]
    if not caps["supports_system_role"] and out and out[0]["role"] == "system":
        system = out.pop(0)
        if out:
            out[0]["content"] = system["content"] + "\n" + out[0]["content"]
    for m in out:
        if caps["supports_tool_calls"] and m.get("tool_calls") and m.get("content") is None:
            m["content"] = ""
        if objects and caps["supports_object_arguments"] and m.get("tool_calls"):
            m["tool_calls"] = [{**tc, "function": {**tc["function"], "arguments": json.loads(tc["function"]["arguments"])
                                                   if isinstance(tc["function"].get("arguments"), str)
                                                   else tc["function"].get("arguments")}} for tc in m["tool_calls"]]
    return out


def _engine_limits(ex, name: str, caps: dict) -> bool:
    """Whether `ex` holds what llama.cpp's engine writes differently (see the module docstring)."""
    calls = [tc.arguments for m in ex.messages for tc in (m.tool_calls or [])]
    results = [_json_or_none(m.content) for m in ex.messages if m.role == "tool"]
    escapes = [int(h, 16) for m in ex.messages if m.role == "tool" for h in re.findall(r"\\u([0-9a-fA-F]{4})", m.content or "")]
    if not caps["supports_object_arguments"]:  # string arguments reach the template, written with json.dumps
        escapes += [ord(c) for args in calls for c in json.dumps(args, ensure_ascii=False) if ord(c) > 127]
    if any(not (32 <= c < 127 or c in (8, 9, 10, 12, 13)) for c in escapes):
        return True
    floats = [v for value in calls + results for v in _leaves(value) if isinstance(v, float)]
    if any(_digits(v) >= 16 for v in floats):
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


def _llama_server_variables(tok, chat: list[dict], tools, prompt: bool) -> dict:
    variables = {"messages": chat, "bos_token": tok.bos_token or "", "eos_token": tok.eos_token or ""}
    if tools:
        variables["tools"] = tools
    if prompt:
        variables["add_generation_prompt"] = True
    return variables


@pytest.mark.parametrize("name, options, base", CASES, ids=CASE_IDS)
def test_llama_cpp_renders_the_template_as_transformers_does(name, options, base, base_tokenizers, sample_examples,
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
    wants, variables, where = [], [], []
    for ex in examples:
        tools = ex.tools_as_dicts()
        for prompt, messages in ((False, ex.messages), (True, context_of(ex.messages))):
            chat = _as_llama_server_passes(openai_messages(messages, string_arguments=not prompt), caps, objects=False)
            try:
                wants.append(tok.apply_chat_template(chat, tools=tools or None, chat_template=template,
                                                     add_generation_prompt=prompt, tokenize=False))
            except TemplateError as err:
                wants.append(err)
            variables.append(_llama_server_variables(tok, _as_llama_server_passes(chat, caps, objects=True), tools, prompt))
            where.append(f"{ex.where} ({'prompt' if prompt else 'render'})")
    got = render(template, variables)
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
    assert not problems, f"{len(problems)} of {len(wants)} renders differ:\n" + "\n".join(problems[:5])
    assert rendered  # formats refuse some conversations (e.g. xlam's multi-turn ones), none refuses all


def test_floats_and_python_strings_are_written_as_python_writes_them():
    """Under llama.cpp's engine, common.jinja writes a float as Python's repr (its own tojson keeps six
    digits), containers as json.dumps and str() write them; transformers' Jinja calls Python for both."""
    common = (TEMPLATES / "common.jinja").read_text(encoding="utf-8")
    rng = random.Random(0)
    floats = [1.0, 0.5, 25.0, 137481.25, 3.14159265, 1e-05, 1.5e-07, 0.0001, 1e16, 1.234e17, 1e22, 100000.0,
              1234567.0, 123456789012345.6, 9999999999999998.0, 0.1 + 0.2, 2 / 3, -2.5, -0.001, 0.0]
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
    assert render(common + "{{- calltune_str(v) -}}", [{"messages": [], "v": [1, "a'b", 'q"', "it's", None, 25.0]}]) == \
        [str([1, "a'b", 'q"', "it's", None, 25.0])]
