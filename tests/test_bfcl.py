"""BFCL source (`calltune.sources.bfcl`) and scoring with the official checker (`evaluate.bfcl_checker`).

Needs bfcl-eval (`pip install --no-deps bfcl-eval`); without it these tests fail, naming the fix.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from importlib import util
from pathlib import Path

import pytest

import calltune
from calltune.evaluate.bfcl_checker import load_ast_checker, score_bfcl
from calltune.schema import Example, ToolCall
from calltune.sources.base import Rejects
from calltune.sources.bfcl import (CATEGORIES, NO_CALL_REPLY, bfcl_categories, bfcl_files, bfcl_tool, bfcl_version,
                                   load_bfcl)

# Entry counts the BFCL data README (bfcl_eval/data/README.md) documents and the v4 data have.
# (It documents others that the data no longer match: JavaScript 70 (data: 50), live multiple 1037,
# live irrelevance 875; those are only checked against the files.)
DOCUMENTED_COUNTS = {"simple_python": 400, "multiple": 200, "parallel": 200, "parallel_multiple": 200,
                     "irrelevance": 240, "simple_java": 100, "live_simple": 258, "live_parallel": 16,
                     "live_parallel_multiple": 24}

# Entries whose ground truth no call can satisfy under the official checker (bugs in BFCL's data):
KNOWN_UNPASSABLE = {
    "simple_java_36": "ArrayList<any>: the converter yields strings, the answer holds 42 and true",
    "simple_java_65": "same as simple_java_36",
    "simple_java_64": "HashMap answer value is a bare string, not a list of acceptable values",
    "live_simple_106-63-0": "required arguments with an empty list of acceptable values",
    "live_simple_112-68-0": "required argument with an empty list of acceptable values",
    "live_multiple_862-181-3": "answer passes an argument the function doc does not declare",
    "live_multiple_964-207-0": "answer's argument name differs from the doc's required one",
}
AST_CATEGORIES = [c for c in CATEGORIES if "relevance" not in c]


def _require_bfcl() -> None:
    if util.find_spec("bfcl_eval") is None:
        pytest.fail("bfcl-eval is not installed: run `pip install --no-deps bfcl-eval` (CI does this)")


@pytest.fixture(scope="module")
def loaded() -> dict[str, list[Example]]:
    _require_bfcl()
    return {c: load_bfcl(c) for c in CATEGORIES}


def _by_id(examples: list[Example], entry_id: str) -> Example:
    return next(e for e in examples if e.meta["bfcl"]["id"] == entry_id)


def _target(example: Example) -> list[ToolCall]:
    return list(example.messages[-1].tool_calls or [])


def _walk_types(schema, out: list[str]) -> list[str]:
    if isinstance(schema, dict):
        if isinstance(schema.get("type"), str):
            out.append(schema["type"])
        for key in ("properties", "items"):
            value = schema.get(key)
            for sub in (value.values() if key == "properties" and isinstance(value, dict) else [value]):
                _walk_types(sub, out)
    return out


def test_bfcl_eval_is_installed():
    _require_bfcl()
    assert bfcl_version().split(".")[0].isdigit()
    assert bfcl_categories() == list(CATEGORIES) and len(CATEGORIES) == 13


def test_every_category_loads_with_the_raw_file_counts(loaded):
    for category, examples in loaded.items():
        questions, answers = bfcl_files(category)
        raw = [json.loads(line) for line in questions.read_text(encoding="utf-8").splitlines() if line.strip()]
        assert len(examples) == len(raw), category
        assert [e.meta["bfcl"]["id"] for e in examples] == [r["id"] for r in raw]
        if answers is not None:
            n_answers = sum(1 for line in answers.read_text(encoding="utf-8").splitlines() if line.strip())
            assert n_answers == len(raw), category
    for category, n in DOCUMENTED_COUNTS.items():
        assert len(loaded[category]) == n, category


def test_nothing_rejected_and_aliases_and_limit():
    _require_bfcl()
    for category in CATEGORIES:
        rejects = Rejects()
        load_bfcl(category, rejects=rejects, limit=20)
        assert len(rejects) == 0, (category, rejects.items[:1])
    assert [e.meta["bfcl"]["id"] for e in load_bfcl("simple", limit=2)] == ["simple_python_0", "simple_python_1"]
    with pytest.raises(ValueError, match="did you mean|Did you mean"):
        load_bfcl("simple_pyton")


def test_messages_meta_and_target_turns(loaded):
    for category, examples in loaded.items():
        for e in examples:
            info = e.meta["bfcl"]
            assert info["category"] == category and len(e.tools) == len(info["function"])
            assert e.tools or category == "live_irrelevance"  # a few of those offer no function at all
            assert e.messages[0].role in ("system", "user")
            last = e.messages[-1]
            if category in ("irrelevance", "live_irrelevance"):
                assert last.role == "assistant" and last.content == NO_CALL_REPLY and not last.tool_calls
                assert info["ground_truth"] is None
            elif category == "live_relevance":
                assert last.role == "user" and info["ground_truth"] is None
            else:
                assert last.role == "assistant" and len(last.tool_calls) == len(info["ground_truth"])
    system = [e for e in loaded["live_simple"] if e.messages[0].role == "system"]
    assert system, "live_simple has entries with a system prompt"
    without = load_bfcl("live_simple", limit=3, with_answers=False)
    assert all(e.messages[-1].role == "user" and e.meta["bfcl"]["ground_truth"] for e in without)


def test_bfcl_types_become_json_schema(loaded):
    seen = set()
    for category, examples in loaded.items():
        for e in examples:
            for tool in e.tools:
                params = tool.function.parameters
                assert params["type"] == "object"
                types = _walk_types(params, [])
                seen.update(types)
                assert not {"dict", "float", "tuple", "any", "String", "HashMap", "ArrayList"} & set(types), \
                    (category, tool.name, types)
                if category in ("simple_java", "simple_javascript"):
                    assert {p["type"] for p in params["properties"].values()} <= {"string"}
    assert {"object", "number", "array", "string", "integer", "boolean"} <= seen
    # nested dict -> object, float -> number (format float), tuple -> array, any -> string
    raw = {"name": "f", "description": "d", "parameters": {"type": "dict", "required": ["a"], "properties": {
        "a": {"type": "dict", "description": "", "properties": {"x": {"type": "float", "description": ""}}},
        "b": {"type": "tuple", "description": "", "items": {"type": "integer"}},
        "c": {"type": "any", "description": ""},
        "d": {"type": "array", "description": "", "items": {"type": "dict", "properties": {"k": {"type": "dict"}}}}}}}
    p = bfcl_tool(raw).function.parameters
    assert p["type"] == "object" and p["required"] == ["a"]
    assert p["properties"]["a"]["type"] == "object"
    assert p["properties"]["a"]["properties"]["x"]["type"] == "number"
    assert p["properties"]["a"]["properties"]["x"]["format"] == "float"
    assert p["properties"]["b"] == {"type": "array", "description": "", "items": {"type": "integer"}}
    assert p["properties"]["c"]["type"] == "string"
    assert p["properties"]["d"]["items"]["properties"]["k"]["type"] == "object"
    assert raw["parameters"]["type"] == "dict", "the raw doc is not modified"


def test_dotted_function_names_are_kept(loaded):
    e = _by_id(loaded["simple_python"], "simple_python_1")
    assert [t.name for t in e.tools] == ["math.factorial"]
    assert _target(e)[0].name == "math.factorial" and _target(e)[0].arguments == {"number": 5}
    for category, examples in loaded.items():
        for e in examples:
            assert [t.name for t in e.tools] == [f["name"] for f in e.meta["bfcl"]["function"]]
    assert sum("." in t.name for e in loaded["multiple"] for t in e.tools) > 50


def test_optional_empty_first_value_is_omitted(loaded):
    # simple_python_2: math.hypot answer {"x": [4], "y": [5], "z": ["", 0]} -> z omitted
    e = _by_id(loaded["simple_python"], "simple_python_2")
    assert _target(e)[0].arguments == {"x": 4, "y": 5}
    # simple_python_0: unit ["units", ""] -> the first value "units" is used
    assert _target(_by_id(loaded["simple_python"], "simple_python_0"))[0].arguments["unit"] == "units"


@pytest.mark.parametrize("category", AST_CATEGORIES)
def test_official_checker_accepts_the_ground_truth(loaded, category):
    examples = loaded[category]
    report = score_bfcl(examples, [_target(e) for e in examples])
    failed = {r["id"]: r["error"] for r in report["results"] if not r["valid"]}
    unexpected = {i: err for i, err in failed.items() if i not in KNOWN_UNPASSABLE}
    assert not unexpected, f"{len(unexpected)} ground-truth targets rejected, e.g. {next(iter(unexpected.items()))}"
    if category in ("simple_python", "multiple", "parallel", "parallel_multiple"):
        assert report["accuracy"][category] == 1.0 and report["total"][category] == len(examples)
    assert report["bfcl_version"] == bfcl_version()


def test_official_checker_rejects_wrong_calls(loaded):
    e = _by_id(loaded["simple_python"], "simple_python_1")  # math.factorial(number=5)
    good = ToolCall.of("math.factorial", {"number": 5})
    cases = {
        "right": [good],
        "wrong_name": [ToolCall.of("math_factorial", {"number": 5})],  # rewritten name, not mapped back
        "wrong_value": [ToolCall.of("math.factorial", {"number": 6})],
        "wrong_type": [ToolCall.of("math.factorial", {"number": "5"})],
        "missing_required": [ToolCall.of("math.factorial", {})],
        "unexpected_arg": [ToolCall.of("math.factorial", {"number": 5, "base": 2})],
        "extra_call": [good, good],
        "no_call": [],
        "unparseable": None,
    }
    report = score_bfcl([e] * len(cases), list(cases.values()))
    valid = {name: r["valid"] for name, r in zip(cases, report["results"])}
    assert valid == {name: name == "right" for name in cases}
    types = {name: r["error_type"] for name, r in zip(cases, report["results"])}
    assert types["wrong_name"] == "simple_function_checker:wrong_func_name"
    assert types["missing_required"] == "simple_function_checker:missing_required"
    assert types["unparseable"] == "ast_decoder:decoder_failed"
    assert all(r["error"] for r in report["results"][1:])
    assert report["accuracy"] == {"simple_python": 1 / len(cases)}


def test_parallel_is_order_free_and_counts_calls(loaded):
    e = next(x for x in loaded["parallel"] if len(_target(x)) >= 2)
    calls = _target(e)
    report = score_bfcl([e, e, e], [calls[::-1], calls[:-1], calls + calls[:1]])
    assert [r["valid"] for r in report["results"]] == [True, False, False]


def test_multiple_rejects_the_wrong_function(loaded):
    e = next(x for x in loaded["multiple"] if len(x.tools) >= 2)
    right = _target(e)[0]
    other = next(t.name for t in e.tools if t.name != right.name)
    report = score_bfcl([e, e], [[right], [ToolCall.of(other, dict(right.arguments))]])
    assert [r["valid"] for r in report["results"]] == [True, False]


def test_java_values_must_be_source_literals(loaded):
    e = _by_id(loaded["simple_java"], "simple_java_1")  # useShortName: Java boolean true
    call = _target(e)[0]
    assert call.arguments["useShortName"] == "true"
    bad = ToolCall.of(call.name, {**call.arguments, "useShortName": True})
    report = score_bfcl([e, e], [[call], [bad]])
    assert [r["valid"] for r in report["results"]] == [True, False]
    assert report["results"][1]["error_type"] == "type_error:java"


def test_irrelevance_and_relevance_rules(loaded):
    irr = loaded["irrelevance"][0]
    some_call = [ToolCall.of(irr.tools[0].name, {})]
    rel = loaded["live_relevance"][0]
    live_irr = loaded["live_irrelevance"][0]
    report = score_bfcl([irr, irr, irr, live_irr, rel, rel, rel],
                        [[], None, some_call, [], [ToolCall.of(rel.tools[0].name, {})], [], None])
    assert [r["valid"] for r in report["results"]] == [True, True, False, True, True, False, False]
    assert report["correct"] == {"irrelevance": 2, "live_irrelevance": 1, "live_relevance": 1}
    assert report["total"] == {"irrelevance": 3, "live_irrelevance": 1, "live_relevance": 3}
    assert report["results"][2]["error_type"] == "irrelevance_error:decoder_success"


def test_score_bfcl_input_errors(loaded):
    e = loaded["simple_python"][0]
    with pytest.raises(ValueError, match="1 examples but 0 predictions"):
        score_bfcl([e], [])
    plain = Example(messages=[{"role": "user", "content": "hi"}])
    with pytest.raises(ValueError, match="no meta\\['bfcl'\\]"):
        score_bfcl([plain], [[]])


# Hand-made predictions per non-live category: (entries loaded, how many get their ground truth; the
# rest get a wrong answer). Irrelevance: the first `right` answer without a call, the rest call a tool.
SUMMARY_CASE = {"simple_python": (4, 3), "simple_java": (2, 1), "simple_javascript": (4, 0), "multiple": (2, 2),
                "parallel": (4, 3), "parallel_multiple": (2, 0), "irrelevance": (3, 2)}


def _summary_inputs(categories) -> tuple[list[Example], list]:
    _require_bfcl()
    examples, predictions = [], []
    for category in categories:
        n, right = SUMMARY_CASE[category]
        for i, e in enumerate(load_bfcl(category, limit=n)):
            examples.append(e)
            if category == "irrelevance":
                predictions.append([] if i < right else [ToolCall.of(e.tools[0].name, {})])
            else:  # wrong: alternately unparseable and no call
                predictions.append(_target(e) if i < right else (None if i % 2 else []))
    return examples, predictions


def test_non_live_summary_is_bfcls_unweighted_mean_of_means():
    from calltune.sources.bfcl import NON_LIVE_EVAL

    assert set(NON_LIVE_EVAL) == set(SUMMARY_CASE)
    report = score_bfcl(*_summary_inputs(NON_LIVE_EVAL))
    assert report["accuracy"] == {c: right / n for c, (n, right) in SUMMARY_CASE.items()}
    simple = (3 / 4 + 1 / 2 + 0 / 4) / 3  # 0.4167; weighted by entries it would be 4 / 10
    assert report["summary"] == {"simple": pytest.approx(simple),
                                 "non_live_ast": pytest.approx((simple + 1.0 + 3 / 4 + 0.0) / 4)}
    assert report["summary"]["non_live_ast"] == pytest.approx(0.5416667)  # not the flat mean of 6 (0.5)
    assert report["summary_missing"] == {}
    assert report["accuracy"]["irrelevance"] == pytest.approx(2 / 3)  # reported as is, in neither mean


def test_non_live_summary_is_left_out_when_a_category_is_missing():
    report = score_bfcl(*_summary_inputs(["simple_python", "simple_java", "multiple", "parallel",
                                          "parallel_multiple", "irrelevance"]))
    assert report["summary"] == {}
    assert report["summary_missing"] == {"simple": ["simple_javascript"], "non_live_ast": ["simple_javascript"]}
    report = score_bfcl(*_summary_inputs(["simple_javascript", "simple_python", "simple_java"]))
    assert report["summary"] == {"simple": pytest.approx((0 + 3 / 4 + 1 / 2) / 3)}
    assert report["summary_missing"] == {"non_live_ast": ["multiple", "parallel", "parallel_multiple"]}
    report = score_bfcl(*_summary_inputs(["irrelevance"]))
    assert report["summary"] == {} and report["summary_missing"] == {}  # no part evaluated: nothing to say


def test_report_prints_the_summary_under_the_category_table(tmp_path):
    from types import SimpleNamespace

    from calltune.pipeline import write_report

    examples, predictions = _summary_inputs(SUMMARY_CASE)
    base = score_bfcl(examples, predictions)
    tuned = score_bfcl(examples, [_target(e) if e.meta["bfcl"]["category"] != "irrelevance" else [] for e in examples])
    recipe = SimpleNamespace(name="t", model="m", format="hermes", train=SimpleNamespace(method="full"),
                             data=SimpleNamespace(source="bfcl"))
    summary = {"data": {"train_examples": 1, "eval_examples": len(examples), "rejected_rows": 0},
               "wall_seconds": {}, "machine": "test",
               "eval_base": {"task": "toolcall", "bfcl": base}, "eval_tuned": {"task": "toolcall", "bfcl": tuned}}
    lines = write_report(recipe, tmp_path, summary).read_text().splitlines()
    rows = [line for line in lines if line.startswith("| ")]
    simple = "| simple (mean of Python, Java, JavaScript) | 10 | 0.417 | 1.000 |"
    assert rows[-2:] == [simple, "| non-live AST summary | 18 | 0.542 | 1.000 |"]
    assert rows[-3].startswith("| irrelevance | 3 |")  # right under the per-category rows
    partial = score_bfcl(*_summary_inputs(["simple_python", "multiple", "parallel", "parallel_multiple"]))
    summary["eval_base"]["bfcl"] = summary["eval_tuned"]["bfcl"] = partial
    text = write_report(recipe, tmp_path, summary).read_text()
    assert "summary |" not in text and "mean of Python" not in text.split("Not reported")[0]
    assert ("Not reported, not every category evaluated: simple (mean of Python, Java, JavaScript) needs "
            "simple_java, simple_javascript; non-live AST summary needs simple_java, simple_javascript.") in text


def test_checker_loads_without_vendor_sdks_and_leaves_no_stub():
    _require_bfcl()
    module = load_ast_checker()
    assert module.__file__.endswith("ast_checker.py") and callable(module.ast_checker)
    stub = sys.modules.get("bfcl_eval.constants.model_config")
    assert stub is None or "calltune stub" not in (stub.__doc__ or "")
    # In a fresh interpreter: scoring imports no vendor SDK and none of bfcl-eval's heavy modules.
    code = ("import sys; from calltune.sources.bfcl import load_bfcl; "
            "from calltune.evaluate.bfcl_checker import score_bfcl; "
            "ex = load_bfcl('simple', limit=5); r = score_bfcl(ex, [e.messages[-1].tool_calls for e in ex]); "
            "assert r['accuracy'] == {'simple_python': 1.0}, r; "
            "heavy = [m for m in sys.modules if m.split('.')[0] in ('openai', 'anthropic', 'mistralai', 'cohere', "
            "'google', 'numpy', 'pandas', 'torch', 'tree_sitter', 'boto3')] + "
            "[m for m in sys.modules if m.startswith(('bfcl_eval.model_handler', 'bfcl_eval.constants.model_config', "
            "'bfcl_eval.utils', 'bfcl_eval.constants.eval_config'))]; "
            "assert not heavy, heavy")
    src = str(Path(calltune.__file__).resolve().parents[1])
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([src, os.environ.get("PYTHONPATH", "")])}
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env)
    assert done.returncode == 0, done.stderr[-2000:]
