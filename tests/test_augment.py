"""Data augmentation (`calltune.augment`) on real rows: BFCL's live categories and the shared samples."""

import json

import pytest
from typer.testing import CliRunner

from calltune.augment import AugmentConfig, augment
from calltune.augment.rules import call_error, join_requests, similar_names, trim_tools
from calltune.cli import app
from calltune.evaluate.toolcall_metrics import schema_problems
from calltune.sources import Rejects, load_source
from calltune.sources.bfcl import NO_CALL_REPLY
from calltune.sources.clean import clean, write_jsonl

from conftest import SAMPLES

ALL_RULES = {"irrelevance": {"count": 12}, "parallel": {"count": 8}, "parallel_multiple": {"count": 8},
             "distractors": {"count": 8}, "self_correction": {"count": 8}, "answer_after_results": {"count": 8}}


@pytest.fixture(scope="module")
def live():
    """Real BFCL live rows, cleaned: single calls (some repeated functions), multiple tools, no-call rows."""
    examples = load_source("bfcl", "live_simple,live_multiple,live_irrelevance", limit=80)
    return clean(examples).examples


@pytest.fixture(scope="module")
def samples():
    """xLAM and glaive sample rows, cleaned (the rules work on any source)."""
    examples = load_source("xlam", str(SAMPLES / "xlam_function_calling_60k.json"))
    examples += load_source("glaive", str(SAMPLES / "glaive-function-calling-v2.json"))
    return clean(examples).examples


def _trained_calls_valid(example):
    """Every call of a trained assistant turn validates against the example's tools (unknown arguments too)."""
    for message in example.messages:
        if message.role == "assistant" and message.weight != 0 and message.tool_calls:
            assert schema_problems(message.tool_calls, example.tools) == [], example.to_json()
            for call in message.tool_calls:
                assert set(call.arguments) <= set(next(t for t in example.tools if t.name == call.name)
                                                  .function.parameters.get("properties", {})), call


@pytest.mark.parametrize("pool", ["live", "samples"])
def test_every_rule_makes_valid_examples_that_record_their_origin(pool, request):
    examples = request.getfixturevalue(pool)
    rejects = Rejects()
    result = augment(examples, AugmentConfig(seed=3, **ALL_RULES), rejects)
    made = {rule: stats["made"] for rule, stats in result.report["rules"].items()}
    assert set(made) == set(ALL_RULES)
    # the samples hold no two requests for the same function, so `parallel` has nothing to join there
    assert all(n > 0 for rule, n in made.items() if not (pool == "samples" and rule == "parallel")), made
    origins = {(e.source, e.row) for e in examples}
    for example in result.new:
        info = example.meta["augment"]
        assert info["rule"] in ALL_RULES and example.source == f"augment:{info['rule']}"
        assert info["sources"] and all(tuple(s) in origins for s in info["sources"])
        _trained_calls_valid(example)
    # the counts add up
    report = result.report
    assert report["new"] == len(result.new) == sum(made.values())
    assert report["output"] == len(result.examples) == report["originals"] + report["new"]
    for rule, stats in report["rules"].items():
        assert stats["made"] + stats["rejected"] <= stats["asked"]
    assert sum(s["rejected"] for s in report["rules"].values()) == len(rejects)
    assert all(item["stage"] == "augment" for item in rejects.items)
    assert sum(report["categories_after"][c] for c in ("no_call", "single_call", "parallel_call",
                                                       "sequential_call")) == report["output"]


def test_augmentation_is_repeatable_under_a_seed(live):
    dump = lambda result: [e.to_json() for e in result.examples]  # noqa: E731
    first = augment(live, AugmentConfig(seed=5, max_tools=3, mix={"live_multiple": 20}, **ALL_RULES))
    again = augment(live, AugmentConfig(seed=5, max_tools=3, mix={"live_multiple": 20}, **ALL_RULES))
    other = augment(live, AugmentConfig(seed=6, max_tools=3, mix={"live_multiple": 20}, **ALL_RULES))
    assert dump(first) == dump(again)
    assert dump(first) != dump(other)
    assert [e.to_json() for e in live] == [e.to_json() for e in clean(load_source(
        "bfcl", "live_simple,live_multiple,live_irrelevance", limit=80)).examples]  # the input is not modified


def _by_rule(result, rule):
    found = [e for e in result.new if e.meta["augment"]["rule"] == rule]
    assert found, rule
    return found


def test_irrelevance_removes_the_needed_tool_and_answers_without_a_call(live):
    result = augment(live, AugmentConfig(irrelevance={"count": 20, "borrow": 0.5}))
    examples = _by_rule(result, "irrelevance")
    assert {e.meta["augment"]["tools_from"] for e in examples} == {"own", "borrowed"}
    for e in examples:
        removed = e.meta["augment"]["removed_tools"]
        assert e.tools and not any(similar_names(t.name, r) for t in e.tools for r in removed)
        final = e.messages[-1]
        assert final.role == "assistant" and not final.tool_calls and final.content == NO_CALL_REPLY


