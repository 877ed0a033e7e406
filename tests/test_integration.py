"""End to end with the real SmolLM2: a few optimizer steps on a few dozen ViGGO rows, then evaluation."""

import json
from pathlib import Path

import pytest
import torch

from calltune.pipeline import run_recipe
from calltune.recipe import load_recipe

RECIPES = Path(__file__).resolve().parents[1] / "recipes"
pytestmark = pytest.mark.slow


@pytest.fixture
def in_repo(monkeypatch):
    monkeypatch.chdir(RECIPES.parent)  # recipe data paths are relative to the repository root


def test_full_fine_tune_pipeline_end_to_end(tmp_path, in_repo, smollm2_path):
    recipe = load_recipe(RECIPES / "viggo-full.yaml", {
        "data.limit": 32, "train.max_steps": 6, "train.batch_size": 8, "train.logging_steps": 1,
        "train.learning_rate": 3e-4, "data.eval_limit": 8, "eval.max_new_tokens": 40, "eval.batch_size": 8})
    summary = run_recipe(recipe, tmp_path)
    history = json.loads((tmp_path / "model" / "train_log.json").read_text())
    losses = [h["loss"] for h in history if "loss" in h]
    assert len(losses) == 6 and losses[-1] < losses[0]
    assert all(h["tokens_per_s"] > 0 for h in history if "loss" in h)
    for which in ("eval-base", "eval-tuned"):
        metrics = json.loads((tmp_path / which / "metrics.json").read_text())
        assert metrics["n"] == 8
        lines = (tmp_path / which / "predictions.jsonl").read_text().splitlines()
        assert len(lines) == 8 and json.loads(lines[0])["reference"][0]["name"]
        assert (tmp_path / which / "confusion.png").stat().st_size > 1000
    base, tuned = summary["eval_base"], summary["eval_tuned"]
    assert tuned["task"] == "viggo" and tuned == json.loads((tmp_path / "eval-tuned" / "metrics.json").read_text())
    report = (tmp_path / "report.md").read_text()
    for key, label in (("overall_accuracy", "Overall Accuracy"), ("function_name_accuracy", "Function Name Accuracy"),
                       ("parseable_rate", "Parseable Rate")):  # the report shows the scores the runs wrote
        assert f"| {label} | {base[key]:.3f} | {tuned[key]:.3f} |" in report
    assert (tmp_path / "loss.png").exists()
    assert json.loads((tmp_path / "model" / "calltune_format.json").read_text())["name"] == "viggo"
    assert list((tmp_path / "model" / "checkpoints").glob("runs/*/events.out.tfevents.*")), "no TensorBoard log"


def test_lora_adapter_merges_into_a_plain_transformers_model(tmp_path, in_repo, smollm2_path):
    from transformers import AutoModelForCausalLM

    from calltune.models import load_model
    from calltune.train import merge_adapter

    recipe = load_recipe(RECIPES / "viggo-lora.yaml", {
        "data.limit": 16, "train.max_steps": 3, "train.batch_size": 8, "train.logging_steps": 1,
        "data.eval_limit": 4, "eval.max_new_tokens": 32, "eval.base": False})
    summary = run_recipe(recipe, tmp_path)
    adapter = tmp_path / "model"
    assert (adapter / "adapter_config.json").exists() and not (adapter / "config.json").exists()
    assert summary["eval_tuned"]["n"] == 4 and "eval_base" not in summary
    merged_dir = merge_adapter(adapter, tmp_path / "merged")
    plain = AutoModelForCausalLM.from_pretrained(merged_dir)  # no peft, no calltune
    with_adapter, tokenizer, _ = load_model(adapter)
    ids = tokenizer("inform(name[Halo], rating[good])", return_tensors="pt").input_ids
    with torch.no_grad():
        a, b = plain(ids).logits, with_adapter(ids).logits
    assert torch.allclose(a, b, atol=1e-3)
    base, _, _ = load_model(smollm2_path)
    with torch.no_grad():
        assert not torch.allclose(base(ids).logits, a, atol=1e-3), "the adapter changed nothing"
    assert (merged_dir / "calltune_format.json").exists()
