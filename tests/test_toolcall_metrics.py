"""Tests of `calltune.evaluate.toolcall_metrics` on hand-made outputs with hand-computed expected values."""

from __future__ import annotations

import pytest

from calltune.evaluate.tasks import TOOLCALL_METRICS
from calltune.evaluate.toolcall_metrics import canonical_call, score_toolcall, toolcall_metrics
from calltune.formats import Parsed
from calltune.schema import Example, Message, Tool, ToolCall

WEATHER = Tool(function={"name": "get_weather", "parameters": {
    "type": "object", "required": ["city"],
    "properties": {"city": {"type": "string"}, "days": {"type": "integer", "default": 1}}}})
TIME = Tool(function={"name": "get_time", "parameters": {
    "type": "object", "required": ["tz"], "properties": {"tz": {"type": "string"}}}})
TOOLS = [WEATHER, TIME]


def call(name, **args) -> ToolCall:
    return ToolCall.of(name, args)


def example(final: Message, earlier=()) -> Example:
    return Example(messages=[Message(role="user", content="q"), *earlier, final], tools=TOOLS)


SINGLE = example(Message(role="assistant", tool_calls=[call("get_weather", city="Paris")]))
PARALLEL = example(Message(role="assistant", tool_calls=[call("get_weather", city="Paris"), call("get_weather", city="Rome")]))
NO_CALL = example(Message(role="assistant", content="Hello!"))

# (name, parsed output, reference, expected verdicts: name_match, exact_match, parseable, schema_valid, predicted_no_call)
CASES = [
    ("right single call", Parsed([call("get_weather", city="Paris")]), SINGLE, (True, True, True, True, False)),
    ("wrong function name", Parsed([call("get_time", tz="CET")]), SINGLE, (False, False, True, True, False)),
    ("wrong argument value", Parsed([call("get_weather", city="Lyon")]), SINGLE, (True, False, True, True, False)),
    ("parallel calls in the other order", Parsed([call("get_weather", city="Rome"), call("get_weather", city="Paris")]),
     PARALLEL, (True, True, True, True, False)),
    ("one parallel call missing", Parsed([call("get_weather", city="Rome")]), PARALLEL, (False, False, True, True, False)),
    ("extra call", Parsed([call("get_weather", city="Paris"), call("get_time", tz="CET")]), SINGLE,
     (False, False, True, True, False)),
    ("no call when a call is expected", Parsed(content="It is sunny."), SINGLE, (False, False, True, True, True)),
    ("call when no call is expected", Parsed([call("get_weather", city="Paris")]), NO_CALL, (False, False, True, True, False)),
    ("invalid JSON", Parsed(content='{"name": "get_weather", "arguments": {', error="truncated JSON"), SINGLE,
     (False, False, False, False, False)),
    ("argument of the wrong type", Parsed([call("get_weather", city=42)]), SINGLE, (True, False, True, False, False)),
    ("undeclared tool", Parsed([call("book_flight", to="Paris")]), SINGLE, (False, False, True, False, False)),
    ("right no call", Parsed(content="Hi there"), NO_CALL, (True, True, True, True, True)),
]


@pytest.mark.parametrize("name, parsed, ref, expected", CASES, ids=[c[0] for c in CASES])
def test_each_case(name, parsed, ref, expected):
    r = score_toolcall(parsed, ref)
    assert (r["name_match"], r["exact_match"], r["parseable"], r["schema_valid"], r["predicted_no_call"]) == expected


def test_schema_problems_say_what_is_wrong():
    wrong_type = score_toolcall(Parsed([call("get_weather", city=42)]), SINGLE)
    assert wrong_type["schema_problems"] == ["call 0 (get_weather): 42 is not of type 'string' (at arguments.city)"]
    undeclared = score_toolcall(Parsed([call("book_flight", to="Paris")]), SINGLE)
    assert undeclared["schema_problems"] == ["call 0: 'book_flight' is not a provided tool (['get_time', 'get_weather'])"]
    missing = score_toolcall(Parsed([call("get_time")]), SINGLE)
    assert missing["schema_problems"] == ["call 0 (get_time): 'tz' is a required property (at arguments)"]
    # a parameter with a default may be omitted, one without may not; a string is not an integer
    assert score_toolcall(Parsed([call("get_weather", city="Paris", days="2")]), SINGLE)["schema_valid"] is False


