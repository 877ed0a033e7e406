"""Dataset adapters: each reads one public layout (file or hub id) into canonical `Example`s.

Owns the source registry `SOURCES` (name -> loader) and `load_source`. Rows a source cannot use
are counted in a `Rejects` and written to a rejects file with the reason.
"""

from __future__ import annotations

import difflib
from pathlib import Path
from typing import Callable

from calltune.schema import Example
from calltune.sources.base import Rejects, SourceError, read_table
from calltune.sources.viggo import load_viggo

SOURCES: dict[str, Callable[..., list[Example]]] = {
    "viggo": load_viggo,
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
        raise ValueError(f"unknown source {name!r}.{hint} Choices: {', '.join(sorted(SOURCES))}")
    return SOURCES[name](path_or_id, split=split, rejects=rejects, limit=limit)


__all__ = ["SOURCES", "Rejects", "SourceError", "load_source", "read_table"]

# The JSON-schema tool-calling datasets.
from calltune.sources.glaive import load_glaive  # noqa: E402
from calltune.sources.hermes import load_hermes  # noqa: E402
from calltune.sources.llama_functions import load_llama_functions  # noqa: E402
from calltune.sources.openai_jsonl import load_openai_jsonl  # noqa: E402
from calltune.sources.xlam import load_xlam  # noqa: E402

SOURCES.update({
    "xlam": load_xlam,
    "glaive": load_glaive,
    "llama_functions": load_llama_functions,
    "openai_jsonl": load_openai_jsonl,
    "hermes": load_hermes,
})
__all__ += ["load_glaive", "load_hermes", "load_llama_functions", "load_openai_jsonl", "load_xlam"]
