"""The embedded default job (`calltune run` with no recipe: BFCL live -> BFCL non-live), constrained
evaluation, and the trainer's cut of over-long examples at whole assistant turns."""

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from calltune.cli import app
from calltune.recipe import DEFAULT_RECIPE, load_recipe, validate_recipe
from calltune.sources.bfcl import NON_LIVE_EVAL
from calltune.train.trainer import _cut_to_whole_turns

ROOT = Path(__file__).resolve().parents[1]


def test_default_recipe_ships_in_the_package_and_names_real_bfcl_categories():
    recipe = load_recipe(None)
    assert recipe.name == "bfcl-default" and recipe.data.source == "bfcl" and recipe.format == "hermes"
    assert DEFAULT_RECIPE.is_file() and DEFAULT_RECIPE.parent.parent.name == "calltune"
    assert (ROOT / "recipes" / "bfcl-default.yaml").resolve() == DEFAULT_RECIPE.resolve()
    train = set(recipe.data.train.split(","))
    held_out = set(recipe.data.eval.split(","))
    assert all(c.startswith("live_") for c in train) and "live_irrelevance" in train
    assert held_out == set(NON_LIVE_EVAL) and not train & held_out
    validate_recipe(DEFAULT_RECIPE)  # every category exists in the installed bfcl-eval


def test_cut_to_whole_turns_never_keeps_part_of_a_trained_span():
    ids = list(range(10))
    mask = [0, 0, 1, 1, 0, 0, 1, 1, 1, 0]
    assert _cut_to_whole_turns(ids, mask, 10) == (ids, mask)
    assert _cut_to_whole_turns(ids, mask, 7) == (ids[:6], mask[:6])  # cut inside the 2nd turn: drop it
    assert _cut_to_whole_turns(ids, mask, 9) == (ids[:9], mask[:9])  # cut right after a turn: keep it
    assert _cut_to_whole_turns(ids, mask, 3) == (ids[:2], mask[:2])  # nothing trained left


def test_over_long_example_goes_to_rejects_with_its_length(tokenizer):
    from calltune.formats import get_format
    from calltune.sources import Rejects
    from calltune.sources.bfcl import load_bfcl
    from calltune.train.trainer import tokenize_examples

    examples = load_bfcl("simple_python", limit=2)
    full = len(get_format("hermes").render(examples[0], tokenizer)[0])
    rejects = Rejects()
    rows = tokenize_examples(examples[:1], get_format("hermes"), tokenizer, max_length=full - 3, rejects=rejects)
    assert rows == [] and len(rejects) == 1
    assert f"{full} tokens: no whole assistant turn within max_length={full - 3}" in rejects.items[0]["reason"]
    kept = tokenize_examples(examples[:1], get_format("hermes"), tokenizer, max_length=full, rejects=rejects)
    trained = [t for t in kept[0]["labels"] if t != -100]
    assert kept[0]["length"] == full and tokenizer.decode(trained).endswith("</tool_call><|im_end|>")


@pytest.mark.slow
def test_calltune_run_without_a_recipe_runs_the_bfcl_job(tmp_path, smollm2_path):
    result = CliRunner().invoke(app, ["run", "-o", str(tmp_path), "--set", "data.limit=2", "--set", "data.eval_limit=1",
                                      "--set", "train.max_steps=1", "--set", "eval.max_new_tokens=24"])
    assert result.exit_code == 0, result.output
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["recipe"] == "bfcl-default" and summary["train"]["steps"] == 1
    data = summary["data"]
    assert data["loaded_train_examples"] == 10 and data["eval_examples"] == len(NON_LIVE_EVAL)  # 2 per live category, 1 per held-out
    assert data["train_examples"] + data["rejected_rows"] >= data["loaded_train_examples"]
    augmented = data["augment"]
    assert augmented["new"] > 0 and augmented["output"] == augmented["originals"] + augmented["new"]
    assert augmented["output"] == data["train_examples"]
    assert set(augmented["rules"]) == {"irrelevance", "parallel", "parallel_multiple", "self_correction",
                                       "answer_after_results"}
    for side in ("eval_base", "eval_tuned"):
        bfcl = summary[side]["bfcl"]
        assert summary[side]["task"] == "bfcl" and bfcl["total"] == {c: 1 for c in NON_LIVE_EVAL} and bfcl["bfcl_version"]
    report = (tmp_path / "report.md").read_text()
    assert "BFCL, official AST checker (bfcl-eval " in report
    base, tuned = summary["eval_base"]["bfcl"]["accuracy"], summary["eval_tuned"]["bfcl"]["accuracy"]
    assert all(f"| {c} | 1 | {base[c]:.3f} | {tuned[c]:.3f} |" in report for c in NON_LIVE_EVAL)
    assert "BFCL, official AST checker" in result.output  # the table is printed too
    assert "| non-live AST summary | 6 |" in report and "| simple (mean of Python, Java, JavaScript) | 3 |" in report
    assert f"{augmented['new']} new examples" in report
    assert json.loads((tmp_path / "model" / "calltune_format.json").read_text())["name"] == "hermes"


