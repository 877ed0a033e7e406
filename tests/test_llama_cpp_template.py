"""The saved chat templates under llama.cpp's own Jinja engine (``llama-server --jinja``), built from the
llama-cpp-python sdist (`llama_cpp_jinja`): for every format calltune ships, the template renders the
shared samples, a third of `test_chat_template`'s BFCL examples and its plain chats to the same text as
transformers' ``apply_chat_template`` (which `test_chat_template` holds to the format's own render), and
raises where it raises.

The variables are those llama-server sets (``common/chat.cpp``): ``messages``, ``tools`` only when there
are some, ``bos_token``, ``eos_token``, ``add_generation_prompt`` only when true. Whole conversations carry
call arguments as JSON strings, prompts as objects (llama-server turns string arguments into objects for
templates that read them as objects).

Today llama.cpp's engine does not parse calltune's templates: ``common.jinja``'s JSON parser builds
mappings with ``dict(d, **{key: value})`` (transformers' sandbox forbids ``dict.update``), and llama.cpp's
parser has no ``**`` unpacking ("Unexpected token: *"). The test is a strict xfail until the templates
are rewritten in the subset both engines read; it then fails, and the marker goes.
"""

from __future__ import annotations

import pytest
from jinja2.exceptions import TemplateError

from calltune.formats import get_format
from calltune.formats.jinja import chat_template_for
from llama_cpp_jinja import render
from test_chat_template import CASE_IDS, CASES, PLAIN, bfcl_examples, context_of, openai_messages  # noqa: F401


@pytest.fixture(scope="module")
def base_tokenizers(tokenizer, qwen_tokenizer):
    return {"smollm2": tokenizer, "qwen": qwen_tokenizer}


def _llama_server_variables(tok, chat: list[dict], tools, prompt: bool) -> dict:
    variables = {"messages": chat, "bos_token": tok.bos_token or "", "eos_token": tok.eos_token or ""}
    if tools:
        variables["tools"] = tools
    if prompt:
        variables["add_generation_prompt"] = True
    return variables


@pytest.mark.xfail(strict=True, raises=RuntimeError,
                   reason="llama.cpp's Jinja engine has no ** unpacking, which common.jinja's JSON parser uses")
@pytest.mark.parametrize("name, options, base", CASES, ids=CASE_IDS)
def test_llama_cpp_renders_the_template_as_transformers_does(name, options, base, base_tokenizers, sample_examples,
                                                             bfcl_examples):  # noqa: F811
    fmt, tok = get_format(name, **options), base_tokenizers[base]
    template = chat_template_for(fmt, tok)
    examples = sample_examples + bfcl_examples[::3] + PLAIN
    wants, variables, where = [], [], []
    for ex in examples:
        tools = ex.tools_as_dicts()
        for prompt, messages in ((False, ex.messages), (True, context_of(ex.messages))):
            chat = openai_messages(messages, string_arguments=not prompt)
            try:
                wants.append(tok.apply_chat_template(chat, tools=tools or None, chat_template=template,
                                                     add_generation_prompt=prompt, tokenize=False))
            except TemplateError as err:
                wants.append(err)
            variables.append(_llama_server_variables(tok, chat, tools, prompt))
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
