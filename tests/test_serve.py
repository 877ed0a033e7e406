"""`calltune serve`: the real server on localhost, driven by the official openai client.

Three tiers. Without a model: grammars against the real tokenizer, the stream splitter, CLI parsing,
export messages. With a 1-layer random model (and a LoRA adapter on it) behind the real server: the
protocol -- constrained calls even from random weights, ids, streaming deltas, the API key, malformed
requests (400 in OpenAI's shape), unknown models. Slow: a tiny tuned SmolLM2 (a LoRA adapter trained
by `toolcall_model.py`) and its base on one loaded base: a call, parallel calls, a tool-result turn
and its answer, streaming, every tool_choice, an unconstrained request.
"""

from __future__ import annotations

import json
import urllib.error
import urllib.request

import pytest

from calltune.formats import get_format
from calltune.infer import constrained as cd
from calltune.infer.engine import ContentSplitter
from serving import running, tiny_models
from toolcall_model import (ADD, ASK_ADD, ASK_PARIS, ASK_TWO, HELLO, HELLO_ANSWER, PARIS_RESULT, TOOLS,
                            tuned_adapter)

KEY = "test-key"
OPENAI_TOOLS = [t.to_dict() for t in TOOLS]


def _ask(client, content, **kwargs):
    kwargs.setdefault("tools", OPENAI_TOOLS)
    kwargs.setdefault("max_tokens", 48)
    return client.chat.completions.create(model=kwargs.pop("model", "tuned"),
                                          messages=[{"role": "user", "content": content}], **kwargs)


def _raw(url, body: bytes | None, headers=None, method="POST"):
    """(status, parsed JSON body) of a request made without the openai client."""
    request = urllib.request.Request(url, data=body, method=method,
                                     headers={"Content-Type": "application/json", **(headers or {})})
    try:
        with urllib.request.urlopen(request, timeout=600) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as err:
        return err.code, json.loads(err.read())


def _calls(response):
    return [(c.function.name, json.loads(c.function.arguments)) for c in response.choices[0].message.tool_calls or []]


# -- without a model -------------------------------------------------------------------------------
def _accepts(tokenizer, grammar: str, text: str) -> bool:
    matcher = cd.compile_grammar(tokenizer, grammar)
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    return matcher.validate_tokens(ids) == len(ids) and matcher.consume_tokens(ids) and matcher.is_accepting()


CALL_PARIS = '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>'
CALL_ADD = '<tool_call>\n{"name": "add", "arguments": {"a": 2, "b": 3}}\n</tool_call>'


@pytest.mark.parametrize("mode,parallel,text,ok", [
    ("auto", True, "Just text, no call.", True),
    ("auto", True, CALL_PARIS, True),
    ("auto", True, "Let me check.\n" + CALL_PARIS + "\n" + CALL_ADD, True),
    ("auto", True, '<tool_call>\n{"name": "get_time", "arguments": {}}\n</tool_call>', False),  # unknown tool
    ("auto", True, '<tool_call>\n{"name": "add", "arguments": {"a": "2", "b": 3}}\n</tool_call>', False),  # type
    ("auto", True, '<tool_call>\n{"name": "add", "arguments": {"a": 2}}\n</tool_call>', False),  # required b
    ("auto", True, '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris", "unit": "kelvin"}}\n</tool_call>', False),
    ("auto", True, '<tool_call>\n{"name": "add", "arguments": {"a": 2, "b": 3, "c": 4}}\n</tool_call>', False),
    ("auto", True, "Sure <tool_call> not json", False),
    ("auto", False, CALL_PARIS + "\n" + CALL_ADD, False),
    ("required", True, CALL_PARIS + "\n" + CALL_ADD, True),
    ("required", True, "Just text.", False),
    ("required", True, "Text first " + CALL_PARIS, False),
])
def test_tool_call_grammar(tokenizer, mode, parallel, text, ok):
    grammar = cd.tool_call_grammar(get_format("hermes"), TOOLS, mode, parallel)
    assert _accepts(tokenizer, grammar, text) is ok


