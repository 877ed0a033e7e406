"""Evaluation tasks (`calltune.evaluate.tasks`) and how the runner picks the task and the prompt format.

Scoring runs on hand-made outputs; the runner on a 1-layer random Llama with SmolLM2's tokenizer
(`serving.tiny_models`), so no real weights are loaded.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from pydantic import ValidationError
from typer.testing import CliRunner

from calltune.evaluate.config import EvalConfig
from calltune.evaluate.runner import evaluate_model
from calltune.evaluate.tasks import TASKS, default_task, get_task
from calltune.formats import Parsed, get_format
from calltune.recipe import RecipeError, load_recipe
from calltune.schema import Example, Message, Tool, ToolCall

RECIPES = Path(__file__).resolve().parents[1] / "recipes"
WEATHER = Tool(function={"name": "get_weather", "parameters": {
    "type": "object", "required": ["city"], "properties": {"city": {"type": "string"}}}})


def ask(city: str, row: int = 0, **meta) -> Example:
    return Example(messages=[Message(role="user", content=f"Weather in {city}?"),
                             Message(role="assistant", tool_calls=[ToolCall.of("get_weather", {"city": city})])],
                   tools=[WEATHER], source="t.jsonl", row=row, meta=meta)


def test_default_task_follows_the_format_and_the_examples():
    plain, from_bfcl = [ask("Paris")], [ask("Rome", bfcl={"id": "simple_python_0", "category": "simple_python"})]
    assert default_task("viggo", from_bfcl) == "viggo"
    assert default_task("hermes", from_bfcl) == "bfcl"
    assert default_task("hermes", from_bfcl + plain) == "toolcall"  # only when every example is BFCL's
    assert default_task("hermes", []) == "toolcall"


def test_metric_names_follow_one_convention_and_mean_the_same_in_every_task():
    seen = {}
    for task in TASKS.values():
        assert len({m.name for m in task.metrics}) == len(task.metrics), task.name
        for metric in task.metrics:
            assert metric.name.endswith(("_accuracy", "_rate", "_precision", "_recall")), metric.name
            assert metric.label and metric.measures and metric.source, metric.name
            assert seen.setdefault(metric.name, metric) == metric, f"{metric.name} differs between tasks"
    assert {"exact_call_accuracy", "parseable_rate", "function_name_accuracy"} <= \
        {m.name for m in TASKS["viggo"].metrics} & {m.name for m in TASKS["toolcall"].metrics}


def test_viggo_and_toolcall_report_what_they_declare_with_the_same_values_for_shared_names():
    examples = [ask("Paris", 0), ask("Rome", 1), ask("Oslo", 2)]
    parsed = [Parsed([ToolCall.of("get_weather", {"city": "Paris"})]),   # right
              Parsed([ToolCall.of("get_weather", {"city": "Lyon"})]),    # right name, wrong value
              Parsed(content="<tool_call>{", error="truncated JSON")]    # unparseable
    scores = {}
    for name in ("viggo", "toolcall"):
        metrics, records = TASKS[name].score(examples, parsed)
        assert {m.name for m in TASKS[name].metrics} <= set(metrics) and len(records) == 3
        scores[name] = metrics
    for key, expected in (("function_name_accuracy", 2 / 3), ("exact_call_accuracy", 1 / 3), ("parseable_rate", 2 / 3)):
        assert scores["viggo"][key] == pytest.approx(expected) and scores["toolcall"][key] == pytest.approx(expected)
    assert scores["viggo"]["attribute_set_accuracy"] == pytest.approx(2 / 3)


def test_bfcl_task_adds_the_official_checker_per_category():
    pytest.importorskip("bfcl_eval")
    from calltune.sources.bfcl import load_bfcl

    examples = load_bfcl("simple_python", limit=1) + load_bfcl("irrelevance", limit=1)
    right = Parsed(list(examples[0].final_assistant().tool_calls))
    metrics, records = TASKS["bfcl"].score(examples, [right, Parsed(content="I can't help with that.")])
    assert metrics["bfcl"]["accuracy"] == {"simple_python": 1.0, "irrelevance": 1.0}
    assert metrics["exact_call_accuracy"] == 1.0 and [r["bfcl"]["valid"] for r in records] == [True, True]
    assert "results" not in metrics["bfcl"]  # per-example verdicts go to the records only


def test_an_unknown_task_is_refused_with_the_choices():
    with pytest.raises(ValidationError, match=r"unknown task 'bfc'; did you mean 'bfcl'\? \(choices: viggo, toolcall, bfcl\)"):
        EvalConfig(task="bfc")
    with pytest.raises(RecipeError, match="eval.task: unknown task 'tolcall'; did you mean 'toolcall'"):
        load_recipe(RECIPES / "viggo-lora.yaml", {"eval.task": "tolcall"})
    assert load_recipe(RECIPES / "viggo-lora.yaml", {"eval.task": "toolcall"}).eval.task == "toolcall"
    with pytest.raises(ValueError, match="unknown task 'x'"):
        get_task("x")


def test_a_task_that_cannot_score_an_example_fails_before_generating(tmp_path):
    # loaded=(None, None, None): generating or even prompting would fail on the missing model and tokenizer
    with pytest.raises(ValueError, match=r"t.jsonl, row 3: task 'bfcl': not a BFCL example"):
        evaluate_model("unused", [ask("Paris", 3)], tmp_path, EvalConfig(task="bfcl"), fmt=get_format("hermes"),
                       loaded=(None, None, None))
    no_call = Example(messages=[Message(role="user", content="hi"), Message(role="assistant", content="hello")],
                      source="v.csv", row=5)
    with pytest.raises(ValueError, match=r"v.csv, row 5: task 'viggo': needs a final assistant turn with a call"):
        evaluate_model("unused", [no_call], tmp_path, EvalConfig(), fmt=get_format("viggo"), loaded=(None, None, None))
    assert not (tmp_path / "metrics.json").exists()


@pytest.fixture(scope="module")
def tiny(tmp_path_factory, tokenizer):
    from serving import tiny_models

    return tiny_models(tmp_path_factory.mktemp("tiny"), tokenizer)


def test_eval_format_option_wins_over_the_saved_format_and_task_is_checked(tiny, tmp_path):
    from calltune.cli import app

    data = tmp_path / "eval.jsonl"
    data.write_text("".join(json.dumps({"messages": e.messages_as_dicts(), "tools": e.tools_as_dicts()}) + "\n"
                            for e in [ask("Paris"), ask("Rome")]))
    formats = {}
    for name, extra in (("explicit", ["--format", "xlam"]), ("saved", [])):
        result = CliRunner().invoke(app, ["eval", tiny["tiny"], "--data", str(data), "--source", "openai_jsonl",
                                          "--max-new-tokens", "4", "-o", str(tmp_path / name), *extra])
        assert result.exit_code == 0, result.output
        metrics = json.loads((tmp_path / name / "metrics.json").read_text())
        assert metrics["task"] == "toolcall" and metrics["n"] == 2
        formats[name] = metrics["format"]
    assert formats == {"explicit": "xlam", "saved": "hermes"}  # the adapter was saved with hermes
    result = CliRunner().invoke(app, ["eval", tiny["tiny"], "--data", str(data), "--source", "openai_jsonl",
                                      "--task", "bfc", "-o", str(tmp_path / "bad")])
    assert result.exit_code == 2 and "task: unknown task 'bfc'; did you mean 'bfcl'?" in " ".join(result.output.split())


def test_configured_task_wins_over_the_default(tiny):
    import calltune

    metrics = calltune.evaluate(tiny["tiny"], [ask("Paris")], config={"task": "viggo", "max_new_tokens": 4})
    assert metrics["task"] == "viggo" and metrics["format"] == "hermes"
    assert {m.name for m in TASKS["viggo"].metrics} <= set(metrics)
