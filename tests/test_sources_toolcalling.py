"""Tests of the tool-calling sources (xLAM, glaive, llama_functions, Hermes, OpenAI JSONL) and their
shared helpers, on the real-format samples in ../shared/data/samples and on broken files written here.

Expected counts come from ../shared/data/samples/PROVENANCE.md: which rows are malformed/quirks and
how each source decides about them (see each module's docstring).
"""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest

from calltune.sources import SOURCES, load_source
from calltune.sources.base import Rejects, SourceError
from calltune.sources.convert import (loads_json_or_literal, param_list_to_schema, python_type_to_schema,
                                      xlam_parameters_to_schema)
from calltune.sources.glaive import load_glaive
from calltune.sources.hermes import load_hermes
from calltune.sources.llama_functions import load_llama_functions
from calltune.sources.openai_jsonl import load_openai_jsonl
from calltune.sources.xlam import load_xlam

SAMPLES = Path(__file__).resolve().parents[2] / "shared" / "data" / "samples"
XLAM = SAMPLES / "xlam_function_calling_60k.json"
GLAIVE = SAMPLES / "glaive-function-calling-v2.json"
LLAMA = SAMPLES / "llama_functions.jsonl"
HERMES = SAMPLES / "hermes-function-calling-v1.json"


def load(loader, path):
    rejects = Rejects()
    examples = loader(path, rejects=rejects)
    return {e.row: e for e in examples}, {item["row"]: item["reason"] for item in rejects.items}


def write_json(path: Path, rows) -> Path:
    path.write_text(json.dumps(rows), encoding="utf-8")
    return path


def write_jsonl(path: Path, rows) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def calls(message):
    return [(c.name, c.arguments) for c in message.tool_calls or []]


# --------------------------------------------------------------------------------------------- helpers

@pytest.mark.parametrize("text, schema, exact", [
    ("str", {"type": "string"}, True),
    ("int", {"type": "integer"}, True),
    ("float", {"type": "number"}, True),
    ("bool", {"type": "boolean"}, True),
    ("Dict", {"type": "object"}, True),
    ("List", {"type": "array"}, True),
    ("List[int]", {"type": "array", "items": {"type": "integer"}}, True),
    ("List[List[str]]", {"type": "array", "items": {"type": "array", "items": {"type": "string"}}}, True),
    ("List[Union[int, float]]", {"type": "array"}, False),
    ("Union[int, float]", {}, False),
    ("Callable", {}, False),
    ("Any", {}, True),
])
def test_python_type_to_schema(text, schema, exact):
    assert python_type_to_schema(text) == (schema, exact)


def test_xlam_parameters_optional_default_and_original_type():
    out = xlam_parameters_to_schema({
        "n": {"description": "count", "type": "int, optional", "default": "40"},
        "xs": {"description": "numbers", "type": "List[Union[int, float]]"},
        "q": {"description": "query", "type": "str", "default": ""},
    })
    assert out == {"type": "object", "required": ["xs", "q"], "properties": {
        "n": {"type": "integer", "description": "count", "default": "40"},
        "xs": {"type": "array", "x-original-type": "List[Union[int, float]]", "description": "numbers"},
        "q": {"type": "string", "description": "query"},
    }}


def test_param_list_to_schema_drops_name_and_optional():
    out = param_list_to_schema([
        {"name": "a", "type": "string", "enum": ["x", "y"]},
        {"name": "b", "type": "number", "optional": True, "minimum": 1},
    ])
    assert out == {"type": "object", "required": ["a"], "properties": {
        "a": {"type": "string", "enum": ["x", "y"]}, "b": {"type": "number", "minimum": 1}}}


def test_loads_json_or_literal():
    assert loads_json_or_literal('{"a": true}') == ({"a": True}, False)
    assert loads_json_or_literal("{'a': True, 'b': None}") == ({"a": True, "b": None}, True)
    with pytest.raises(ValueError, match="neither JSON nor a Python literal"):
        loads_json_or_literal('{"a": [User data]}')
    with pytest.raises(ValueError):
        loads_json_or_literal('{"a": Infinity}')


