"""Tests of the tool-calling prompt formats (hermes, chat_template, xlam, function_call, tool_uses) on
every row of ../shared/data/samples loaded with the sources, with the real SmolLM2 tokenizer.

For each format: the trained tokens of each assistant turn, decoded as generation would return
them (eos dropped), parse back to that turn's canonical calls and content; the mask covers exactly
the assistant turns and their end-of-turn; malformed completions give `Parsed.error`; the format
survives `save_format`/`load_format`. SmolLM2's template ignores tools, so `chat_template` is tested
on a copy of the tokenizer with a Qwen2.5-style template (`QWEN_STYLE_TEMPLATE`).
"""

from __future__ import annotations

import json

import pytest

from calltune.formats import (FORMATS, FormatError, default_format_for, get_format, load_format, save_format,
                              template_renders_tools)
from calltune.formats.chat import bos_prefix, render_segments
from calltune.formats.chat_template import ChatTemplateFormat
from calltune.formats.hermes import HermesFormat
from calltune.schema import Example, Message, Tool, ToolCall

EOT = "<|im_end|>"
TOOL_FORMATS = ("hermes", "chat_template", "xlam", "function_call", "tool_uses")

# Rows the sources accept: xlam 35, glaive 26, hermes 25, llama_functions 28 (114 examples, 176
# assistant turns, 130 calls). xlam: only the 35 single-turn xLAM rows (all others have a system turn
# or several turns). function_call: all but the 14 xLAM rows and 5 Hermes rows with parallel calls.
REPRESENTABLE = {"hermes": 114, "chat_template": 114, "xlam": 35, "function_call": 95, "tool_uses": 114}
TURNS_AND_CALLS = {"hermes": (176, 130), "chat_template": (176, 130), "xlam": (35, 52), "function_call": (156, 86),
                   "tool_uses": (176, 130)}

# A Qwen2.5-style template (tools in the system turn, <tool_call> blocks, tool results in a user
# turn), written here because no model with a tool-rendering template is available offline.
QWEN_STYLE_TEMPLATE = """
{%- if tools %}
    {{- '<|im_start|>system\\n' }}
    {%- if messages[0]['role'] == 'system' %}{{- messages[0]['content'] }}{%- else %}{{- 'You are a helpful assistant.' }}{%- endif %}
    {{- "\\n\\n# Tools\\n\\nYou may call one or more functions to assist with the user query.\\n\\n" }}
    {{- "You are provided with function signatures within <tools></tools> XML tags:\\n<tools>" }}
    {%- for tool in tools %}{{- "\\n" }}{{- tool | tojson }}{%- endfor %}
    {{- "\\n</tools>\\n\\nFor each function call, return a json object with function name and arguments within " }}
    {{- "<tool_call></tool_call> XML tags:\\n<tool_call>\\n{\\"name\\": <function-name>, \\"arguments\\": <args-json-object>}\\n</tool_call><|im_end|>\\n" }}
{%- elif messages[0]['role'] == 'system' %}
    {{- '<|im_start|>system\\n' + messages[0]['content'] + '<|im_end|>\\n' }}
{%- else %}
    {{- '<|im_start|>system\\nYou are a helpful assistant.<|im_end|>\\n' }}
{%- endif %}
{%- for message in messages %}
    {%- if message.role == "user" or (message.role == "system" and not loop.first) or (message.role == "assistant" and not message.tool_calls) %}
        {{- '<|im_start|>' + message.role + '\\n' + message.content + '<|im_end|>\\n' }}
    {%- elif message.role == "assistant" %}
        {{- '<|im_start|>assistant' }}
        {%- if message.content %}{{- '\\n' + message.content }}{%- endif %}
        {%- for tool_call in message.tool_calls %}
            {%- if tool_call.function is defined %}{%- set tool_call = tool_call.function %}{%- endif %}
            {{- '\\n<tool_call>\\n{"name": "' }}{{- tool_call.name }}{{- '", "arguments": ' }}
            {{- tool_call.arguments | tojson }}{{- '}\\n</tool_call>' }}
        {%- endfor %}
        {{- '<|im_end|>\\n' }}
    {%- elif message.role == "tool" %}
        {%- if loop.index0 == 0 or messages[loop.index0 - 1].role != "tool" %}{{- '<|im_start|>user' }}{%- endif %}
        {{- '\\n<tool_response>\\n' }}{{- message.content }}{{- '\\n</tool_response>' }}
        {%- if loop.last or messages[loop.index0 + 1].role != "tool" %}{{- '<|im_end|>\\n' }}{%- endif %}
    {%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}
"""