def test_aggregate_over_all_cases():
    metrics, records = toolcall_metrics([c[1] for c in CASES], [c[2] for c in CASES])
    # name matches: right single, wrong value, parallel reordered, wrong type, right no call = 5 of 12
    assert metrics["function_name_accuracy"] == pytest.approx(5 / 12)
    # exact: right single, parallel reordered, right no call
    assert metrics["exact_call_accuracy"] == pytest.approx(3 / 12)
    assert metrics["parseable_rate"] == pytest.approx(11 / 12)
    # not schema-valid: invalid JSON, wrong type, undeclared tool
    assert metrics["schema_valid_rate"] == pytest.approx(9 / 12)
    # outputs with >= 1 call: 9 (all but the two no-call outputs and the invalid JSON); 7 of them valid
    assert metrics["schema_valid_call_rate"] == pytest.approx(7 / 9)
    # outputs without a call: "no call when expected" (ref calls) and "right no call" -> precision 1/2
    assert metrics["no_call_precision"] == pytest.approx(1 / 2)
    # references without a call: "call when no call expected" and "right no call" -> recall 1/2
    assert metrics["no_call_recall"] == pytest.approx(1 / 2)
    assert (metrics["n"], metrics["n_reference_no_call"], metrics["n_predicted_no_call"]) == (12, 2, 2)
    assert [r["index"] for r in records] == list(range(12))
    assert records[3]["reference"] == ['{"arguments":{"city":"Paris"},"name":"get_weather"}',
                                       '{"arguments":{"city":"Rome"},"name":"get_weather"}']
    assert records[8]["error"] == "truncated JSON" and records[8]["predicted"] == []
    assert {m.name for m in TOOLCALL_METRICS} == set(metrics) - {"n", "n_reference_no_call", "n_predicted_no_call"}


def test_no_call_rates_are_none_when_undefined():
    metrics, _ = toolcall_metrics([Parsed([call("get_weather", city="Paris")])], [SINGLE])
    assert metrics["no_call_precision"] is None and metrics["no_call_recall"] is None
    assert metrics["exact_call_accuracy"] == 1.0
    metrics, _ = toolcall_metrics([Parsed(content="x")], [SINGLE])
    assert metrics["no_call_precision"] == 0.0 and metrics["no_call_recall"] is None
    assert metrics["schema_valid_call_rate"] is None
    metrics, records = toolcall_metrics([], [])
    assert records == [] and metrics["n"] == 0 and metrics["exact_call_accuracy"] is None


def test_numbers_compare_by_value_but_types_still_matter():
    ref = example(Message(role="assistant", tool_calls=[call("get_weather", city="Paris", days=2)]))
    assert score_toolcall(Parsed([call("get_weather", city="Paris", days=2.0)]), ref)["exact_match"] is True
    assert score_toolcall(Parsed([call("get_weather", city="Paris", days="2")]), ref)["exact_match"] is False
    assert score_toolcall(Parsed([call("get_weather", days=2, city="Paris")]), ref)["exact_match"] is True
    assert canonical_call(call("f", b=True)) != canonical_call(call("f", b=1))


def test_duplicate_calls_count_as_a_multiset():
    twice = example(Message(role="assistant", tool_calls=[call("get_weather", city="Paris"), call("get_weather", city="Paris")]))
    once = score_toolcall(Parsed([call("get_weather", city="Paris")]), twice)
    assert once["name_match"] is False and once["exact_match"] is False
    thrice = score_toolcall(Parsed([call("get_weather", city="Paris")] * 3), twice)
    assert thrice["name_match"] is False


def test_reference_is_the_final_assistant_turn():
    earlier = [Message(role="assistant", tool_calls=[call("get_weather", city="Paris")]),
               Message(role="tool", content="sunny", tool_call_id=None)]
    ref = example(Message(role="assistant", content="It is sunny in Paris."), earlier)
    r = score_toolcall(Parsed(content="Sunny."), ref)
    assert r["reference_no_call"] is True and r["exact_match"] is True


def test_bad_input_raises():
    with pytest.raises(ValueError, match="1 predictions for 2 reference examples"):
        toolcall_metrics([Parsed()], [SINGLE, SINGLE])
    no_answer = Example(messages=[Message(role="user", content="q")], source="f.jsonl", row=4)
    with pytest.raises(ValueError, match="f.jsonl, row 4: no assistant turn"):
        toolcall_metrics([Parsed()], [no_answer])