def test_registry_names_the_new_sources():
    assert {"xlam", "glaive", "llama_functions", "openai_jsonl", "hermes"} <= set(SOURCES)
    assert len(load_source("xlam", XLAM, limit=3)) == 3


# ------------------------------------------------------------------------------------------------ xLAM

def test_xlam_sample_counts():
    examples, rejects = load(load_xlam, XLAM)
    assert (len(examples), len(rejects)) == (35, 0)
    assert all(e.source == str(XLAM) for e in examples.values())


def test_xlam_parallel_calls_in_one_turn():
    examples, _ = load(load_xlam, XLAM)
    first = examples[0]  # id 0, real
    assert [m.role for m in first.messages] == ["user", "assistant"]
    assert first.messages[0].content == "Where can I find live giveaways for beta access and games?"
    assert calls(first.messages[1]) == [("live_giveaways_by_type", {"type": "beta"}),
                                        ("live_giveaways_by_type", {"type": "game"})]
    assert [c.id for c in first.messages[1].tool_calls] == ["call_0", "call_1"]
    assert len(examples[25].messages[1].tool_calls) == 4  # id 60015: four calls over two functions
    assert calls(examples[20].messages[1])[0] == ("get_forecast", {"city": "São Paulo", "days": 3})
    assert examples[0].meta["id"] == 0 and examples[10].meta["id"] == 1234


def test_xlam_tool_schema_conversion():
    examples, _ = load(load_xlam, XLAM)
    product = {t.name: t for t in examples[3].tools}["product_id"].function  # id 5, real
    assert product.description.startswith("Fetches product details from the AliExpress API")
    assert product.parameters["required"] == ["is_id"]  # locale/currency/country are ', optional'
    assert product.parameters["properties"]["is_id"] == {
        "type": "integer", "description": "The ID of the product to fetch details for.", "default": "4000886597329"}
    assert "default" not in product.parameters["properties"]["locale"]  # default "" dropped
    board = examples[14].tools[0].function.parameters["properties"]["board"]
    assert board["items"] == {"type": "array", "items": {"type": "string"}}
    assert examples[15].tools[0].function.parameters["properties"]["dict1"]["type"] == "object"
    vegan = examples[18].tools[0].function.parameters["properties"]["vegan"]
    assert vegan == {"type": "boolean", "description": "Only return vegan recipes if True.", "default": False}
    numbers = examples[23].tools[0].function.parameters["properties"]["numbers"]
    assert numbers["x-original-type"] == "List[Union[int, float]]" and "items" not in numbers
    assert examples[24].tools[0].function.parameters == {"type": "object", "properties": {}}


def test_xlam_empty_answers_is_a_no_call_turn():
    examples, _ = load(load_xlam, XLAM)
    no_call = examples[27]  # id 60017, answers == "[]"
    assert no_call.messages[-1].content == "" and no_call.messages[-1].tool_calls is None
    assert no_call.meta["no_call"] is True


def test_xlam_missing_column_raises(tmp_path):
    path = write_json(tmp_path / "x.json", [{"id": 1, "query": "q", "tools": "[]"}])
    with pytest.raises(SourceError, match="answers") as err:
        load_xlam(path)
    assert str(path) in str(err.value)


def test_xlam_row_not_an_object_raises(tmp_path):
    good = json.loads(XLAM.read_text())[0]
    path = write_json(tmp_path / "x.json", [good, ["not", "a", "row"]])
    with pytest.raises(SourceError, match=r"row 1.*not a JSON object"):
        load_xlam(path)


def test_xlam_bad_rows_become_rejects(tmp_path):
    good = json.loads(XLAM.read_text())[0]
    undeclared = dict(good, answers=json.dumps([{"name": "nope", "arguments": {}}]))
    broken = dict(good, tools=good["tools"][:-5])
    array_args = dict(good, answers=json.dumps([{"name": "live_giveaways_by_type", "arguments": ["beta"]}]))
    rejects = Rejects()
    examples = load_xlam(write_json(tmp_path / "x.json", [good, undeclared, broken, array_args]), rejects=rejects)
    assert [e.row for e in examples] == [0]
    assert [item["row"] for item in rejects.items] == [1, 2, 3]
    assert rejects.items[0]["reason"].startswith("undeclared function: call to 'nope'")
    assert rejects.items[1]["reason"].startswith("broken JSON in 'tools'")
    assert rejects.items[2]["reason"].startswith("bad call arguments:") and "array" in rejects.items[2]["reason"]
    assert rejects.items[1]["data"] == broken


