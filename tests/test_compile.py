"""`train.torch_compile`: regional compilation of the decoder layers (`compile_decoder_layers`).

A tiny random Llama trained with compiled layers follows the loss curve of the same run uncompiled and
saves the same parameter names and close weights, for full fine-tuning and LoRA (fp32, so the two
differ only by the order of floating-point operations); under DeepSpeed or FSDP the option is refused.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from calltune.errors import CalltuneError
from calltune.formats import get_format
from calltune.train import TrainConfig, train
from calltune.train.trainer import compile_decoder_layers
from tiny_training import tiny_base
from toolcall_model import examples


@pytest.fixture(scope="module")
def base(tmp_path_factory, tokenizer) -> Path:
    return tiny_base(tmp_path_factory.mktemp("compile"), tokenizer)


def _run(base: Path, out: Path, method: str, compiled: bool) -> tuple[list[float], dict[str, torch.Tensor]]:
    cfg = TrainConfig(method=method, max_steps=4, batch_size=3, learning_rate=1e-2, warmup_ratio=0.0,
                      lr_scheduler="constant", mixed_precision="no", logging_steps=1, save_steps=1000,
                      max_length=512, torch_compile=compiled, lora={"r": 4, "alpha": 8})
    train(str(base), examples(), get_format("hermes"), cfg, out)
    losses = [h["loss"] for h in json.loads((out / "train_log.json").read_text()) if "loss" in h]
    weights = "adapter_model.safetensors" if method == "lora" else "model.safetensors"
    return losses, load_file(out / weights)


@pytest.mark.parametrize("method", ["full", "lora"])
def test_compiled_layers_train_as_the_uncompiled_ones(base, tmp_path, method):
    from torch._dynamo.utils import counters

    eager_losses, eager = _run(base, tmp_path / "eager", method, compiled=False)
    frames = counters["stats"]["unique_graphs"]
    losses, weights = _run(base, tmp_path / "compiled", method, compiled=True)
    assert counters["stats"]["unique_graphs"] > frames  # dynamo did compile the layer
    assert len(losses) == 4 and losses[-1] < losses[0]  # it trains
    assert losses == pytest.approx(eager_losses, rel=1e-3)
    assert weights.keys() == eager.keys()  # no "_orig_mod." in the saved names
    for name, tensor in eager.items():
        torch.testing.assert_close(weights[name], tensor, rtol=1e-3, atol=1e-4, msg=name)


@pytest.mark.parametrize("env", ["ACCELERATE_USE_DEEPSPEED", "ACCELERATE_USE_FSDP"])
def test_compile_is_refused_under_deepspeed_and_fsdp(base, tmp_path, monkeypatch, env):
    from transformers import AutoModelForCausalLM

    monkeypatch.setenv(env, "true")
    with pytest.raises(CalltuneError, match="torch_compile: not supported under"):  # before loading anything
        train(str(base), examples(), get_format("hermes"), TrainConfig(method="lora", torch_compile=True),
              tmp_path / "out")
    assert not (tmp_path / "out").exists()
    model = AutoModelForCausalLM.from_pretrained(base)
    with pytest.raises(CalltuneError, match="torch_compile: not supported under"):
        compile_decoder_layers(model)
    monkeypatch.delenv(env)
    assert compile_decoder_layers(model) == 1