@pytest.mark.slow
def test_constrained_evaluation_makes_calls_fit_the_offered_schema(tmp_path, smollm2_path):
    """The tiny tool-calling adapter learnt ``get_weather({"city": "Paris"})``; offered a get_weather whose
    schema also requires an integer ``days``, it leaves ``days`` out (schema-invalid) unless constrained."""
    from toolcall_model import ASK_PARIS, tuned_adapter

    from calltune.evaluate.runner import EvalConfig, evaluate_model
    from calltune.schema import Example, Message, Tool, ToolCall

    strict = Tool(function={"name": "get_weather", "description": "Current weather of a place.",
                             "parameters": {"type": "object", "properties": {"city": {"type": "string"}, "days": {"type": "integer"}},
                                            "required": ["city", "days"]}})
    example = Example(messages=[Message(role="user", content=ASK_PARIS),
                                Message(role="assistant", tool_calls=[ToolCall.of("get_weather", {"city": "Paris", "days": 1})])],
                      tools=[strict], source="test", row=0)
    adapter = tuned_adapter(tmp_path)
    scores = {}
    for constrained in (False, True):
        metrics = evaluate_model(adapter, [example], tmp_path / str(constrained),
                                 EvalConfig(batch_size=1, max_new_tokens=40, constrained=constrained))
        record = json.loads((tmp_path / str(constrained) / "predictions.jsonl").read_text())
        assert metrics["constrained"] is constrained and [c["name"] for c in record["parsed"]] == ["get_weather"], record
        scores[constrained] = (record["scores"]["schema_valid"], record["parsed"][0]["arguments"])
    assert scores[False] == (False, {"city": "Paris"})  # what the adapter learnt: no days
    assert scores[True][0] is True and set(scores[True][1]) == {"city", "days"}  # forced into the schema
    assert isinstance(scores[True][1]["days"], int)


def test_constrained_evaluation_needs_a_format_with_a_call_grammar(tmp_path, tokenizer, viggo_valid):
    from calltune.evaluate.runner import EvalConfig, evaluate_model
    from calltune.formats import get_format
    from calltune.infer.constrained import ConstrainedDecodingError

    with pytest.raises(ConstrainedDecodingError, match="hermes"):  # refused before generating: no model needed
        evaluate_model("smollm2-135m-instruct", viggo_valid[:1], tmp_path, EvalConfig(constrained=True),
                       fmt=get_format("viggo"), loaded=(None, tokenizer, None))


def test_eval_benchmark_option_errors_name_the_problem(tmp_path):
    runner = CliRunner()
    result = runner.invoke(app, ["eval", "smollm2-135m-instruct", "--benchmark", "bfcl2", "-o", str(tmp_path)])
    assert result.exit_code == 2 and "unknown benchmark 'bfcl2'" in result.output
    result = runner.invoke(app, ["eval", "smollm2-135m-instruct", "-o", str(tmp_path)])
    assert result.exit_code == 2 and "--benchmark bfcl" in result.output


@pytest.mark.slow
def test_eval_benchmark_bfcl_scores_every_held_out_category(tmp_path, smollm2_path):
    result = CliRunner().invoke(app, ["eval", "smollm2-135m-instruct", "--benchmark", "bfcl", "--limit", "1",
                                      "--format", "hermes", "--max-new-tokens", "16", "-o", str(tmp_path)])
    assert result.exit_code == 0, result.output
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    assert metrics["n"] == len(NON_LIVE_EVAL) and metrics["bfcl"]["total"] == {c: 1 for c in NON_LIVE_EVAL}