@pytest.fixture(scope="module")
def examples(sample_examples) -> list[Example]:
    assert len(sample_examples) == 114
    return sample_examples


def trained_runs(tokenizer, ids, mask) -> list[str]:
    """The decoded runs of consecutive trained tokens."""
    runs, current = [], []
    for token, m in zip(ids, mask):
        if m:
            current.append(token)
        elif current:
            runs.append(current)
            current = []
    if current:
        runs.append(current)
    return [tokenizer.decode(run) for run in runs]


def canonical(message: Message):
    return [(c.name, c.arguments) for c in message.tool_calls or []], (message.content or "").strip()


def got(parsed):
    return [(c.name, c.arguments) for c in parsed.tool_calls], parsed.content or ""


def qwen_turn(message: Message) -> str:
    """What QWEN_STYLE_TEMPLATE writes for an assistant turn after the generation prompt (by hand)."""
    parts = [message.content] if message.content else []
    parts += ['<tool_call>\n{"name": "' + c.name + '", "arguments": ' + json.dumps(c.arguments, ensure_ascii=False)
              + "}\n</tool_call>" for c in message.tool_calls or []]
    return "\n".join(parts)


def expected_turn(name: str, fmt, message: Message) -> str:
    return qwen_turn(message) if name == "chat_template" else fmt.assistant_text(message)


def rendered(name, examples, tok):
    """``[(example, ids, mask)]`` of the examples the format can render, and how many it refused."""
    fmt, out, refused = get_format(name), [], 0
    for ex in examples:
        try:
            ids, mask = fmt.render(ex, tok)
        except FormatError as err:
            assert ex.where in str(err)  # the refusal names the example
            refused += 1
            continue
        out.append((ex, ids, mask))
    return fmt, out, refused


# --------------------------------------------------------------------------- (a) render -> parse

@pytest.mark.parametrize("name", TOOL_FORMATS)
def test_every_trained_turn_parses_back_to_the_canonical_turn(name, examples, tokenizer, tokenizer_for):
    tok = tokenizer_for(name)
    fmt, done, refused = rendered(name, examples, tok)
    assert (len(done), refused) == (REPRESENTABLE[name], 114 - REPRESENTABLE[name])
    n_turns = n_calls = 0
    for ex, ids, mask in done:
        answers = [m for m in ex.messages if m.role == "assistant"]
        runs = trained_runs(tok, ids, mask)
        assert len(runs) == len(answers), ex.where
        for run, message in zip(runs, answers):
            assert run.endswith(EOT), (ex.where, run)
            completion = run[:-len(EOT)]  # what generation returns: eos dropped
            parsed = fmt.parse(completion)
            assert parsed.error is None, (ex.where, completion, parsed.error)
            assert got(parsed) == canonical(message), (ex.where, completion)
            if name == "xlam":  # the prompt ends with <calls>, so a generated completion lacks it
                assert got(fmt.parse(completion.removeprefix("<calls>"))) == canonical(message)
            n_turns += 1
            n_calls += len(message.tool_calls or [])
    assert (n_turns, n_calls) == TURNS_AND_CALLS[name]


# --------------------------------------------------------------------------- (b) the mask

@pytest.mark.parametrize("name", TOOL_FORMATS)
def test_mask_is_exactly_the_assistant_turns_and_end_of_turn(name, examples, tokenizer, tokenizer_for):
    tok = tokenizer_for(name)
    fmt, done, _ = rendered(name, examples, tok)
    for ex, ids, mask in done:
        assert len(ids) == len(mask)
        trained = tok.decode([t for t, m in zip(ids, mask) if m])
        expected = "".join(expected_turn(name, fmt, m) + EOT for m in ex.messages if m.role == "assistant")
        assert trained == expected, ex.where
        # nothing of the prompt side (tools, user text, tool results) is trained
        untrained = tok.decode([t for t, m in zip(ids, mask) if not m])
        assert ex.messages[0].content[:40] in untrained or ex.messages[1].content[:40] in untrained


@pytest.mark.parametrize("name", TOOL_FORMATS)
def test_prompt_is_the_context_before_the_final_answer(name, examples, tokenizer, tokenizer_for):
    tok = tokenizer_for(name)
    fmt, done, _ = rendered(name, examples, tok)
    checked = 0
    for ex, ids, mask in done:
        final = ex.messages[-1]
        if final.role != "assistant":
            continue
        prompt = fmt.prompt(ex, tok)
        assert ids[:len(prompt)] == prompt, ex.where
        answer = expected_turn(name, fmt, final) + EOT
        if name == "xlam":
            answer = answer.removeprefix("<calls>")
            assert tok.decode(prompt).endswith("</tools>\n\n<calls>")
        assert tok.decode(ids[len(prompt):]).startswith(answer), ex.where
        checked += 1
    assert checked == {"xlam": 35, "function_call": 92}.get(name, 111)  # examples ending on an answer


