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
