"""`calltune chat`: tools from a Python file, the tool-running loop, errors fed back to the model."""

from __future__ import annotations

import json
import textwrap
from pathlib import Path

import pytest

from calltune.infer.chat import ToolsError, chat_loop, function_tool, load_tools, run_tool
from calltune.schema import Message, ToolCall

TOOLS_PY = '''
from typing import Literal, Optional

def get_weather(city: str, unit: Literal["celsius", "fahrenheit"] = "celsius") -> dict:
    """Current weather of a city.

    Args:
        city: the city name, e.g. Paris
        unit: temperature unit
    """
    return {"city": city, "temperature": 18, "unit": unit}

def divide(a: float, b: float) -> float:
    """Divide a by b."""
    return a / b

def tags(names: list[str], limit: Optional[int] = None) -> str:
    return ",".join(names[:limit])

def _private():
    pass

import os  # imported names are not tools
from json import dumps
'''


@pytest.fixture
def tools_file(tmp_path: Path) -> Path:
    path = tmp_path / "my_tools.py"
    path.write_text(TOOLS_PY)
    return path


def test_load_tools_takes_public_functions_defined_in_the_file(tools_file):
    tools = load_tools(tools_file)
    assert sorted(tools) == ["divide", "get_weather", "tags"]


def test_load_tools_errors_name_the_file(tmp_path):
    with pytest.raises(ToolsError, match="not found"):
        load_tools(tmp_path / "missing.py")
    bad = tmp_path / "bad.py"
    bad.write_text("raise RuntimeError('boom')\n")
    with pytest.raises(ToolsError, match="bad.py failed: RuntimeError: boom"):
        load_tools(bad)
    empty = tmp_path / "empty.py"
    empty.write_text("X = 1\n")
    with pytest.raises(ToolsError, match="no public function"):
        load_tools(empty)


def test_function_tool_schema_from_hints_and_docstring(tools_file):
    tools = load_tools(tools_file)
    weather = function_tool("get_weather", tools["get_weather"]).to_dict()["function"]
    assert weather["description"] == "Current weather of a city."
    assert weather["parameters"] == {
        "type": "object", "required": ["city"],
        "properties": {"city": {"type": "string", "description": "the city name, e.g. Paris"},
                       "unit": {"enum": ["celsius", "fahrenheit"], "description": "temperature unit"}}}
    tags = function_tool("tags", tools["tags"]).function.parameters
    assert tags["properties"] == {"names": {"type": "array", "items": {"type": "string"}}, "limit": {"type": "integer"}}


def test_run_tool_turns_every_failure_into_a_result(tools_file):
    tools = load_tools(tools_file)
    assert json.loads(run_tool(tools, "get_weather", {"city": "Paris"}))["temperature"] == 18
    assert run_tool(tools, "divide", {"a": 1, "b": 0}) == "error: ZeroDivisionError: division by zero"
    assert run_tool(tools, "divide", {"a": 1}).startswith("error: bad arguments for divide")
    assert run_tool(tools, "nope", {}).startswith("error: there is no tool named 'nope'")


class ScriptedModel:
    """A stand-in model: returns the scripted assistant turns in order and records what it was shown."""

    def __init__(self, replies: list[Message]):
        self.replies = list(replies)
        self.seen: list[list[Message]] = []

    def __call__(self, messages, tools):
        self.seen.append(list(messages))
        self.tools = tools
        return self.replies.pop(0)


def _io(lines):
    inputs, out = list(lines), []
    return (lambda: inputs.pop(0) if inputs else None), out.append, out


def test_chat_loop_runs_calls_feeds_results_back_and_stops_at_text(tools_file):
    tools = load_tools(tools_file)
    model = ScriptedModel([
        Message(role="assistant", tool_calls=[ToolCall.of("get_weather", {"city": "Paris"}, id="call_a"),
                                              ToolCall.of("divide", {"a": 1, "b": 0}, id="call_b")]),
        Message(role="assistant", content="It is 18 degrees in Paris; 1/0 is undefined."),
    ])
    read, write, out = _io(["Weather in Paris, and 1/0?"])
    messages = chat_loop(model, tools, read, write, system="Be brief.")
    assert [m.role for m in messages] == ["system", "user", "assistant", "tool", "tool", "assistant"]
    weather, error = messages[3], messages[4]
    assert (weather.tool_call_id, weather.name) == ("call_a", "get_weather")
    assert json.loads(weather.content)["city"] == "Paris"
    assert (error.tool_call_id, error.content) == ("call_b", "error: ZeroDivisionError: division by zero")
    # the second model call saw both results; the tools were offered as JSON Schemas
    assert model.seen[1][-2:] == [weather, error]
    assert sorted(t.name for t in model.tools) == ["divide", "get_weather", "tags"]
    assert out == ['-> get_weather({"city": "Paris"})', '<- {"city": "Paris", "temperature": 18, "unit": "celsius"}',
                   '-> divide({"a": 1, "b": 0})', "<- error: ZeroDivisionError: division by zero",
                   "It is 18 degrees in Paris; 1/0 is undefined."]


def test_chat_loop_gives_ids_to_calls_without_and_caps_rounds(tools_file):
    tools = load_tools(tools_file)
    call = lambda: Message(role="assistant", tool_calls=[ToolCall.of("divide", {"a": 4, "b": 2})])  # noqa: E731
    model = ScriptedModel([call(), call(), call()])
    read, write, out = _io(["go", "/exit", "never read"])
    messages = chat_loop(model, tools, read, write, max_calls_per_turn=2)
    tool_turns = [m for m in messages if m.role == "tool"]
    assert len(tool_turns) == 2 and all(m.content == "2.0" for m in tool_turns)
    assert all(m.tool_call_id for m in tool_turns)
    assert messages[1].tool_calls[0].id == tool_turns[0].tool_call_id
    assert out[-1].startswith("(stopped: the model made 2 rounds")


@pytest.mark.slow
def test_chat_with_the_tuned_model_runs_the_tool_and_answers(tmp_path, tools_file):
    """The real loop on the tiny tuned SmolLM2: it calls get_weather, gets the result, answers in text."""
    from toolcall_model import ASK_PARIS, PARIS_RESULT, tuned_adapter

    from calltune.infer.chat import model_completer

    tools_file.write_text(textwrap.dedent(f'''
        def get_weather(city: str, unit: str = "celsius") -> str:
            """Current weather of a city."""
            if city != "Paris":
                raise ValueError("unknown city " + city)
            return {PARIS_RESULT!r}
    '''))
    complete = model_completer(tuned_adapter(tmp_path), max_tokens=40)
    read, write, out = _io([ASK_PARIS])
    messages = chat_loop(complete, load_tools(tools_file), read, write)
    assert out[0] == '-> get_weather({"city": "Paris"})'
    assert out[1] == f"<- {PARIS_RESULT}"
    assert messages[-1].role == "assistant" and messages[-1].content and not messages[-1].tool_calls