def test_a_grammar_compiles_once_and_every_matcher_has_its_own_state(tokenizer):
    grammar = cd.tool_call_grammar(get_format("hermes"), TOOLS, "required")
    first = cd.compile_grammar(tokenizer, grammar)
    misses = cd._pristine_matcher.cache_info().misses
    second = cd.compile_grammar(tokenizer, grammar)
    assert cd._pristine_matcher.cache_info().misses == misses and second is not first  # not compiled again
    ids = tokenizer(CALL_PARIS, add_special_tokens=False)["input_ids"]
    assert first.consume_tokens(ids) and first.is_accepting()
    assert not second.is_accepting()  # untouched by `first`: a required call is still to come
    assert second.consume_tokens(ids) and second.is_accepting()
    assert not cd.compile_grammar(tokenizer, grammar).is_accepting()  # nor is the cached one


def test_no_call_grammar_allows_text_only(tokenizer):
    grammar = cd.no_call_grammar(get_format("hermes"))
    assert _accepts(tokenizer, grammar, "It is sunny.\nNo <tool> here.")
    assert not _accepts(tokenizer, grammar, "Sure. " + CALL_PARIS)


def test_grammar_of_a_named_function_and_unsupported_formats(tokenizer):
    grammar = cd.tool_call_grammar(get_format("hermes"), [ADD], "required")
    assert _accepts(tokenizer, grammar, CALL_ADD) and not _accepts(tokenizer, grammar, CALL_PARIS)
    with pytest.raises(cd.ConstrainedDecodingError, match="hermes format only"):
        cd.tool_call_grammar(get_format("xlam"), TOOLS)


@pytest.mark.parametrize("pieces,parse_calls,sent", [
    (["  Hel", "lo", " world ", "\n"], False, ["Hel", "lo", " world"]),
    (["Sure.", " <tool", "_call>\n{", "}"], True, ["Sure."]),
    (["a <", "b"], True, ["a", " <b"]),
])
def test_content_splitter_holds_back_calls_and_whitespace(pieces, parse_calls, sent):
    splitter = ContentSplitter(parse_calls)
    out = [d for d in (splitter.feed(p) for p in pieces) if d]
    assert out == sent


def test_served_models_from_the_command_line():
    from calltune.cli import _served_models

    assert _served_models("runs/m", []) == {"runs/m": "runs/m"}
    assert _served_models(None, ["a=x", "b=y"]) == {"a": "x", "b": "y"}
    with pytest.raises(ValueError, match="given twice"):
        _served_models(None, ["a=x", "a=y"])
    with pytest.raises(ValueError, match="give a model"):
        _served_models(None, [])


def test_request_limits_from_the_command_line():
    from typer.testing import CliRunner

    from calltune.cli import _limits, app

    assert _limits(["max_tools=4", "max_body_bytes=1000"]).model_dump() == {
        "max_body_bytes": 1000, "max_messages": 1024, "max_tools": 4, "max_depth": 32, "max_stop": 4}
    for bad, message in [("max_tool=4", "KEY one of max_body_bytes"), ("max_tools=0", "greater than or equal"),
                         ("max_tools=many", "valid integer")]:
        result = CliRunner().invoke(app, ["serve", "some/model", "--limit", bad])
        assert result.exit_code == 2 and message in result.output and "Traceback" not in result.output, result.output


def test_gguf_export_without_converter_says_what_to_run(monkeypatch, tmp_path):
    from typer.testing import CliRunner

    from calltune.cli import app

    monkeypatch.delenv("LLAMA_CPP_DIR", raising=False)
    monkeypatch.setenv("PATH", str(tmp_path))
    result = CliRunner().invoke(app, ["export", "smollm2-135m-instruct", "--format", "gguf", "-o",
                                      str(tmp_path / "m.gguf"), "--converter", str(tmp_path / "nope.py")])
    assert result.exit_code == 2
    assert "convert_hf_to_gguf.py" in result.output and "git clone" in result.output