# ---------------------------------------------------------------------------------------------- glaive

def test_glaive_sample_counts_and_reject_reasons():
    examples, rejects = load(load_glaive, GLAIVE)
    assert (len(examples), len(rejects)) == (26, 10)
    kinds = {row: reason.split(":")[0] for row, reason in rejects.items()}
    assert kinds == {
        24: "broken JSON in call arguments",  # Infinity
        25: "broken JSON in call arguments",  # unquoted placeholder
        26: "bad call arguments",  # a JSON array
        27: "bad call",  # "parameters" instead of "arguments"
        28: "truncated turn",
        30: "function response without a call",  # 'AI to=' syntax
        31: "text before <functioncall>",
        32: "undeclared function",
        33: "consecutive assistant turns",  # stray <|endoftext|>
        34: "bad call arguments",  # null
    }
    assert "Infinity" in rejects[24] and "'parameters' instead of 'arguments'" in rejects[27]
    assert "null" in rejects[34] and "create_to_do_list" in rejects[32]


def test_glaive_calls_and_function_responses():
    examples, _ = load(load_glaive, GLAIVE)
    news = examples[1]  # real row
    assert [m.role for m in news.messages] == ["system", "user", "assistant", "tool", "assistant",
                                               "user", "assistant", "tool", "assistant"]
    assert news.messages[0].content == ("You are a helpful assistant with access to the following functions. "
                                        "Use them if required -")
    assert calls(news.messages[2]) == [("get_news_headlines", {"country": "United States"})]
    assert calls(news.messages[6]) == [("get_news_headlines", {"country": "France"})]
    tool = news.messages[7]
    assert (tool.tool_call_id, tool.name) == ("call_1", "get_news_headlines")
    assert tool.content.startswith('{"headlines": ["France recalls ambassadors')
    assert not news.messages[8].content.endswith("<|endoftext|>")
    assert news.tools[0].function.parameters["required"] == ["country"]
    assert calls(examples[19].messages[2]) == [("get_lyrics", {"title": "Shape of You", "artist": "Ed Sheeran"})]
    assert calls(examples[20].messages[2])[0][1]["message"] == "Hey, let's meet at 6."
    assert calls(examples[18].messages[2]) == [("generate_random_id", {})]  # arguments as a JSON object
    assert examples[21].tools[0].function.parameters == {"type": "object", "properties": {}}


def test_glaive_repairs_and_duplicates():
    examples, _ = load(load_glaive, GLAIVE)
    assert calls(examples[23].messages[2]) == [("analyze_sentiment", {"text": "life's full of surprises"})]
    assert examples[23].meta["repairs"] == ["read \\' in call arguments as '"]
    assert calls(examples[29].messages[2])[0][1]["subject"] == "Agenda"
    assert examples[29].meta["repairs"] == ["dropped 1 extra closing brace(s) after the call"]
    dup = examples[35]
    assert [t.name for t in dup.tools] == ["convert_currency"]
    assert "from" in dup.tools[0].function.parameters["properties"]  # the first definition is kept
    dropped = dup.meta["dropped_duplicate_tools"]
    assert "from_currency" in dropped[0]["function"]["parameters"]["properties"]


def test_glaive_no_function_rows_and_user_endings():
    examples, _ = load(load_glaive, GLAIVE)
    plain = examples[6]  # real row 107105: '\n\n' separators
    assert plain.tools == []
    assert [(m.role, m.content) for m in plain.messages] == [
        ("system", "You are a helpful assistant, with no access to external functions."),
        ("user", "Assign this occupation to the appropriate category\nNurse"),
        ("assistant", "Healthcare"), ("user", "What about an electrician?"), ("assistant", "Skilled Trades")]
    assert examples[12].messages[-1].role == "user" and examples[15].messages[-1].content == "And a dolphin?"
    assert "```python" in examples[14].messages[2].content


