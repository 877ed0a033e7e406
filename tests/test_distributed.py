"""Data-parallel training: two CPU processes (``accelerate launch``, gloo) train as one process does.

The same recipe at the same global batch gives the same losses and weights in one process as split
over two (each taking half of every micro-batch): under DDP (``recipes/accelerate/ddp.yaml``), where
the two-process ``calltune run`` also writes one model, one report and one evaluation, and under
DeepSpeed ZeRO-3 with LoRA (``deepspeed_zero3.yaml``; skipped without deepspeed), which must save one
consolidated adapter. FSDP is not tested: accelerate prepares an FSDP model only on an accelerator.
Also: ``calltune validate --accelerate-config`` on the shipped and on broken accelerate configs, and a
recipe with ``train.torch_compile`` refused under DeepSpeed and FSDP.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from calltune.cli import app
from tiny_training import PYTHON, ROOT, adapter_weights, launch, losses, tiny_base, write_data, write_recipe

ACCELERATE = sorted((ROOT / "recipes" / "accelerate").glob("*.yaml"))
runner = CliRunner()


def accelerate_launch(config: str, *command: str, cwd: Path):
    """``accelerate launch --config_file recipes/accelerate/CONFIG -m calltune COMMAND...`` with 2 processes."""
    config_file = ROOT / "recipes" / "accelerate" / config
    return launch([PYTHON, "-m", "accelerate.commands.launch", "--config_file", str(config_file), "--num_processes", "2",
                   "--main_process_port", "0", "-m", "calltune", *command], cwd=cwd)


def train_alone(recipe: Path, output_dir: Path) -> None:
    """Train `recipe` in this one process, as ``calltune train`` does."""
    from calltune.pipeline import prepare, recipe_format
    from calltune.recipe import load_recipe
    from calltune.train import train

    r = load_recipe(recipe)
    examples, _, _, rejects = prepare(r, output_dir.parent)
    train(r.model, examples, recipe_format(r), r.train, output_dir, rejects=rejects)


@pytest.mark.slow
def test_two_processes_train_as_one(tmp_path, tokenizer):
    from safetensors.torch import load_file

    base = tiny_base(tmp_path, tokenizer)
    # full fine-tuning: every weight (tied embeddings too) must get the gradient of the whole batch
    recipe = write_recipe(tmp_path / "tiny.yaml", base, write_data(tmp_path / "data.jsonl"), method="full",
                          max_steps=6, batch_size=4, grad_accum=2, learning_rate=1e-2, save_steps=3)
    train_alone(recipe, tmp_path / "one" / "model")
    two = tmp_path / "two"
    out = accelerate_launch("ddp.yaml", "run", str(recipe), "-o", str(two), cwd=tmp_path)

    one_losses, two_losses = losses(tmp_path / "one" / "model"), losses(two / "model")
    assert len(two_losses) == 6 and two_losses[-1] < two_losses[0] - 0.1  # it learns
    assert two_losses == pytest.approx(one_losses, rel=1e-4)
    one_w = load_file(tmp_path / "one" / "model" / "model.safetensors")
    two_w = load_file(two / "model" / "model.safetensors")
    for name in one_w:
        torch.testing.assert_close(two_w[name], one_w[name], rtol=1e-4, atol=1e-5, msg=name)
    # one of everything, written by the main process: the model, its checkpoints, the report, the evaluation
    assert sorted(p.name for p in (two / "model" / "checkpoints").iterdir()) == ["checkpoint-6", "runs"]
    assert not list(two.glob(".*")), "a staging folder was left behind"
    assert len((two / "eval-tuned" / "predictions.jsonl").read_text().splitlines()) == 2
    assert out.stdout.count("# calltune report: tiny") == 1 and (two / "report.md").exists()  # printed once
    state = (two / "model" / "checkpoints" / "checkpoint-6")
    assert {p.name for p in state.glob("rng_state*")} == {"rng_state_0.pth", "rng_state_1.pth"}  # one per process


@pytest.mark.slow
def test_zero3_saves_one_consolidated_adapter(tmp_path, tokenizer):
    pytest.importorskip("deepspeed")
    base = tiny_base(tmp_path, tokenizer)
    recipe = write_recipe(tmp_path / "tiny.yaml", base, write_data(tmp_path / "data.jsonl"), max_steps=4,
                          batch_size=4, learning_rate=2e-2, save_steps=2)
    train_alone(recipe, tmp_path / "one" / "model")
    accelerate_launch("deepspeed_zero3.yaml", "train", str(recipe), "-o", str(tmp_path / "z3" / "model"), cwd=tmp_path)
    one, z3 = tmp_path / "one" / "model", tmp_path / "z3" / "model"
    assert losses(z3) == pytest.approx(losses(one), rel=1e-4)
    want, got = adapter_weights(one), adapter_weights(z3)
    assert got.keys() == want.keys()
    for name in want:  # whole tensors, not ZeRO-3 shards (each process holds half)
        torch.testing.assert_close(got[name], want[name], rtol=1e-4, atol=1e-6, msg=name)
    assert (z3 / "checkpoints" / "checkpoint-4" / "global_step4").is_dir()  # it did run under DeepSpeed


def test_validate_checks_the_shipped_accelerate_configs(monkeypatch):
    monkeypatch.chdir(ROOT)  # recipe data paths are relative to the repository root
    assert [p.name for p in ACCELERATE] == ["ddp.yaml", "deepspeed_zero2.yaml", "deepspeed_zero3.yaml", "fsdp.yaml"]
    for config in ACCELERATE:
        first = config.read_text().splitlines()[0]
        command = f"# accelerate launch --config_file recipes/accelerate/{config.name} -m calltune "
        assert first.startswith(command), first
        result = runner.invoke(app, ["validate", "recipes/viggo-lora.yaml", "--accelerate-config", str(config)])
        assert result.exit_code == 0, result.output
    result = runner.invoke(app, ["validate", "recipes/xlam-qlora.yaml", "--accelerate-config",
                                 str(ROOT / "recipes" / "accelerate" / "fsdp.yaml")])
    assert result.exit_code == 2 and "qlora" in result.output, result.output


def test_validate_refuses_torch_compile_under_deepspeed_and_fsdp(tmp_path, monkeypatch):
    monkeypatch.chdir(ROOT)
    recipe = tmp_path / "compiled.yaml"
    recipe.write_text((ROOT / "recipes" / "viggo-lora.yaml").read_text().replace(
        "  method: lora\n", "  method: lora\n  torch_compile: true\n"))
    for config in ACCELERATE:
        result = runner.invoke(app, ["validate", str(recipe), "--accelerate-config", str(config)])
        if config.name == "ddp.yaml":
            assert result.exit_code == 0, result.output
        else:
            assert result.exit_code == 2 and "train.torch_compile is not supported under" in result.output, \
                (config.name, result.output)


@pytest.mark.parametrize("text, words", [
    ("distributed_type: MULTI_GPUS\nnum_processes: 0\n",
     ["distributed_type", "MULTI_GPUS", "MULTI_GPU", "num_processes"]),
    ("distributed_type: FSDP\nfsdp_config: {fsdp_state_dict_type: SHARDED_STATE_DICT}\n",
     ["fsdp_state_dict_type", "FULL_STATE_DICT"]),
    ("distributed_type: DEEPSPEED\ndeepspeed_config: {zero_stage: 3}\n", ["zero3_save_16bit_model"]),
    ("distributed_type: [MULTI_GPU\n", ["not valid YAML"]),
    ("- MULTI_GPU\n", ["expected a mapping"]),
])
def test_validate_reports_a_broken_accelerate_config(tmp_path, monkeypatch, text, words):
    monkeypatch.chdir(ROOT)
    config = tmp_path / "accelerate.yaml"
    config.write_text(text)
    result = runner.invoke(app, ["validate", "recipes/viggo-lora.yaml", "--accelerate-config", str(config)])
    assert result.exit_code == 2, result.output
    for word in words + [str(config)]:
        assert word in result.output, (word, result.output)