# -- a tiny random model: the protocol, without a real model --------------------------------------
SWITCH = {"type": "function", "function": {
    "name": "set_light", "description": "Switch the light.",
    "parameters": {"type": "object", "properties": {"state": {"type": "string", "enum": ["on", "off"]}},
                   "required": ["state"]}}}
PING = {"type": "function", "function": {"name": "ping", "description": "Ping.", "parameters": {}}}


@pytest.fixture(scope="module")
def tiny_server(tmp_path_factory, smollm2_path, tokenizer):
    """A 1-layer random Llama with SmolLM2's tokenizer, as a base and a LoRA adapter on it ("tiny")."""
    from calltune.serve import create_app

    app = create_app(tiny_models(tmp_path_factory.mktemp("tiny"), tokenizer), api_key=KEY, default_max_tokens=40)
    with running(app) as url:
        yield url, app


@pytest.fixture(scope="module")
def tiny_client(tiny_server):
    from openai import OpenAI

    return OpenAI(base_url=tiny_server[0] + "/v1", api_key=KEY, max_retries=0, timeout=120)


def test_tiny_models_share_one_base(tiny_client, tiny_server):
    assert sorted(m.id for m in tiny_client.models.list().data) == ["tiny", "tiny-base"]
    registry = tiny_server[1].state.registry
    tiny, base = registry.get("tiny"), registry.get("tiny-base")
    assert tiny.model is base.model and (tiny.adapter, base.base_of_adapters) == ("tiny", True)
    assert tiny_client.models.retrieve("tiny").id == "tiny"


@pytest.mark.parametrize("model", ["tiny", "tiny-base"])
def test_constrained_required_call_from_a_random_model(tiny_client, model):
    """Even random weights produce a well-formed call of a given tool: the grammar allows nothing else."""
    response = tiny_client.chat.completions.create(
        model=model, messages=[{"role": "user", "content": "lights on"}], tools=[SWITCH, PING],
        tool_choice="required", parallel_tool_calls=False)
    choice = response.choices[0]
    assert choice.finish_reason == "tool_calls" and choice.message.content is None
    (call,) = choice.message.tool_calls
    assert call.id.startswith("call_") and call.type == "function"
    arguments = json.loads(call.function.arguments)
    assert (call.function.name, arguments) in [("ping", {}), ("set_light", {"state": "on"}),
                                               ("set_light", {"state": "off"})]
    assert response.usage.total_tokens == response.usage.prompt_tokens + response.usage.completion_tokens


def test_named_tool_choice_and_its_stream(tiny_client):
    kwargs = dict(model="tiny", messages=[{"role": "user", "content": "hi"}], tools=[SWITCH, PING],
                  tool_choice={"type": "function", "function": {"name": "ping"}}, parallel_tool_calls=False)
    plain = tiny_client.chat.completions.create(**kwargs)
    assert [(c.function.name, c.function.arguments) for c in plain.choices[0].message.tool_calls] == [("ping", "{}")]
    chunks = list(tiny_client.chat.completions.create(stream=True, stream_options={"include_usage": True}, **kwargs))
    assert chunks[0].choices[0].delta.role == "assistant"
    deltas = [d for c in chunks if c.choices for d in c.choices[0].delta.tool_calls or []]
    assert deltas[0].index == 0 and deltas[0].id.startswith("call_") and deltas[0].function.name == "ping"
    assert "".join(d.function.arguments or "" for d in deltas) == "{}"
    assert [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason] == ["tool_calls"]
    assert chunks[-1].usage.completion_tokens == plain.usage.completion_tokens


def test_response_format_json_schema_is_enforced(tiny_client):
    schema = {"type": "object", "properties": {"light": {"enum": ["on", "off"]}}, "required": ["light"],
              "additionalProperties": False}
    response = tiny_client.chat.completions.create(
        model="tiny", messages=[{"role": "user", "content": "json please"}],
        response_format={"type": "json_schema", "json_schema": {"name": "light", "schema": schema}})
    assert json.loads(response.choices[0].message.content)["light"] in ("on", "off")
    assert response.choices[0].finish_reason == "stop"


