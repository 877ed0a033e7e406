"""A tiny random Llama, a tool-calling data file and a recipe that trains it in seconds, for the
multi-process (tests/test_distributed.py) and resume (tests/test_resume.py) tests.

The model has SmolLM2's tokenizer and a 16-wide, one-layer decoder; the data are OpenAI-format rows
(``openai_jsonl``) asking for the weather of a city, answered with a ``get_weather`` call.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
CITIES = ["Paris", "Tokyo", "Rome", "Lima", "Oslo", "Cairo", "Quito", "Delhi", "Seoul", "Dakar", "Perth", "Bern",
          "Riga", "Baku", "Doha", "Accra"]
WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "Current weather of a city.",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}


def tiny_base(root: Path, tokenizer) -> Path:
    """Save a random one-layer Llama (seeded) with `tokenizer` under ``root/base``; returns the folder."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                         num_attention_heads=2, num_key_value_heads=1, tie_word_embeddings=True,
                         bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                         pad_token_id=tokenizer.pad_token_id)
    folder = root / "base"
    LlamaForCausalLM(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def write_data(path: Path, n: int = 16) -> Path:
    """`n` OpenAI-format rows, one city each (at most len(CITIES))."""
    rows = [{"tools": [WEATHER], "messages": [
        {"role": "user", "content": f"What's the weather in {city}?"},
        {"role": "assistant", "tool_calls": [{"id": f"c{i}", "type": "function", "function": {
            "name": "get_weather", "arguments": json.dumps({"city": city})}}]}]}
        for i, city in enumerate(CITIES[:n])]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def write_recipe(path: Path, model: Path, data: Path, **train) -> Path:
    """A recipe training `model` with LoRA on `data` (also its eval file: 2 rows, 4 new tokens, no base eval)."""
    settings = {"method": "lora", "max_steps": 6, "batch_size": 4, "learning_rate": 1e-2, "warmup_ratio": 0.0,
                "lr_scheduler": "constant", "mixed_precision": "no", "logging_steps": 1, "save_steps": 1000,
                "max_length": 512, "lora": {"r": 4, "alpha": 8, "target_modules": ["q_proj", "v_proj"]}, **train}
    recipe = {"name": "tiny", "model": str(model), "format": "hermes",
              "data": {"source": "openai_jsonl", "train": str(data), "eval": str(data), "eval_limit": 2},
              "train": settings, "eval": {"base": False, "max_new_tokens": 4, "batch_size": 2}}
    path.write_text(f"# python -m calltune train {path}\n" + yaml.safe_dump(recipe, sort_keys=False))
    return path


def losses(model_dir: Path) -> list[float]:
    """The logged training loss of every step, from the model folder's ``train_log.json``."""
    return [h["loss"] for h in json.loads((Path(model_dir) / "train_log.json").read_text()) if "loss" in h]


def adapter_weights(model_dir: Path) -> dict:
    """The saved LoRA adapter's tensors by name."""
    from safetensors.torch import load_file

    return load_file(str(Path(model_dir) / "adapter_model.safetensors"))


def env() -> dict[str, str]:
    """The environment for a training subprocess: one thread per process (2 processes share 2 cores), the
    repository's tests on the path."""
    return {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false",
            "PYTHONPATH": os.pathsep.join([str(ROOT / "tests"), os.environ.get("PYTHONPATH", "")])}


def launch(args: list[str], cwd: Path, timeout: float = 300) -> subprocess.CompletedProcess:
    """Run a command (e.g. ``torchrun ... -m calltune train ...``) to its end; fail with its output if it fails."""
    out = subprocess.run(args, cwd=cwd, env=env(), capture_output=True, text=True, timeout=timeout)
    command = " ".join(map(str, args))
    assert out.returncode == 0, f"{command} exited {out.returncode}\n{out.stdout[-3000:]}\n{out.stderr[-6000:]}"
    return out


PYTHON = sys.executable


def slow_train(recipe: str, output_dir: str, pause: float) -> None:
    """Train `recipe` into `output_dir` as ``calltune train`` does, pausing `pause` seconds after every
    optimizer step (time for a test to kill it mid-run; the pause changes nothing trained)."""
    import time

    from transformers import TrainerCallback

    from calltune.pipeline import prepare, recipe_format
    from calltune.recipe import load_recipe
    from calltune.train import train

    class Pause(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            time.sleep(pause)

    r = load_recipe(recipe)
    out = Path(output_dir)
    examples, _, _, rejects = prepare(r, out.parent)
    train(r.model, examples, recipe_format(r), r.train, out, rejects=rejects, callbacks=[Pause()])


if __name__ == "__main__":  # python tests/tiny_training.py RECIPE OUTPUT_DIR PAUSE_SECONDS
    slow_train(sys.argv[1], sys.argv[2], float(sys.argv[3]))
