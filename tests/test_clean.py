"""Tests of `calltune.sources.clean`: each rule on hand-made examples, then the whole cleaning on the
real-format samples in ../shared/data/samples.

Expected sample counts were checked by reading the rows (see PROVENANCE.md there): xLAM row 27 is
the authored ``answers == "[]"`` row (empty assistant turn), xLAM row 28 has ``"42"`` for an ``int``,
xLAM row 6 (real) omits ``speed_of_light`` which has a default, glaive row 35 declares
``convert_currency`` twice and calls the second definition, glaive rows 12 and 15 and Hermes row 22
end on a user turn, and Hermes row 1 (the dataset card's extraction example) passes ``queries``
where its tool requires ``application_questions``.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from pydantic import ValidationError

from calltune.schema import Example, Message, Tool, ToolCall
from calltune.sources import load_source
from calltune.sources.base import Rejects, SourceError
from calltune.sources.clean import (CleanConfig, call_category, canonical_key, clean, clean_command,
                                    count_categories, is_multi_turn, max_kept_no_call, read_jsonl, split_validation,
                                    write_jsonl)

SAMPLES = Path(__file__).resolve().parents[2] / "shared" / "data" / "samples"
FILES = {"xlam": "xlam_function_calling_60k.json", "glaive": "glaive-function-calling-v2.json",
         "llama_functions": "llama_functions.jsonl", "hermes": "hermes-function-calling-v1.json"}

SCHEMA = {"type": "object", "required": ["n"], "properties": {
    "n": {"type": "integer"}, "x": {"type": "number"}, "flag": {"type": "boolean"}, "name": {"type": "string"},
    "either": {"type": ["integer", "string"]},
    "opts": {"type": "object", "properties": {"k": {"type": "integer"}}},
    "ids": {"type": "array", "items": {"type": "integer"}}}}


def tool(name="f", parameters=None) -> Tool:
    return Tool(function={"name": name, "parameters": SCHEMA if parameters is None else parameters})


def user(text="hi") -> Message:
    return Message(role="user", content=text)


def said(text="ok") -> Message:
    return Message(role="assistant", content=text)


def calls(*pairs) -> Message:
    return Message(role="assistant", tool_calls=[ToolCall.of(name, args, f"call_{i}") for i, (name, args) in enumerate(pairs)])


def result(text="{}") -> Message:
    return Message(role="tool", content=text, tool_call_id="call_0")


def ex(*messages, tools=None, row=0, meta=None) -> Example:
    return Example(messages=list(messages), tools=[tool()] if tools is None else tools, source="hand.json", row=row,
                   meta=meta or {})


def only(rules: dict) -> CleanConfig:
    """A config with every rule off except `rules` (so each test sees one rule)."""
    off = dict(trailing_user="keep", drop_empty_assistant=False, validate_calls=False, coerce_types=False,
               parse_nested_json=False, defaults_optional=False, resolve_duplicate_tools=False, dedupe=False)
    return CleanConfig(**{**off, **rules})


def run(examples, cfg):
    rejects = Rejects()
    res = clean(examples, cfg, rejects)
    return res, rejects


def args_of(example, k=-1, j=0):
    return example.messages[k].tool_calls[j].arguments


# --------------------------------------------------------------------------------------------- config

def test_config_forbids_unknown_keys_and_documents_every_field():
    with pytest.raises(ValidationError):
        CleanConfig(remove_no_fc=True)
    with pytest.raises(ValidationError):
        CleanConfig(max_no_call_fraction=1.5)
    assert all(f.description for f in CleanConfig.model_fields.values())


# --------------------------------------------------------------------------------------------- validation

def test_coercion_repairs_strings_and_records_them():
    original = ex(user(), calls(("f", {"n": "42", "x": "3.5", "flag": "TRUE", "ids": ["1", "-2"], "name": "7"})))
    res, rejects = run([original], only({"validate_calls": True, "coerce_types": True}))
    assert len(rejects) == 0
    assert args_of(res.examples[0]) == {"n": 42, "x": 3.5, "flag": True, "ids": [1, -2], "name": "7"}
    assert res.examples[0].meta["repairs"] == [
        "coerced messages[1].tool_calls[0].arguments.n: '42' -> 42 (integer)",
        "coerced messages[1].tool_calls[0].arguments.x: '3.5' -> 3.5 (number)",
        "coerced messages[1].tool_calls[0].arguments.flag: 'TRUE' -> true (boolean)",
        "coerced messages[1].tool_calls[0].arguments.ids[0]: '1' -> 1 (integer)",
        "coerced messages[1].tool_calls[0].arguments.ids[1]: '-2' -> -2 (integer)",
    ]
    assert res.report["repairs"] == {"coerced integer": 3, "coerced number": 1, "coerced boolean": 1}
    assert res.report["repaired_examples"] == 1
    assert args_of(original)["n"] == "42" and "repairs" not in original.meta  # the input is not modified


def test_coercion_leaves_strings_a_schema_allows_and_refuses_unsafe_ones():
    kept = ex(user(), calls(("f", {"n": 1, "either": "42", "x": "3"})))
    res, rejects = run([kept], only({"validate_calls": True, "coerce_types": True}))
    assert args_of(res.examples[0]) == {"n": 1, "either": "42", "x": 3}
    for bad in ("forty-two", "4.5", "1e3", ""):
        res, rejects = run([ex(user(), calls(("f", {"n": bad})))], only({"validate_calls": True, "coerce_types": True}))
        assert res.examples == [] and rejects.items[0]["reason"].startswith("schema violation: messages[1].tool_calls[0] (f):")
        assert rejects.items[0]["reason"].endswith("(at arguments.n)")


def test_without_coercion_a_string_for_an_integer_is_rejected():
    res, rejects = run([ex(user(), calls(("f", {"n": "42"})))], only({"validate_calls": True}))
    assert res.examples == []
    assert rejects.items[0]["reason"] == "schema violation: messages[1].tool_calls[0] (f): '42' is not of type 'integer' (at arguments.n)"
    assert rejects.items[0]["stage"] == "clean" and rejects.items[0]["row"] == 0 and rejects.items[0]["source"] == "hand.json"
    assert res.report["rejected"] == {"schema violation": 1}


def test_nested_json_strings_are_parsed_where_the_schema_wants_object_or_array():
    e = ex(user(), calls(("f", {"n": 1, "opts": '{"k": "3"}', "ids": "[1, 2]", "name": "[not parsed]"})))
    res, _ = run([e], only({"validate_calls": True, "parse_nested_json": True, "coerce_types": True}))
    assert args_of(res.examples[0]) == {"n": 1, "opts": {"k": 3}, "ids": [1, 2], "name": "[not parsed]"}
    assert res.report["repairs"] == {"parsed nested JSON": 2, "coerced integer": 1}
    # a JSON string of the wrong kind (array where an object is wanted) is not "repaired"
    res, rejects = run([ex(user(), calls(("f", {"n": 1, "opts": "[1]"})))], only({"validate_calls": True, "parse_nested_json": True}))
    assert res.examples == [] and "(at arguments.opts)" in rejects.items[0]["reason"]
    res, rejects = run([e], only({"validate_calls": True}))
    assert res.examples == [] and rejects.items[0]["reason"].startswith("schema violation")


def test_call_to_undeclared_tool_is_rejected_unless_validation_is_off():
    e = ex(user(), calls(("g", {})), tools=[tool("f"), tool("h")])
    res, rejects = run([e], only({"validate_calls": True}))
    assert rejects.items[0]["reason"] == ("undeclared tool: messages[1].tool_calls[0] calls 'g', but the example "
                                          "declares ['f', 'h']")
    res, rejects = run([e], only({}))
    assert len(res.examples) == 1 and len(rejects) == 0


def test_invalid_tool_schema_is_rejected():
    e = ex(user(), calls(("f", {"a": 1})), tools=[tool("f", {"type": "object", "properties": {"a": {"type": "nonsense"}}})])
    res, rejects = run([e], only({"validate_calls": True}))
    assert res.examples == [] and rejects.items[0]["reason"].startswith("invalid tool schema: tool 'f':")


def test_parameter_with_default_may_be_omitted():
    params = {"type": "object", "required": ["a", "b"], "properties": {"a": {"type": "integer"},
                                                                       "b": {"type": "integer", "default": 3}}}
    e = ex(user(), calls(("f", {"a": 1})), tools=[tool("f", params)])
    res, _ = run([e], only({"validate_calls": True, "defaults_optional": True}))
    assert len(res.examples) == 1
    res, rejects = run([e], only({"validate_calls": True}))
    assert rejects.items[0]["reason"] == "schema violation: messages[1].tool_calls[0] (f): 'b' is a required property (at arguments)"


def test_duplicate_tool_definition_the_calls_fit_replaces_the_first():
    first = tool("convert", {"type": "object", "required": ["from"], "properties": {"from": {"type": "string"}}})
    second = tool("convert", {"type": "object", "required": ["src"], "properties": {"src": {"type": "string"}}})
    e = ex(user(), calls(("convert", {"src": "USD"})), tools=[first], meta={"dropped_duplicate_tools": [second.to_dict()]})
    res, _ = run([e], only({"validate_calls": True, "resolve_duplicate_tools": True}))
    assert res.examples[0].tools == [second]
    assert res.examples[0].meta["dropped_duplicate_tools"] == [first.to_dict()]
    assert res.examples[0].meta["repairs"] == ["chose definition 2 of 'convert': its calls do not fit the first"]
    res, rejects = run([e], only({"validate_calls": True}))
    assert res.examples == [] and "'from' is a required property" in rejects.items[0]["reason"]


def test_unknown_argument_rejected_only_when_asked():
    e = ex(user(), calls(("f", {"n": 1, "zzz": 2})))
    res, _ = run([e], only({"validate_calls": True}))
    assert len(res.examples) == 1
    res, rejects = run([e], only({"validate_calls": True, "reject_unknown_arguments": True}))
    assert rejects.items[0]["reason"].startswith("unknown argument: messages[1].tool_calls[0] (f) passes ['zzz']")


def test_every_assistant_turn_is_validated_not_only_the_last():
    e = ex(user(), calls(("f", {"n": "x"})), result(), said("done"))
    res, rejects = run([e], only({"validate_calls": True}))
    assert res.examples == [] and "messages[1].tool_calls[0]" in rejects.items[0]["reason"]


# --------------------------------------------------------------------------------------------- endings

def test_trailing_user_keep_drop_trim():
    ends_user = ex(user("a"), said("b"), user("c"))
    ends_tool = ex(user("a"), calls(("f", {"n": 1})), result(), row=1)
    no_answer = ex(user("a"), row=2)
    res, rejects = run([ends_user, ends_tool, no_answer], only({"trailing_user": "keep"}))
    assert len(res.examples) == 3
    res, rejects = run([ends_user, ends_tool, no_answer], only({"trailing_user": "drop"}))
    assert res.examples == []
    assert [r["reason"] for r in rejects.items] == [
        "ends on user turn: the last turn is messages[2] (user)",
        "ends on tool turn: the last turn is messages[2] (tool)",
        "ends on user turn: the last turn is messages[0] (user)"]
    res, rejects = run([ends_user, ends_tool, no_answer], only({"trailing_user": "trim"}))
    assert [[m.role for m in e.messages] for e in res.examples] == [["user", "assistant"], ["user", "assistant"]]
    assert res.examples[0].meta["repairs"] == ["trimmed 1 turn(s) after the last assistant turn"]
    assert res.report["trimmed"] == 2 and res.report["rejected"] == {"no assistant turn": 1}
    assert rejects.items[0]["row"] == 2 and len(ends_user.messages) == 3


def test_empty_assistant_turn_is_rejected():
    e = ex(user(), said(""))
    res, rejects = run([e], only({"drop_empty_assistant": True}))
    assert rejects.items[0]["reason"] == "empty assistant turn: messages[1] has neither tool calls nor text"
    res, _ = run([e], only({}))
    assert len(res.examples) == 1


# --------------------------------------------------------------------------------------------- dedupe

def test_dedupe_keeps_the_first_and_names_it():
    a = ex(user("x"), calls(("f", {"n": 1})), row=3)
    b = ex(user("x"), calls(("f", {"n": 1})), row=8, meta={"id": "other"})  # same content, other row/meta
    c = ex(user("x"), calls(("f", {"n": 1})), tools=[tool(), tool("g")], row=9)  # other tools: not a duplicate
    res, rejects = run([a, b, c], only({"dedupe": True}))
    assert [e.row for e in res.examples] == [3, 9]
    assert rejects.items == [{"source": "hand.json", "row": 8, "stage": "clean",
                              "reason": "duplicate: same messages and tools as hand.json, row 3",
                              "data": json.loads(b.to_json())}]
    assert canonical_key(a) == canonical_key(b) != canonical_key(c)


def test_dedupe_compares_after_repairs():
    a = ex(user("x"), calls(("f", {"n": 1})), row=0)
    b = ex(user("x"), calls(("f", {"n": "1"})), row=1)
    res, _ = run([a, b], only({"dedupe": True}))
    assert len(res.examples) == 2
    res, rejects = run([a, b], only({"dedupe": True, "validate_calls": True, "coerce_types": True}))
    assert [e.row for e in res.examples] == [0] and rejects.items[0]["reason"].startswith("duplicate")


# --------------------------------------------------------------------------------------------- categories

def test_categories():
    no_call = ex(user(), said())
    single = ex(user(), calls(("f", {"n": 1})), result(), said())
    parallel = ex(user(), calls(("f", {"n": 1}), ("f", {"n": 2})))
    sequential = ex(user(), calls(("f", {"n": 1})), result(), calls(("f", {"n": 2})))
    two_users = ex(user(), said(), user(), calls(("f", {"n": 1})))
    assert [call_category(e) for e in (no_call, single, parallel, sequential, two_users)] == [
        "no_call", "single_call", "parallel_call", "sequential_call", "single_call"]
    assert [is_multi_turn(e) for e in (no_call, single, parallel, sequential, two_users)] == [False, True, False, True, True]
    assert count_categories([no_call, single, parallel, sequential, two_users]) == {
        "no_call": 1, "single_call": 2, "parallel_call": 1, "sequential_call": 1, "multi_turn": 3}


# --------------------------------------------------------------------------------------------- no-call rules

def test_remove_no_call():
    examples = [ex(user(), said(), row=0), ex(user(), calls(("f", {"n": 1})), row=1)]
    res, rejects = run(examples, only({"remove_no_call": True}))
    assert [e.row for e in res.examples] == [1]
    assert rejects.items[0]["reason"] == "no call: no assistant turn calls a tool (remove_no_call)"
    assert res.report["categories_before"]["no_call"] == 1 and res.report["categories_after"]["no_call"] == 0


@pytest.mark.parametrize("n_call, n_no_call, fraction, expected", [
    (6, 4, 0.25, 2),    # 2/8 = 0.25; 3/9 > 0.25
    (3, 10, 0.5, 3),    # 3/6
    (0, 5, 0.5, 0),     # any no-call example would be 100%
    (5, 5, 1.0, 5),
    (5, 5, 0.0, 0),
    (19, 9, 0.2, 4),    # 4/23 = 0.17; 5/24 = 0.208
    (9, 1, 0.1, 1),     # 1/10 exactly
])
def test_max_kept_no_call(n_call, n_no_call, fraction, expected):
    assert max_kept_no_call(n_call, n_no_call, fraction) == expected


def test_balance_drops_a_seeded_choice_of_no_call_examples():
    examples = [ex(user(f"c{i}"), calls(("f", {"n": i})), row=i) for i in range(6)]
    examples += [ex(user(f"t{i}"), said(), row=10 + i) for i in range(4)]
    res, rejects = run(examples, only({"max_no_call_fraction": 0.25, "seed": 1}))
    kept_rows = [e.row for e in res.examples]
    assert len(res.examples) == 8 and kept_rows[:6] == list(range(6))
    assert res.report["rejected"] == {"balance": 2}
    assert rejects.items[0]["reason"] == "balance: no-call examples limited to a share of 0.25 (kept 2 of 4)"
    assert {r["row"] for r in rejects.items} | set(kept_rows[6:]) == {10, 11, 12, 13}
    again, _ = run(examples, only({"max_no_call_fraction": 0.25, "seed": 1}))
    assert [e.row for e in again.examples] == kept_rows
    choices = {tuple(e.row for e in run(examples, only({"max_no_call_fraction": 0.25, "seed": s}))[0].examples)
               for s in range(10)}
    assert len(choices) > 1  # the seed decides which ones stay


# --------------------------------------------------------------------------------------------- split and files

def test_split_validation_is_seeded_disjoint_and_ordered():
    examples = [ex(user(str(i)), said(), row=i) for i in range(25)]
    train, val = split_validation(examples, 0.1, seed=0)
    assert len(val) == 3 and len(train) == 22  # round(2.5) halves up
    assert sorted(e.row for e in train + val) == list(range(25))
    assert [e.row for e in train] == sorted(e.row for e in train) and [e.row for e in val] == sorted(e.row for e in val)
    assert [e.row for e in split_validation(examples, 0.1, seed=0)[1]] == [e.row for e in val]
    assert len({tuple(e.row for e in split_validation(examples, 0.1, seed=s)[1]) for s in range(10)}) > 1
    assert split_validation(examples, 0.0) == (examples, [])
    assert [len(x) for x in split_validation(examples[:1], 0.5)] == [1, 0]  # training keeps at least one
    with pytest.raises(ValueError, match=r"\[0, 1\)"):
        split_validation(examples, 1.0)


def test_canonical_jsonl_round_trip_on_every_sample(tmp_path):
    examples = []
    for name, file in FILES.items():
        examples += load_source(name, SAMPLES / file)
    path = write_jsonl(examples, tmp_path / "sub" / "all.jsonl")
    assert len(path.read_text(encoding="utf-8").splitlines()) == 114
    assert read_jsonl(path) == examples


def test_read_jsonl_names_the_bad_line(tmp_path):
    path = tmp_path / "bad.jsonl"
    good = ex(user(), said()).to_json()
    path.write_text(good + "\n\n" + "{oops\n", encoding="utf-8")
    with pytest.raises(SourceError, match=r"bad.jsonl, row 2: line 3 is not JSON"):
        read_jsonl(path)
    path.write_text(good + "\n" + json.dumps({"messages": []}) + "\n", encoding="utf-8")
    with pytest.raises(SourceError, match=r"line 2 is not a canonical example: Example: messages"):
        read_jsonl(path)


# --------------------------------------------------------------------------------------------- real samples

def load(name):
    rejects = Rejects()
    return load_source(name, SAMPLES / FILES[name], rejects=rejects), rejects


EXPECTED = {  # default CleanConfig on each sample; see the module docstring for which rows and why
    "xlam": dict(input=35, kept=34, rejected={"empty assistant turn": 1}, trimmed=0, repaired_examples=1,
                 repairs={"coerced integer": 1},
                 before={"no_call": 1, "single_call": 20, "parallel_call": 14, "sequential_call": 0, "multi_turn": 0},
                 after={"no_call": 0, "single_call": 20, "parallel_call": 14, "sequential_call": 0, "multi_turn": 0},
                 rejected_rows=[27]),
    "glaive": dict(input=26, kept=26, rejected={}, trimmed=2, repaired_examples=3,
                   repairs={"trimmed trailing turns": 2, "chose duplicate tool definition": 1},
                   before={"no_call": 6, "single_call": 16, "parallel_call": 0, "sequential_call": 4, "multi_turn": 23},
                   after={"no_call": 6, "single_call": 16, "parallel_call": 0, "sequential_call": 4, "multi_turn": 22},
                   rejected_rows=[]),
    "llama_functions": dict(input=28, kept=28, rejected={}, trimmed=0, repaired_examples=0, repairs={},
                            before={"no_call": 9, "single_call": 17, "parallel_call": 0, "sequential_call": 2,
                                    "multi_turn": 4},
                            after={"no_call": 9, "single_call": 17, "parallel_call": 0, "sequential_call": 2,
                                   "multi_turn": 4},
                            rejected_rows=[]),
    "hermes": dict(input=25, kept=24, rejected={"schema violation": 1}, trimmed=1, repaired_examples=1,
                   repairs={"trimmed trailing turns": 1},
                   before={"no_call": 3, "single_call": 14, "parallel_call": 5, "sequential_call": 3, "multi_turn": 13},
                   after={"no_call": 3, "single_call": 13, "parallel_call": 5, "sequential_call": 3, "multi_turn": 13},
                   rejected_rows=[1]),
}


@pytest.mark.parametrize("name", list(EXPECTED))
def test_default_cleaning_of_the_samples(name):
    examples, rejects = load(name)
    n_load = len(rejects)
    res = clean(examples, CleanConfig(), rejects)
    want = EXPECTED[name]
    r = res.report
    assert (r["input"], r["kept"], r["rejected"], r["trimmed"]) == (want["input"], want["kept"], want["rejected"], want["trimmed"])
    assert (r["repaired_examples"], r["repairs"]) == (want["repaired_examples"], want["repairs"])
    assert r["categories_before"] == want["before"] and r["categories_after"] == want["after"]
    assert [item["row"] for item in rejects.items[n_load:]] == want["rejected_rows"]
    assert all(item["stage"] == "clean" for item in rejects.items[n_load:])


def test_sample_rows_each_rule_touches():
    xlam = {e.row: e for e in clean(load("xlam")[0]).examples}
    assert args_of(xlam[28]) == {"is_id": 42}  # "42" for an int, coerced
    assert [c.name for c in xlam[6].messages[-1].tool_calls] == ["find_peak_element", "light_travel_time"]
    glaive_examples, _ = load("glaive")
    glaive = {e.row: e for e in clean(glaive_examples).examples}
    assert [m.role for m in glaive[15].messages] == ["system", "user", "assistant"]
    assert glaive[15].messages[-1].content == [m for m in glaive_examples if m.row == 15][0].messages[2].content
    assert set(glaive[35].tools[0].function.parameters["properties"]) == {"amount", "from_currency", "to_currency"}
    hermes_rejects = Rejects()
    clean(load("hermes")[0], CleanConfig(), hermes_rejects)
    assert hermes_rejects.items[0]["reason"] == ("schema violation: messages[2].tool_calls[0] (ExpertQAExtractor): "
                                                 "'application_questions' is a required property (at arguments)")


def test_sample_without_the_repairs_rejects_more():
    cfg = CleanConfig(coerce_types=False, defaults_optional=False, resolve_duplicate_tools=False, trailing_user="drop")
    xlam = clean(load("xlam")[0], cfg).report
    assert xlam["rejected"] == {"empty assistant turn": 1, "schema violation": 2}  # rows 27; 6 and 28
    glaive = clean(load("glaive")[0], cfg).report
    assert glaive["rejected"] == {"ends on user turn": 2, "schema violation": 1}  # rows 12, 15; 35


def test_sample_no_call_rules_and_duplicates():
    llama, _ = load("llama_functions")
    res = clean(llama, CleanConfig(remove_no_call=True))
    assert res.report["kept"] == 19 and res.report["rejected"] == {"no call": 9}
    res = clean(llama, CleanConfig(max_no_call_fraction=0.2))
    assert res.report["kept"] == 23 and res.report["rejected"] == {"balance": 5}
    assert res.report["categories_after"]["no_call"] == 4
    rejects = Rejects()
    res = clean(llama + llama, CleanConfig(), rejects)  # the file loaded twice: the second copy is all duplicates
    assert res.report["kept"] == 28 and res.report["rejected"] == {"duplicate": 28}
    assert rejects.items[5]["row"] == 5 and rejects.items[5]["reason"].endswith("llama_functions.jsonl, row 5")


def test_clean_command_writes_train_val_and_rejects(tmp_path):
    out, val, rej = tmp_path / "train.jsonl", tmp_path / "val.jsonl", tmp_path / "rejects.jsonl"
    report = clean_command("hermes", SAMPLES / FILES["hermes"], out, val, rej, CleanConfig())
    assert (report["rows"], report["loaded"], report["kept"], report["train"], report["val"]) == (28, 25, 24, 22, 2)
    assert sum(report["load_rejected"].values()) == 3 and report["rejected"] == {"schema violation": 1}
    train, held = read_jsonl(out), read_jsonl(val)
    assert len(train) == 22 and len(held) == 2 and not {e.row for e in train} & {e.row for e in held}
    lines = [json.loads(line) for line in rej.read_text(encoding="utf-8").splitlines()]
    assert [item["stage"] for item in lines] == ["load"] * 3 + ["clean"]
    assert lines[-1]["row"] == 1
    report = clean_command("xlam", SAMPLES / FILES["xlam"], tmp_path / "x.jsonl", None, None, CleanConfig())
    assert (report["rows"], report["train"], report["val"]) == (35, 34, 0) and "val_output" not in report
    with pytest.raises(ValueError, match="Did you mean 'hermes'"):
        clean_command("hermez", SAMPLES / FILES["hermes"], tmp_path / "y.jsonl")


def test_a_dataset_schema_never_makes_calltune_fetch_or_open_a_reference(tmp_path):
    """A `$ref` to a URL or a file is a reject with its reason; a `$ref` inside the schema still resolves."""
    from calltune.evaluate.toolcall_metrics import schema_problems

    secret = tmp_path / "secret.json"
    secret.write_text('{"type": "integer"}')
    examples = []
    for i, ref in enumerate(["http://127.0.0.1:9/schema.json", secret.as_uri(), "#/$defs/n"]):
        tool = Tool(function={"name": "f", "parameters": {"type": "object", "properties": {"n": {"$ref": ref}},
                                                          "$defs": {"n": {"type": "integer"}}}})
        examples.append(Example(messages=[Message(role="user", content="go"),
                                          Message(role="assistant", tool_calls=[ToolCall.of("f", {"n": "x"})])],
                                tools=[tool], source="t", row=i))
    rejects = Rejects()
    result = clean(examples, CleanConfig(coerce_types=False), rejects)
    reasons = [item["reason"] for item in rejects.items]
    assert result.examples == [] and len(reasons) == 3
    assert "external $ref 'http://127.0.0.1:9/schema.json' is not resolved" in reasons[0]
    assert f"external $ref '{secret.as_uri()}' is not resolved" in reasons[1]
    assert "'x' is not of type 'integer'" in reasons[2]  # the internal reference was followed
    problems = schema_problems(examples[0].messages[1].tool_calls, examples[0].tools)
    assert len(problems) == 1 and "external $ref" in problems[0]