def test_glaive_missing_column_and_bad_row(tmp_path):
    with pytest.raises(SourceError, match="'chat'") as err:
        load_glaive(write_json(tmp_path / "g.json", [{"system": "SYSTEM: hi"}]))
    assert "g.json" in str(err.value)
    good = json.loads(GLAIVE.read_text())[7]
    bad = dict(good, chat=good["chat"].replace("<functioncall> ", "<functioncall> oops "))
    rejects = Rejects()
    examples = load_glaive(write_json(tmp_path / "g.json", [good, bad]), rejects=rejects)
    assert len(examples) == 1
    assert rejects.items[0]["row"] == 1 and rejects.items[0]["reason"].startswith("unparseable call:")


# ------------------------------------------------------------------------------------- llama_functions

def test_llama_functions_sample_counts():
    examples, rejects = load(load_llama_functions, LLAMA)
    assert (len(examples), len(rejects)) == (28, 0)


def test_llama_functions_real_row():
    examples, _ = load(load_llama_functions, LLAMA)
    real = examples[0]
    assert real.messages[0].content.startswith("You may answer by calling one of the following functions.")
    assert real.messages[1].content.startswith("Hey, how's it going? I just finished a quiz")
    assert calls(real.messages[2]) == [("computeQuizScore", {
        "answers": [{"questionId": 1, "selectedOption": "B"}, {"questionId": 2, "selectedOption": "C"}],
        "totalQuestions": 2})]
    quiz = {t.name: t for t in real.tools}["computeQuizScore"].function.parameters
    assert quiz["required"] == ["answers"]
    assert quiz["properties"]["totalQuestions"] == {
        "description": "The total number of questions in the quiz.", "minimum": 1, "type": "number"}
    assert quiz["properties"]["answers"]["items"]["properties"]["selectedOption"]["enum"] == ["A", "B", "C", "D"]
    cooking = {t.name: t for t in real.tools}["calculate_cooking_time"].function.parameters
    assert cooking["required"] == ["recipeName"]


def test_llama_functions_history_text_answers_and_guanaco():
    examples, _ = load(load_llama_functions, LLAMA)
    history = examples[20]
    assert [m.role for m in history.messages] == ["system", "user", "assistant", "user", "assistant", "user",
                                                  "assistant"]
    assert calls(history.messages[2]) == [("getCurrentWeather", {"location": "Oslo, Norway"})]
    assert history.messages[4].content == "I can check that for you as well."
    assert [c.id for c in history.messages[6].tool_calls] == ["call_1"]
    assert examples[16].messages[-1].content.startswith("Sure, I can help you track your package.")
    assert examples[16].messages[-1].content.endswith("tracking number?")
    guanaco = examples[25]
    assert guanaco.tools == [] and [m.role for m in guanaco.messages] == ["user", "assistant", "user", "assistant"]
    assert guanaco.messages[1].content.startswith("1. Practice a little every day.\n2.")
    assert examples[27].messages[1].content == "日本の首都は東京です。"


def test_llama_functions_prompt_response_csv(tmp_path):
    rows = [json.loads(line) for line in LLAMA.read_text().splitlines()[:6]]
    path = tmp_path / "prompt_response.csv"
    with path.open("w", newline="", encoding="utf-8") as f:  # as seed 003 writes it
        writer = csv.DictWriter(f, fieldnames=["prompt", "response"])
        writer.writeheader()
        for row in rows:
            writer.writerow({"prompt": row["input"], "response": row["output"]})
    from_csv = load_llama_functions(path)
    from_jsonl = load_llama_functions(LLAMA, limit=6)
    assert [e.messages for e in from_csv] == [e.messages for e in from_jsonl]
    assert [e.tools for e in from_csv] == [e.tools for e in from_jsonl]


