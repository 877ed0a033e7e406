"""Prompt formats: how canonical examples become model text (with loss masks) and back.

Owns the format registry: `get_format(name)` and `FORMATS`. Each format renders for training and
parses for inference (see `calltune.formats.base.PromptFormat`).
"""

from __future__ import annotations

import difflib

from calltune.formats.base import FORMAT_FILE, Parsed, PromptFormat, load_format, save_format
from calltune.formats.chat import FormatError
from calltune.formats.viggo import ViggoFormat

FORMATS: dict[str, type[PromptFormat]] = {f.name: f for f in (ViggoFormat,)}


def get_format(name: str, **options) -> PromptFormat:
    """The format called `name`; an unknown name raises ValueError with "did you mean" and the choices."""
    if name not in FORMATS:
        close = difflib.get_close_matches(name, FORMATS, n=1)
        hint = f" Did you mean {close[0]!r}?" if close else ""
        raise ValueError(f"unknown prompt format {name!r}.{hint} Choices: {', '.join(sorted(FORMATS))}")
    return FORMATS[name](**options)


__all__ = ["FORMATS", "FORMAT_FILE", "FormatError", "Parsed", "PromptFormat", "get_format", "load_format",
           "save_format"]