def test_parallel_rules_join_requests_and_their_calls(live):
    result = augment(live, AugmentConfig(parallel={"count": 10}, parallel_multiple={"count": 10, "max_calls": 3}))
    by_row = {(e.source, e.row): e for e in live}
    for rule in ("parallel", "parallel_multiple"):
        for e in _by_rule(result, rule):
            sources = [by_row[tuple(s)] for s in e.meta["augment"]["sources"]]
            calls = e.messages[-1].tool_calls
            assert len(calls) == len(sources) and 2 <= len(calls) <= (4 if rule == "parallel" else 3)
            assert [c.model_dump() for c in calls] == [s.messages[-1].tool_calls[0].model_dump() for s in sources]
            user = next(m for m in e.messages if m.role == "user").content
            assert all(s.messages[-1 - 1].content.strip()[1:] in user for s in sources)
            names = [c.name for c in calls]
            assert len(set(names)) == (1 if rule == "parallel" else len(names))
            assert {t.name for t in e.tools} >= set(names)


def test_distractors_add_tools_from_other_examples(live):
    result = augment(live, AugmentConfig(distractors={"count": 10, "min_tools": 2, "max_tools": 2}))
    by_row = {(e.source, e.row): e for e in live}
    for e in _by_rule(result, "distractors"):
        original = by_row[tuple(e.meta["augment"]["sources"][0])]
        added = e.meta["augment"]["added_tools"]
        assert len(added) == 2 and not set(added) & {t.name for t in original.tools}
        assert sorted(t.name for t in e.tools) == sorted([t.name for t in original.tools] + added)
        assert e.messages_as_dicts() == original.messages_as_dicts()


def test_self_correction_trains_only_the_corrected_call(live, tokenizer):
    from calltune.formats import get_format

    result = augment(live, AugmentConfig(self_correction={"count": 12}))
    examples = _by_rule(result, "self_correction")
    assert {e.meta["augment"]["broken"] for e in examples} == {"wrong_type", "missing_required", "unknown_argument"}
    fmt = get_format("hermes")
    for e in examples:
        user, broken, tool, fixed = e.messages[-4:]
        assert (user.role, broken.role, tool.role, fixed.role) == ("user", "assistant", "tool", "assistant")
        assert broken.weight == 0 and fixed.weight is None
        spec = next(t for t in e.tools if t.name == fixed.tool_calls[0].name)
        assert call_error(broken.tool_calls[0], spec) == json.loads(tool.content)["error"] == e.meta["augment"]["error"]
        assert call_error(fixed.tool_calls[0], spec) is None
        ids, mask = fmt.render(e, tokenizer)
        trained = tokenizer.decode([t for t, m in zip(ids, mask) if m])
        assert trained == fmt.assistant_text(fixed) + tokenizer.eos_token


def test_answer_after_results_states_the_result_in_text(live):
    result = augment(live, AugmentConfig(answer_after_results={"count": 10}))
    for e in _by_rule(result, "answer_after_results"):
        call_turn, tool, answer = e.messages[-3:]
        assert call_turn.tool_calls and tool.role == "tool" and tool.tool_call_id == call_turn.tool_calls[0].id
        payload = json.loads(tool.content)
        assert payload == e.meta["augment"]["result"]
        assert answer.role == "assistant" and not answer.tool_calls
        assert all(str(v) in answer.content for v in payload.values())


def test_max_tools_keeps_the_called_tools_and_mix_samples_originals(live):
    import random

    many = next(e for e in live if len(e.tools) > 4 and e.messages[-1].tool_calls)
    trimmed = trim_tools(many, 2, random.Random(0))
    called = {c.name for c in many.messages[-1].tool_calls}
    assert len(trimmed.tools) == 2 and called <= {t.name for t in trimmed.tools}
    assert sorted(trimmed.meta["trimmed_tools"] + [t.name for t in trimmed.tools]) == sorted(t.name for t in many.tools)
    result = augment(live, AugmentConfig(max_tools=2, mix={"live_multiple": 10}))
    available = [e.meta["bfcl"]["category"] for e in live]
    assert result.report["mix"] == {"live_multiple": {"available": available.count("live_multiple"), "kept": 10}}
    groups = [e.meta["bfcl"]["category"] for e in result.originals]
    assert groups.count("live_multiple") == 10 and groups.count("live_simple") == available.count("live_simple")
    assert all(len(e.tools) <= 2 or len(e.tools) == len({c.name for m in e.messages for c in m.tool_calls or []})
               for e in result.originals)


def test_join_requests_keeps_each_request():
    import random

    joined = join_requests(["What is the weather in Paris?", "What is it in NASA's city?"], random.Random(1))
    assert joined.startswith("What is the weather in Paris?") and "hat is it in NASA's city?" in joined


def test_data_augment_command_writes_originals_and_new_examples(live, tmp_path):
    src = write_jsonl(live[:60], tmp_path / "in.jsonl")
    out, rejects = tmp_path / "out.jsonl", tmp_path / "rejects.jsonl"
    result = CliRunner().invoke(app, ["data", "augment", "--input", str(src), "-o", str(out), "--rejects", str(rejects),
                                      "--set", "parallel.count=5", "--set", "irrelevance.count=5"])
    assert result.exit_code == 0, result.output
    report = json.loads(result.output)
    lines = out.read_text().splitlines()
    assert len(lines) == report["output"] == 60 + report["new"] and report["rules"]["irrelevance"]["made"] == 5
    bad = CliRunner().invoke(app, ["data", "augment", "--input", str(src), "-o", str(out), "--set", "parallel.cnt=5"])
    assert bad.exit_code == 2 and "cnt" in bad.output