def test_llama_functions_missing_column_and_bad_rows(tmp_path):
    with pytest.raises(SourceError, match="'output'") as err:
        load_llama_functions(write_jsonl(tmp_path / "l.jsonl", [{"input": "[INST] hi [/INST]"}]))
    assert "l.jsonl" in str(err.value)
    good = json.loads(LLAMA.read_text().splitlines()[0])
    undeclared = dict(good, output=' {"function_call":{"name":"nope","arguments":{}}} ')
    broken = dict(good, input=good["input"].replace('{"functions":[', '{"functions":[[', 1))
    rejects = Rejects()
    examples = load_llama_functions(write_jsonl(tmp_path / "l.jsonl", [good, undeclared, broken]), rejects=rejects)
    assert len(examples) == 1
    assert [(item["row"], item["reason"].split(":")[0]) for item in rejects.items] == [
        (1, "undeclared function"), (2, "broken functions JSON")]


# ---------------------------------------------------------------------------------------------- Hermes

def test_hermes_sample_counts_and_reject_reasons():
    examples, rejects = load(load_hermes, HERMES)
    assert (len(examples), len(rejects)) == (25, 3)
    assert rejects[14].startswith("undeclared function: call to 'ExpertQAExtractor'")
    assert "does not parse" in rejects[14]  # tools == "[]", system block unbalanced
    assert rejects[15].startswith("tool turn without a call:")
    assert rejects[25].startswith("undeclared function: call to 'get_movie_details'")


def test_hermes_older_revision_rows():
    examples, _ = load(load_hermes, HERMES)
    flights = examples[0]  # card example 1: tools only in the system prompt, Python literals
    assert [t.name for t in flights.tools] == ["search_flights"]
    assert flights.tools[0].function.parameters["properties"]["class"]["enum"] == ["economy", "business", "first"]
    assert calls(flights.messages[2])[0][1]["flexible_cancellation"] is True
    system = flights.messages[0].content
    assert "search_flights" not in system and "For each function call return a json object" in system
    assert "within <tools> </tools> XML tags" in system  # the prose mention stays
    tool = flights.messages[3]
    assert (tool.role, tool.tool_call_id, tool.name) == ("tool", "call_0", "search_flights")
    assert json.loads(tool.content)["flights"][0]["flight_number"] == "AA118"
    extraction = examples[1]  # card example 2: name nested in arguments, literal \n, Python quotes
    (name, arguments), = calls(extraction.messages[2])
    assert name == "ExpertQAExtractor" and len(arguments["queries"]) == 3
    assert "lifted 'name' out of the call's arguments" in extraction.meta["repairs"]


def test_hermes_parallel_calls_and_responses():
    examples, _ = load(load_hermes, HERMES)
    weather = examples[9]
    assert [c.id for c in weather.messages[2].tool_calls] == ["call_0", "call_1"]
    tools = [m for m in weather.messages if m.role == "tool"]
    assert [(m.tool_call_id, json.loads(m.content)["city"]) for m in tools] == [("call_0", "Paris"),
                                                                               ("call_1", "New York")]
    assert calls(examples[3].messages[2])[2] == ("get_current_weather", {"city": "Kraków", "unit": "celsius"})
    assert calls(examples[26].messages[2])[0][1]["address"] == "東京都千代田区丸の内1丁目"
    assert examples[2].meta["id"] == "9e056d50-d6e0-5c09-ba24-9fac3ba3f11a"


def test_hermes_quirks_that_are_kept():
    examples, _ = load(load_hermes, HERMES)
    joke = {t.name: t for t in examples[24].tools}["get_random_joke"]  # unwrapped, parameters null
    assert joke.function.parameters == {"type": "object", "properties": {}}
    assert [t.name for t in examples[23].tools] == ["convert_temperature"]
    assert examples[23].meta["dropped_duplicate_tools"][0]["function"]["parameters"]["required"] == ["value", "scale"]
    assert examples[18].tools == [] and examples[18].messages[0].content.startswith("You are a helpful assistant")
    assert examples[22].messages[-1].role == "user"


def test_hermes_missing_column_and_bad_row(tmp_path):
    with pytest.raises(SourceError, match="'conversations'") as err:
        load_hermes(write_json(tmp_path / "h.json", [{"id": "x", "tools": "[]"}]))
    assert "h.json" in str(err.value)
    good = json.loads(HERMES.read_text())[6]
    bad = dict(good, conversations=good["conversations"] + [{"from": "narrator", "value": "..."}])
    rejects = Rejects()
    examples = load_hermes(write_json(tmp_path / "h.json", [good, bad]), rejects=rejects)
    assert len(examples) == 1
    assert rejects.items[0]["row"] == 1
    assert rejects.items[0]["reason"] == "bad turn: conversations[3] has unknown 'from' 'narrator'"