def test_tool_results_are_rendered_and_never_trained(examples, tokenizer):
    ex = next(e for e in examples if e.where.endswith("hermes-function-calling-v1.json, row 9"))
    assert [m.role for m in ex.messages].count("tool") == 2
    for name, needle in (("hermes", '<|im_start|>tool\n<tool_response>\n{"name": "get_current_weather", '
                                    '"content": {"city": "Paris"'),
                         ("tool_uses", '<|im_start|>tool\n```json\n[{"city": "Paris"'),
                         ("function_call", None)):
        fmt = get_format(name)
        if needle is None:  # parallel calls: this layout has one call per answer
            with pytest.raises(FormatError, match="hermes-function-calling-v1.json, row 9: turn 2 .* 2 parallel calls"):
                fmt.render(ex, tokenizer)
            continue
        ids, mask = fmt.render(ex, tokenizer)
        text = tokenizer.decode(ids)
        assert needle in text and text.count("<|im_start|>tool\n") == 1  # both results in one tool turn
        assert "Paris" in tokenizer.decode([t for t, m in zip(ids, mask) if m])  # from the calls and answer...
        assert "temperature" not in tokenizer.decode([t for t, m in zip(ids, mask) if m])  # ...not the results


def test_function_call_multi_turn_layout_and_train_on_last(examples, tokenizer):
    fmt = get_format("function_call")
    ex = next(e for e in examples if e.source.endswith("glaive-function-calling-v2.json") and e.row == 1)
    ids, mask = fmt.render(ex, tokenizer)
    text = tokenizer.decode(ids)
    assert text.startswith("[INST] <<SYS>>\n<<API>>\nYou are a helpful assistant with access")
    assert '[/INST] {"function_call":{"name":"get_news_headlines","arguments":{"country":"United States"}}} ' \
           '<|im_end|>[INST] {"function_response":{"name":"get_news_headlines","content":{"headlines":' in text
    ids, mask = fmt.render(ex, tokenizer, train_on="last")
    trained = tokenizer.decode([t for t, m in zip(ids, mask) if m])
    assert trained == fmt.assistant_text(ex.messages[-1]) + EOT and "France" in trained


def test_xlam_layout_and_no_call_row(examples, tokenizer):
    fmt = get_format("xlam")
    ex = next(e for e in examples if e.meta.get("no_call"))
    ids, mask = fmt.render(ex, tokenizer)
    text = tokenizer.decode(ids)
    assert text.startswith(f"<user>{ex.messages[0].content}</user>\n\n<tools>{{\"name\": ")
    assert text.endswith("</tools>\n\n<calls></calls><|im_end|>")
    assert tokenizer.decode([t for t, m in zip(ids, mask) if m]) == "<calls></calls><|im_end|>"
    parsed = fmt.parse("</calls>")
    assert parsed.tool_calls == [] and parsed.error is None
    multi = next(e for e in examples if e.source.endswith("glaive-function-calling-v2.json") and e.row == 1)
    with pytest.raises(FormatError, match=r"glaive-function-calling-v2.json, row 1: the xlam format takes one user "
                                          r"turn and one assistant turn; this example has turns system, user, "):
        fmt.render(multi, tokenizer)


def test_render_segments_masks_trained_segments_only(tokenizer):
    ids, mask = render_segments(tokenizer, [("<user>hi</user>\n\n", False), ("<calls>[]</calls>", True), (EOT, True),
                                            ("tail", False)])
    assert tokenizer.decode(ids) == "<user>hi</user>\n\n<calls>[]</calls><|im_end|>tail"
    assert tokenizer.decode([t for t, m in zip(ids, mask) if m]) == "<calls>[]</calls><|im_end|>"
    assert ids[-2] == tokenizer.eos_token_id and mask[-2] == 1 and mask[-1] == 0
    short_ids, short_mask = render_segments(tokenizer, [("abc def", False), ("ghi", True)], max_length=2)
    assert len(short_ids) == len(short_mask) == 2 and short_mask == [0, 0]
    assert bos_prefix(tokenizer) == ""  # SmolLM2 adds no bos by default
    # SmolLM2 merges "></" across the prompt/answer boundary; a cut keeps the prompt's ids a prefix
    segments = [("<calls>", True), ("</calls>", True)]
    prompt = tokenizer("<calls>", add_special_tokens=False)["input_ids"]
    assert render_segments(tokenizer, segments)[0][:len(prompt)] != prompt
    cut_ids, cut_mask = render_segments(tokenizer, segments, cuts=[1])
    assert cut_ids[:len(prompt)] == prompt and tokenizer.decode(cut_ids) == "<calls></calls>" and all(cut_mask)


