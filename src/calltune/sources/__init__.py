"""Dataset adapters: each reads one public layout (file or hub id) into canonical `Example`s.

Owns the source registry `SOURCES` (name -> loader) and `load_source`. Rows a source cannot use
are counted in a `Rejects` and written to a rejects file with the reason.
"""

from __future__ import annotations

import difflib
from pathlib import Path
from typing import Callable

from calltune.errors import CalltuneError
from calltune.schema import Example
from calltune.sources.base import Rejects, SourceError, read_table
from calltune.sources.glaive import load_glaive
from calltune.sources.hermes import load_hermes
from calltune.sources.llama_functions import load_llama_functions
from calltune.sources.openai_jsonl import load_openai_jsonl
from calltune.sources.viggo import load_viggo
from calltune.sources.xlam import load_xlam


def load_bfcl_categories(categories: str, split: str = "train", rejects: Rejects | None = None,
                         limit: int | None = None) -> list[Example]:
    """BFCL as a source: `categories` is a comma-separated list (``live_simple,live_multiple``), read
    from the installed bfcl-eval wheel; `limit` applies per category. `split` is unused (BFCL has none).
    """
    from calltune.sources.bfcl import load_bfcl

    examples: list[Example] = []
    for category in (c.strip() for c in str(categories).split(",") if c.strip()):
        examples += load_bfcl(category, limit=limit, rejects=rejects)
    return examples


SOURCES: dict[str, Callable[..., list[Example]]] = {
    "viggo": load_viggo,
    "xlam": load_xlam,
    "glaive": load_glaive,
    "llama_functions": load_llama_functions,
    "openai_jsonl": load_openai_jsonl,
    "hermes": load_hermes,
    "bfcl": load_bfcl_categories,
}


def load_source(name: str, path_or_id: str | Path, split: str = "train", rejects: Rejects | None = None,
                limit: int | None = None) -> list[Example]:
    """Load `path_or_id` with the source called `name` (see `SOURCES`).

    Raises:
        ValueError: unknown source name (with "did you mean" and the choices).
        SourceError: the file is not what the source expects.
    """
    if name not in SOURCES:
        close = difflib.get_close_matches(name, SOURCES, n=1)
        hint = f" Did you mean {close[0]!r}?" if close else ""
        raise CalltuneError(f"unknown source {name!r}.{hint} Choices: {', '.join(sorted(SOURCES))}")
    return SOURCES[name](path_or_id, split=split, rejects=rejects, limit=limit)


__all__ = ["SOURCES", "Rejects", "SourceError", "load_bfcl_categories", "load_glaive", "load_hermes",
           "load_llama_functions", "load_openai_jsonl", "load_source", "load_viggo", "load_xlam", "read_table"]