# ------------------------------------------------------------------------------------------ OpenAI JSONL

def test_openai_jsonl_round_trips_canonical_examples(tmp_path):
    originals = load_hermes(HERMES) + load_glaive(GLAIVE)
    rows = []
    for k, example in enumerate(originals):
        messages = example.messages_as_dicts()
        if k % 2:  # the wire form: arguments as JSON strings
            messages = [dict(m, tool_calls=[c.to_openai() for c in example.messages[j].tool_calls])
                        if m.get("tool_calls") else m for j, m in enumerate(messages)]
        rows.append({"messages": messages, "tools": example.tools_as_dicts()})
    assert isinstance(rows[1]["messages"][2]["tool_calls"][0]["function"]["arguments"], str)
    rejects = Rejects()
    back = load_openai_jsonl(write_jsonl(tmp_path / "o.jsonl", rows), rejects=rejects)
    assert len(rejects) == 0
    assert [(e.messages, e.tools) for e in back] == [(e.messages, e.tools) for e in originals]


def test_openai_jsonl_rejects_and_extras(tmp_path):
    tool = {"type": "function", "function": {"name": "f", "parameters": {"type": "object", "properties": {}}}}
    call = {"id": "c1", "type": "function", "function": {"name": "f", "arguments": '{"x": 1}'}}
    good = {"id": "r0", "tools": [tool], "messages": [
        {"role": "user", "content": [{"type": "text", "text": "hi "}, {"type": "text", "text": "there"}]},
        {"role": "assistant", "content": None, "tool_calls": [call], "weight": 1},
        {"role": "tool", "tool_call_id": "c1", "content": "42"}]}
    empty_assistant = {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant"}]}
    undeclared = {"tools": [tool], "messages": [{"role": "user", "content": "hi"}, {
        "role": "assistant", "tool_calls": [dict(call, function={"name": "g", "arguments": {}})]}]}
    dangling = {"messages": [{"role": "user", "content": "hi"}, {"role": "tool", "tool_call_id": "zz", "content": "1"}]}
    path = write_jsonl(tmp_path / "o.jsonl", [good, empty_assistant, undeclared, dangling])
    with path.open("a") as f:
        f.write("{not json\n")
    rejects = Rejects()
    examples = load_openai_jsonl(path, rejects=rejects)
    assert len(examples) == 1
    example = examples[0]
    assert example.messages[0].content == "hi there"
    assert calls(example.messages[1]) == [("f", {"x": 1})]
    assert example.meta == {"id": "r0"}
    assert [m.weight for m in example.messages] == [None, 1, None]  # the fine-tuning weight, on the message
    reasons = {item["row"]: item["reason"] for item in rejects.items}
    assert reasons[1].startswith("schema error: Example: messages[1]")
    assert "an assistant message needs content or tool_calls" in reasons[1]
    assert reasons[2].startswith("undeclared function: call to 'g'")
    assert reasons[3].startswith("dangling tool_call_id: messages[1] answers 'zz'")
    assert reasons[4].startswith("not JSON: the line does not parse")
    assert rejects.items[-1]["data"] == "{not json"


def test_openai_jsonl_layout_errors(tmp_path):
    with pytest.raises(SourceError, match="'messages'") as err:
        load_openai_jsonl(write_jsonl(tmp_path / "o.jsonl", [{"conversation": []}]))
    assert "o.jsonl" in str(err.value)
    with pytest.raises(SourceError, match=r"row 1.*not a JSON object"):
        load_openai_jsonl(write_jsonl(tmp_path / "o.jsonl", [{"messages": []}, [1, 2]]))
    with pytest.raises(SourceError, match="file is empty"):
        (tmp_path / "empty.jsonl").write_text("")
        load_openai_jsonl(tmp_path / "empty.jsonl")