def test_api_key_is_required(tiny_client, tiny_server):
    import openai

    with pytest.raises(openai.AuthenticationError) as err:
        tiny_client.with_options(api_key="wrong").models.list()
    assert err.value.status_code == 401 and err.value.body["code"] == "invalid_api_key"
    status, body = _raw(tiny_server[0] + "/v1/chat/completions", b"{}")
    assert status == 401 and set(body["error"]) == {"message", "type", "param", "code"}
    assert _raw(tiny_server[0] + "/health", None, method="GET")[0] == 200  # outside /v1: open


@pytest.mark.parametrize("body,param,fragment", [
    (b"{not json", None, "not valid JSON"),
    ({"model": "tiny"}, "messages", "Field required"),
    ({"model": "tiny", "messages": []}, "messages", "at least 1"),
    ({"model": "tiny", "messages": [{"role": "robot", "content": "hi"}]}, "messages.0.role", "Input should be"),
    ({"model": "tiny", "messages": [{"role": "tool", "content": "x"}]}, "messages.0", "tool_call_id"),
    ({"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "tools": OPENAI_TOOLS,
      "tool_choice": {"type": "function", "function": {"name": "nope"}}}, None, "not among the tools"),
    ({"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "tool_choice": "required"}, None, "no tools"),
    ({"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "temperature": 5}, "temperature", "less than"),
    ({"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "n": 2}, None, "n must be 1"),
    ({"model": "tiny", "messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "tool_calls": [
        {"id": "c", "type": "function", "function": {"name": "add", "arguments": "{oops"}}]},
        {"role": "tool", "tool_call_id": "c", "content": "5"}], "tools": OPENAI_TOOLS}, "messages[1]", "not JSON"),
])
def test_malformed_requests_get_400_in_openai_shape(tiny_server, body, param, fragment):
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    status, answer = _raw(tiny_server[0] + "/v1/chat/completions", data, {"Authorization": f"Bearer {KEY}"})
    assert status == 400, answer
    error = answer["error"]
    assert error["type"] == "invalid_request_error" and fragment in error["message"], error
    if param is not None:
        assert error["param"] == param


def test_unknown_model_is_404_through_the_client(tiny_client):
    import openai

    with pytest.raises(openai.NotFoundError) as err:
        _ask(tiny_client, HELLO, model="gpt-4")
    assert err.value.body["code"] == "model_not_found"
    with pytest.raises(openai.BadRequestError) as err:
        tiny_client.chat.completions.create(model="tiny", messages=[])
    assert err.value.body["param"] == "messages"


# -- the real server -------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def server(tmp_path_factory):
    from calltune.serve import create_app

    adapter = tuned_adapter(tmp_path_factory.mktemp("serve"))
    app = create_app({"tuned": adapter, "base": "smollm2-135m-instruct"}, api_key=KEY, default_max_tokens=48)
    with running(app) as url:
        yield url, app


@pytest.fixture(scope="module")
def client(server):
    from openai import OpenAI

    return OpenAI(base_url=server[0] + "/v1", api_key=KEY, max_retries=0, timeout=600)


@pytest.mark.slow
def test_models_lists_the_adapter_and_its_base(client, server):
    assert sorted(m.id for m in client.models.list().data) == ["base", "tuned"]
    registry = server[1].state.registry
    assert registry.get("tuned").model is registry.get("base").model  # one base in memory


@pytest.mark.slow
def test_tool_call(client):
    response = _ask(client, ASK_PARIS)
    choice = response.choices[0]
    assert choice.finish_reason == "tool_calls"
    assert choice.message.content is None
    assert _calls(response) == [("get_weather", {"city": "Paris"})]
    assert choice.message.tool_calls[0].id.startswith("call_")
    usage = response.usage
    assert usage.prompt_tokens > 100 and usage.completion_tokens > 10
    assert usage.total_tokens == usage.prompt_tokens + usage.completion_tokens


@pytest.mark.slow
def test_parallel_calls_and_parallel_tool_calls_false(client):
    both = _ask(client, ASK_TWO, max_tokens=80)
    assert _calls(both) == [("get_weather", {"city": "Tokyo"}), ("get_weather", {"city": "Rome"})]
    ids = [c.id for c in both.choices[0].message.tool_calls]
    assert len(set(ids)) == 2
    one = _ask(client, ASK_TWO, parallel_tool_calls=False, max_tokens=80)
    assert _calls(one) == [("get_weather", {"city": "Tokyo"})]


@pytest.mark.slow
def test_tool_result_turn_gets_a_text_answer(client):
    messages = [{"role": "user", "content": ASK_PARIS},
                {"role": "assistant", "content": None, "tool_calls": [
                    {"id": "call_1", "type": "function",
                     "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}]},
                {"role": "tool", "tool_call_id": "call_1", "content": PARIS_RESULT}]
    response = client.chat.completions.create(model="tuned", messages=messages, tools=OPENAI_TOOLS, max_tokens=24)
    choice = response.choices[0]
    assert choice.finish_reason == "stop" and not choice.message.tool_calls
    assert "18" in choice.message.content


@pytest.mark.slow
def test_streaming_tool_calls_and_usage(client):
    chunks = list(_ask(client, ASK_TWO, max_tokens=80, stream=True, stream_options={"include_usage": True}))
    assert chunks[0].choices[0].delta.role == "assistant"
    calls: dict[int, dict] = {}
    for chunk in chunks:
        for delta in (chunk.choices[0].delta.tool_calls or []) if chunk.choices else []:
            call = calls.setdefault(delta.index, {"id": None, "name": "", "arguments": ""})
            call["id"] = call["id"] or delta.id
            call["name"] += (delta.function.name or "") if delta.function else ""
            call["arguments"] += (delta.function.arguments or "") if delta.function else ""
    assert [(c["name"], json.loads(c["arguments"])) for c in calls.values()] == [
        ("get_weather", {"city": "Tokyo"}), ("get_weather", {"city": "Rome"})]
    assert all(c["id"].startswith("call_") for c in calls.values())
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finishes == ["tool_calls"]
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens > 10


@pytest.mark.slow
def test_streaming_text_matches_the_plain_response(client):
    plain = _ask(client, HELLO, tool_choice="none", max_tokens=12)
    chunks = list(_ask(client, HELLO, tool_choice="none", max_tokens=12, stream=True))
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == plain.choices[0].message.content
    assert HELLO_ANSWER.startswith(text) or text.startswith(HELLO_ANSWER)
    assert [c.choices[0].finish_reason for c in chunks if c.choices[0].finish_reason] == [plain.choices[0].finish_reason]


@pytest.mark.slow
def test_tool_choice_variants(client):
    none = _ask(client, ASK_PARIS, tool_choice="none", max_tokens=12)
    assert not none.choices[0].message.tool_calls and none.choices[0].message.content
    assert "<tool_call>" not in none.choices[0].message.content
    auto = _ask(client, HELLO, tool_choice="auto", max_tokens=12)
    assert auto.choices[0].message.content == HELLO_ANSWER and auto.choices[0].finish_reason == "stop"
    required = _ask(client, HELLO, tool_choice="required")
    assert required.choices[0].finish_reason == "tool_calls" and _calls(required)
    named = _ask(client, ASK_PARIS, tool_choice={"type": "function", "function": {"name": "add"}})
    (name, arguments), *_ = _calls(named)
    assert name == "add" and set(arguments) == {"a", "b"} and all(isinstance(v, (int, float)) for v in arguments.values())


@pytest.mark.slow
def test_unconstrained_request_and_the_base_model(client):
    unconstrained = _ask(client, ASK_ADD, extra_body={"constrained": False})
    assert _calls(unconstrained) == [("add", {"a": 2, "b": 3})]
    base = _ask(client, HELLO, model="base", tool_choice="none", max_tokens=4)
    assert base.choices[0].finish_reason == "length" and base.usage.completion_tokens == 4