# --------------------------------------------------------------------------- (c) malformed completions

MALFORMED = {
    "hermes": [
        '<tool_call>\n{"name": "f", "arguments": {"a": 1}\n</tool_call>',           # missing brace
        "<tool_call>\nget_weather(city='Paris')\n</tool_call>",                     # not JSON
        "<tool_call>\n{'name': 'f', 'arguments': {}}\n</tool_call>",                # Python literal
        '<tool_call>\n{"name": "f", "arguments": [1]}\n</tool_call>',               # arguments not an object
        '<tool_call>\n{"arguments": {}}\n</tool_call>',                             # no name
        '<tool_call>\n{"name": "f", "arguments": {}}\n<tool_call>\n{"name": "g", "arguments": {}}\n</tool_call>',
        '{"name": "f", "arguments": {}}\n</tool_call>',                             # close without open
        '<tool_call>\n{"name": "f", "arguments": {"a": 1}}\n</tool_call>\n<tool_call>\n{"name": "g", "argu',
    ],
    "chat_template": [
        '<tool_call>\n{"name": "f", "arguments": {"a": 1}\n</tool_call>',
        '{"name": "f", "parameters": {"a": 1}',                                     # truncated bare JSON
        '[{"name": "f", "parameters": 3}]',
        '{"name": "f"}',                                                            # no arguments
        '<|python_tag|>{"name": "f", "parameters": {"a": }}',
    ],
    "xlam": [
        '{"name": "f", "arguments": {"a": 1}</calls>',
        "{'name': 'f', 'arguments': {'a': 1}}</calls>",                             # the seed's str() form
        "I cannot help with that.",
        '{"name": "f"}</calls>',
        '{"name": "f", "arguments": {}}\n[1, 2]</calls>',
    ],
    "function_call": [
        '{"function_call":{"name":"f","arguments":{"a":1}}',
        '{"function_call":{"name":"f"}}',
        '{"name":"f","arguments":{}}',
        'Sure! {"function_call":{"name":"f","arguments":{}}}',
        '{"function_call":{"name":"f","arguments":{}}} and then some',
        '{"function_call":{"name":"","arguments":{}}}',
    ],
    "tool_uses": [
        '```json\n{"tool_uses": [{"recipient_name": "functions.f", "parameters": {"a": 1}}\n```',
        '{"tool_uses": []}',
        '{"tool_uses": [{"recipient_name": "functions.f"}]}',
        '{"tool_uses": {"recipient_name": "functions.f", "parameters": {}}}',
        "{'tool_uses': [{'recipient_name': 'functions.f', 'parameters': {}}]}",
        'tool_uses: f(a=1)',
    ],
}


@pytest.mark.parametrize("name", TOOL_FORMATS)
def test_malformed_calls_give_an_error_not_an_exception(name):
    fmt = get_format(name)
    for text in MALFORMED[name]:
        parsed = fmt.parse(text)
        assert parsed.error, (name, text)
        assert parsed.tool_calls == [] and parsed.content == text


WELL_FORMED = {
    "hermes": [
        ('  <tool_call>{"name": "f", "arguments": {"a": 1}}</tool_call>  ', [("f", {"a": 1})], ""),
        ('<tool_call>\n{"name": "f", "arguments": {"a": 1}}', [("f", {"a": 1})], ""),  # stopped before </tool_call>
        ('<tool_call>\n{"name": "f", "arguments": "{\\"a\\": 1}"}\n</tool_call>', [("f", {"a": 1})], ""),
        ('Let me check.\n<tool_call>\n{"name": "math.factorial", "arguments": {"n": 5}}\n</tool_call>',
         [("math.factorial", {"n": 5})], "Let me check."),
        ("It is sunny.", [], "It is sunny."),
    ],
    "chat_template": [
        ('{"name": "f", "parameters": {"a": 1}}', [("f", {"a": 1})], ""),
        ('<|python_tag|>{"name": "f", "parameters": {}}', [("f", {})], ""),
        ('[{"name": "f", "arguments": {}}, {"name": "g", "parameters": {"x": 1}}]', [("f", {}), ("g", {"x": 1})], ""),
        ('<tool_call>\n{"name": "f", "arguments": {"a": 1}}\n</tool_call>\n<tool_call>\n{"name": "g", "arguments": {}}',
         [("f", {"a": 1}), ("g", {})], ""),
        ('{"answer": 42}', [], '{"answer": 42}'),
        ("The weather is nice.", [], "The weather is nice."),
    ],
    "xlam": [
        ('{"name": "f", "arguments": {}}\n{"name": "g", "arguments": {"x": [1, 2]}}</calls>\n\n<benchmarks>{\'x',
         [("f", {}), ("g", {"x": [1, 2]})], ""),
        ('<calls>{"name": "f", "arguments": {"s": "ä"}}</calls>', [("f", {"s": "ä"})], ""),
    ],
    "function_call": [
        (' {"function_call":{"name":"f","arguments":{"a":1}}} ', [("f", {"a": 1})], ""),
        (" Hello there ", [], "Hello there"),
    ],
    "tool_uses": [
        ('{"tool_uses": [{"recipient_name": "f", "parameters": {}}]}', [("f", {})], ""),
        ('```json\n{"tool_uses": [{"recipient_name": "functions.math.factorial", "parameters": {"n": 5}}]}',
         [("math.factorial", {"n": 5})], ""),
        ('I will look.\n\n```json\n{"tool_uses": [{"recipient_name": "functions.f", "parameters": {}}]}\n```',
         [("f", {})], "I will look."),
    ],
}


