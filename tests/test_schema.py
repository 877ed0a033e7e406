import pytest

from calltune.schema import Example, Message, SchemaError, Tool, ToolCall


def test_arguments_json_string_is_parsed_and_serialised_back():
    call = ToolCall(id="c1", function={"name": "get_weather", "arguments": '{"city": "Paris"}'})
    assert call.arguments == {"city": "Paris"}
    assert call.to_openai() == {"type": "function", "id": "c1",
                                "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}


def test_error_names_the_field_path():
    with pytest.raises(SchemaError, match=r"messages\[1\]\.tool_calls\[0\]\.function\.name"):
        Example(messages=[{"role": "user", "content": "hi"},
                          {"role": "assistant", "tool_calls": [{"function": {"name": "", "arguments": {}}}]}])


def test_arguments_must_be_an_object():
    with pytest.raises(SchemaError, match="arguments must be a JSON object, got list"):
        ToolCall(function={"name": "f", "arguments": [1, 2]})
    with pytest.raises(SchemaError, match="not JSON"):
        ToolCall(function={"name": "f", "arguments": "{'a': 1}"})


def test_role_rules():
    with pytest.raises(SchemaError, match="only allowed on assistant"):
        Message(role="user", content="x", tool_calls=[ToolCall.of("f")])
    with pytest.raises(SchemaError, match="needs content or tool_calls"):
        Message(role="assistant")
    with pytest.raises(SchemaError, match="role"):
        Message(role="robot", content="x")


def test_example_round_trips_through_json_and_hf_dicts():
    ex = Example(messages=[{"role": "user", "content": "weather in Paris?"},
                           {"role": "assistant", "tool_calls": [ToolCall.of("get_weather", {"city": "Paris"}, id="a")]},
                           {"role": "tool", "tool_call_id": "a", "content": "18C"},
                           {"role": "assistant", "content": "It is 18C."}],
                 tools=[Tool(function={"name": "get_weather", "parameters": {"type": "object",
                                                                             "properties": {"city": {"type": "string"}}}})],
                 source="mem", row=3)
    again = Example.from_json(ex.to_json())
    assert again == ex
    dicts = ex.messages_as_dicts()
    assert dicts[1]["tool_calls"][0]["function"] == {"name": "get_weather", "arguments": {"city": "Paris"}}
    assert dicts[2] == {"role": "tool", "content": "18C", "tool_call_id": "a"}
    assert ex.final_assistant().content == "It is 18C."
    assert ex.where == "mem, row 3"
