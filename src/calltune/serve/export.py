"""Exporting a tuned model for other runtimes: full HF safetensors, and GGUF through llama.cpp.

Owns `export_hf` (a LoRA adapter merged into its base; a full model copied as safetensors) and
`export_gguf`, which runs llama.cpp's own converter (``convert_hf_to_gguf.py``, the maintained one;
its architecture tables move with llama.cpp) on the merged model. calltune does not vendor the
converter: it is found through ``--converter``, ``$LLAMA_CPP_DIR`` or ``PATH``, and when it is missing
`ConverterNotFound` says exactly what to run instead.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

from calltune.models import is_adapter, resolve_model

CONVERTER = "convert_hf_to_gguf.py"
OUTTYPES = ("f32", "f16", "bf16", "q8_0", "auto")


class ConverterNotFound(FileNotFoundError):
    """llama.cpp's convert_hf_to_gguf.py is not available; the message says how to get it."""


def export_hf(model: str, output: str | Path) -> Path:
    """Full HF safetensors (with tokenizer and prompt format) that plain transformers loads."""
    from calltune.formats import load_format, save_format
    from calltune.models import load_model
    from calltune.train import merge_adapter

    path = resolve_model(model)
    output = Path(output)
    if is_adapter(path):
        return merge_adapter(path, output)
    loaded, tokenizer, _ = load_model(path)
    loaded.save_pretrained(output, safe_serialization=True)
    tokenizer.save_pretrained(output)
    fmt = load_format(path)
    if fmt is not None:
        save_format(fmt, output)
    return output


def find_converter(converter: str | Path | None = None) -> Path:
    """llama.cpp's converter: `converter`, ``$LLAMA_CPP_DIR/convert_hf_to_gguf.py``, or on ``PATH``.

    Raises:
        ConverterNotFound: none of those exists; the message gives the commands to get it.
    """
    candidates = []
    if converter:
        candidates.append(Path(converter))
    if os.environ.get("LLAMA_CPP_DIR"):
        candidates.append(Path(os.environ["LLAMA_CPP_DIR"]) / CONVERTER)
    for name in (CONVERTER, "convert-hf-to-gguf"):
        found = shutil.which(name)
        if found:
            candidates.append(Path(found))
    for candidate in candidates:
        if candidate.is_file():
            return candidate
    tried = ", ".join(str(c) for c in candidates) or "nothing given"
    raise ConverterNotFound(
        f"GGUF export needs llama.cpp's {CONVERTER} (tried: {tried}). Get it and rerun with --converter:\n"
        "  git clone --depth 1 https://github.com/ggml-org/llama.cpp\n"
        "  pip install -r llama.cpp/requirements/requirements-convert_hf_to_gguf.txt\n"
        "  calltune export MODEL --format gguf -o model.gguf --converter llama.cpp/convert_hf_to_gguf.py\n"
        "or convert by hand: `calltune export MODEL --format hf -o merged` then "
        "`python llama.cpp/convert_hf_to_gguf.py merged --outfile model.gguf --outtype q8_0`.")


def export_gguf(model: str, output: str | Path, outtype: str = "q8_0", converter: str | Path | None = None) -> Path:
    """Convert `model` (merged first if it is a LoRA adapter) to one GGUF file with llama.cpp's converter.

    Raises:
        ConverterNotFound: see `find_converter` (checked before anything is merged).
        ValueError: unknown `outtype`.
        RuntimeError: the converter failed (its output is in the message).
    """
    if outtype not in OUTTYPES:
        raise ValueError(f"unknown GGUF outtype {outtype!r}; choices: {', '.join(OUTTYPES)}")
    script = find_converter(converter)
    output = Path(output)
    output.parent.mkdir(parents=True, exist_ok=True)
    path = resolve_model(model)
    with tempfile.TemporaryDirectory(prefix="calltune-export-") as tmp:
        source = Path(export_hf(path, Path(tmp) / "merged")) if is_adapter(path) else Path(path)
        cmd = [sys.executable, str(script), str(source), "--outfile", str(output), "--outtype", outtype]
        done = subprocess.run(cmd, capture_output=True, text=True)
    if done.returncode != 0 or not output.exists():
        tail = "\n".join((done.stderr or done.stdout).strip().splitlines()[-15:])
        raise RuntimeError(f"{' '.join(cmd)} failed (exit {done.returncode}):\n{tail}")
    return output