@pytest.mark.parametrize("name", TOOL_FORMATS)
def test_lenient_parsing_of_well_formed_variants(name):
    fmt = get_format(name)
    for text, calls, content in WELL_FORMED[name]:
        parsed = fmt.parse(text)
        assert parsed.error is None, (name, text, parsed.error)
        assert got(parsed) == (calls, content), (name, text)


# --------------------------------------------------------------------------- dotted names

def _dotted_example() -> Example:
    tool = Tool(function={"name": "math.factorial", "description": "n!",
                          "parameters": {"type": "object", "properties": {"n": {"type": "integer"}}}})
    return Example(messages=[Message(role="user", content="5!?"),
                             Message(role="assistant", tool_calls=[ToolCall.of("math.factorial", {"n": 5})])],
                   tools=[tool], source="mem.jsonl", row=3)


def test_hermes_keeps_dotted_names_by_default_and_can_replace_them(tokenizer):
    ex = _dotted_example()
    plain = get_format("hermes")
    text = tokenizer.decode(plain.render(ex, tokenizer)[0])
    assert '"name": "math.factorial"' in text and "math_dot_factorial" not in text
    replaced = get_format("hermes", dot_replacement="_dot_")
    ids, mask = replaced.render(ex, tokenizer)
    trained = tokenizer.decode([t for t, m in zip(ids, mask) if m])
    assert "math.factorial" not in tokenizer.decode(ids) and '"name": "math_dot_factorial"' in trained
    assert got(replaced.parse(trained.removesuffix(EOT))) == ([("math.factorial", {"n": 5})], "")
    clash = ex.model_copy(deep=True)
    clash.tools[0].function.name = "has_dot_inside"
    with pytest.raises(FormatError, match="already contains dot_replacement"):
        replaced.render(clash, tokenizer)


# --------------------------------------------------------------------------- template detection

def test_template_detection_and_auto_selection(tokenizer, qwen_tokenizer, examples):
    assert template_renders_tools(tokenizer) is False      # SmolLM2's template ignores tools=
    assert template_renders_tools(qwen_tokenizer) is True
    assert isinstance(default_format_for(tokenizer), HermesFormat)
    assert isinstance(default_format_for(qwen_tokenizer), ChatTemplateFormat)
    assert get_format("auto", tokenizer=qwen_tokenizer).name == "chat_template"
    assert get_format("auto", tokenizer=tokenizer).name == "hermes"
    with pytest.raises(ValueError, match="tokenizer="):
        get_format("auto")
    with pytest.raises(FormatError, match="xlam_function_calling_60k.json, row 0: the tokenizer's chat template "
                                          "ignores tools="):
        get_format("chat_template").render(examples[0], tokenizer)


# --------------------------------------------------------------------------- (d) save / load

@pytest.mark.parametrize("name, options", [(n, {}) for n in TOOL_FORMATS] + [("hermes", {"dot_replacement": "_dot_"})])
def test_save_and_load_format(name, options, tmp_path, tokenizer, tokenizer_for):
    fmt = get_format(name, **options)
    path = save_format(fmt, tmp_path)
    assert json.loads(path.read_text())["name"] == name
    loaded = load_format(tmp_path)
    assert type(loaded) is FORMATS[name] and loaded.options() == fmt.options()
    tok = tokenizer_for(name)
    ex = _dotted_example()
    assert loaded.render(ex, tok) == fmt.render(ex, tok)
