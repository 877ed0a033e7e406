"""Canonical JSONL files: one `Example.to_json()` per line, as ``calltune data clean`` and
``calltune data augment`` write them (augment reads them back when given no source)."""

from __future__ import annotations

import io
import json
from pathlib import Path

from calltune.schema import Example, SchemaError
from calltune.sources.base import SourceError, read_text


def write_jsonl(examples: list[Example], path: str | Path) -> Path:
    """Write canonical JSONL: one `Example.to_json()` per line (UTF-8). Creates the parent folder."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", encoding="utf-8") as f:
        for example in examples:
            f.write(example.to_json() + "\n")
    return path


def read_jsonl(path: str | Path) -> list[Example]:
    """Read a file written by `write_jsonl` back into `Example`s (blank lines are skipped).

    Raises:
        SourceError: the file is missing, a directory, empty, unreadable or not UTF-8 (a leading BOM
            is accepted), or a line is not JSON or not a canonical example (the message names the line).
    """
    path = Path(path)
    out = []
    for i, line in enumerate(io.StringIO(read_text(path), newline=None)):  # universal newlines, as open()
        if not line.strip():
            continue
        try:
            out.append(Example.from_json(line))
        except json.JSONDecodeError as err:
            raise SourceError(str(path), i, None, f"line {i + 1} is not JSON ({err.msg})") from None
        except SchemaError as err:
            raise SourceError(str(path), i, None, f"line {i + 1} is not a canonical example: {err}") from None
    return out
