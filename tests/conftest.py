"""Shared fixtures: paths to ../shared (read in place, never copied) and the real SmolLM2."""

from __future__ import annotations

from pathlib import Path

import pytest

SHARED = Path(__file__).resolve().parents[2] / "shared"
VIGGO = SHARED / "data" / "viggo"
SAMPLES = SHARED / "data" / "samples"


@pytest.fixture(scope="session")
def smollm2_path() -> str:
    """The built-in alias resolved to its cached HF folder (dequantised from the GGUF on first use)."""
    from calltune.models import resolve_model

    return resolve_model("smollm2-135m-instruct")


@pytest.fixture(scope="session")
def tokenizer(smollm2_path):
    from calltune.models import load_tokenizer

    return load_tokenizer(smollm2_path)


@pytest.fixture(scope="session")
def viggo_valid():
    from calltune.sources.viggo import load_viggo

    return load_viggo(VIGGO / "valid.csv")


@pytest.fixture(scope="session")
def tokenizer_for(tokenizer):
    """``tokenizer_for(format_name)``: the tokenizer a format's tests render with -- SmolLM2's, or for
    ``chat_template`` a copy with a Qwen2.5-style template that renders tools and tool calls."""
    import copy

    from test_formats_toolcalling import QWEN_STYLE_TEMPLATE

    qwen = copy.deepcopy(tokenizer)
    qwen.chat_template = QWEN_STYLE_TEMPLATE
    return lambda name: qwen if name == "chat_template" else tokenizer


@pytest.fixture(scope="session")
def qwen_tokenizer(tokenizer_for):
    """SmolLM2's tokenizer with the Qwen2.5-style template that renders tools (`tokenizer_for`)."""
    return tokenizer_for("chat_template")


@pytest.fixture(scope="session")
def sample_examples():
    """Every row of the shared xLAM, glaive-v2, Hermes and llama_functions samples, as canonical examples."""
    from calltune.sources import Rejects
    from calltune.sources.glaive import load_glaive
    from calltune.sources.hermes import load_hermes
    from calltune.sources.llama_functions import load_llama_functions
    from calltune.sources.xlam import load_xlam

    out = []
    for loader, name in ((load_xlam, "xlam_function_calling_60k.json"),
                         (load_glaive, "glaive-function-calling-v2.json"),
                         (load_hermes, "hermes-function-calling-v1.json"),
                         (load_llama_functions, "llama_functions.jsonl")):
        out += loader(SAMPLES / name, rejects=Rejects())
    return out

