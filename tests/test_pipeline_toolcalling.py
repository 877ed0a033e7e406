"""The tool-calling recipes end to end on the shared samples: clean, render, train (LoRA and QLoRA on
CPU), evaluate with the tool-call metrics. A couple of optimizer steps each, with the real SmolLM2."""

import json
from pathlib import Path

import pytest

from calltune.pipeline import run_recipe
from calltune.recipe import load_recipe

RECIPES = Path(__file__).resolve().parents[1] / "recipes"
pytestmark = pytest.mark.slow


@pytest.mark.parametrize("name,fmt", [("xlam-qlora", "xlam"), ("glaive-lora", "tool_uses"),
                                      ("llama-functions-lora", "function_call")])
def test_recipe_runs_end_to_end(name, fmt, tmp_path, monkeypatch, smollm2_path):
    monkeypatch.chdir(RECIPES.parent)
    recipe = load_recipe(RECIPES / f"{name}.yaml", {
        "train.max_steps": 2, "train.batch_size": 1, "train.logging_steps": 1, "train.max_length": 512,
        "data.eval_limit": 2, "eval.max_new_tokens": 16, "eval.base": False})
    summary = run_recipe(recipe, tmp_path)
    data = summary["data"]
    assert data["train_examples"] + data["eval_examples"] + data["held_out_unused"] + data["rejected_rows"] >= \
        data["loaded_train_examples"]
    assert data["eval_examples"] == 2
    assert data["clean"]["input"] == data["loaded_train_examples"]
    assert summary["train"]["steps"] == 2 and summary["train"]["final_loss"] > 0
    metrics = summary["eval_tuned"]
    assert metrics["task"] == "toolcall" and metrics["n"] == 2
    assert set(metrics) >= {"function_name_accuracy", "exact_call_accuracy", "parseable_rate", "schema_valid_rate",
                            "no_call_precision", "no_call_recall"}
    saved = json.loads((tmp_path / "model" / "calltune_format.json").read_text())
    assert saved["name"] == fmt
    assert (tmp_path / "model" / "adapter_config.json").exists()
    lines = (tmp_path / "eval-tuned" / "predictions.jsonl").read_text().splitlines()
    assert len(lines) == 2 and "exact_match" in json.loads(lines[0])["scores"]
    assert "| Exact Call Accuracy |" in (tmp_path / "report.md").read_text()
    rejects = [json.loads(line) for line in (tmp_path / "rejects.jsonl").read_text().splitlines()]
    assert len(rejects) == data["rejected_rows"] and all(r["reason"] for r in rejects)
