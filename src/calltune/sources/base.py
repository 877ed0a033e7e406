"""Shared plumbing of the dataset adapters: reading rows from a file or the hub, and the rejects file.

Owns `SourceError` (bad input, naming file, row and field), `Rejects` (rows a source or a cleaning
rule could not use, written as JSONL with the reason, never dropped in silence) and `read_table`,
which reads CSV / JSON / JSONL / Parquet files or a hub dataset id through the `datasets` library.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable


class SourceError(ValueError):
    """A dataset file is not what its source expects. The message names the file, row and field."""

    def __init__(self, where: str, row: int | None, field_name: str | None, problem: str):
        self.where, self.row, self.field, self.problem = where, row, field_name, problem
        parts = [where]
        if row is not None:
            parts.append(f"row {row}")
        if field_name:
            parts.append(f"field {field_name!r}")
        super().__init__(f"{', '.join(parts)}: {problem}")


@dataclass
class Rejects:
    """Rows that could not be used, with the reason: counted, and written to a JSONL file.

    Each line is ``{"source": ..., "row": N, "stage": ..., "reason": ..., "data": <the raw row>}``.
    `path=None` keeps them in memory only (tests, previews); `counts` is ``reason-kind -> n``.
    """

    path: Path | None = None
    items: list[dict[str, Any]] = field(default_factory=list)

    def add(self, source: str, row: int | None, reason: str, data: Any, stage: str = "load") -> None:
        self.items.append({"source": source, "row": row, "stage": stage, "reason": reason, "data": data})

    def __len__(self) -> int:
        return len(self.items)

    @property
    def counts(self) -> dict[str, int]:
        out: dict[str, int] = {}
        for item in self.items:
            kind = f"{item['stage']}: {item['reason'].split(':')[0]}"
            out[kind] = out.get(kind, 0) + 1
        return out

    def write(self, path: Path | None = None) -> Path | None:
        """Write every reject as a JSONL line to `path` (default: `self.path`); returns the path."""
        path = Path(path or self.path) if (path or self.path) else None
        if path is None:
            return None
        path.parent.mkdir(parents=True, exist_ok=True)
        with path.open("w", encoding="utf-8") as f:
            for item in self.items:
                f.write(json.dumps(item, ensure_ascii=False, default=str) + "\n")
        return path


_LOADERS = {".csv": "csv", ".json": "json", ".jsonl": "json", ".parquet": "parquet"}


def read_table(path_or_id: str | Path, split: str = "train", name: str | None = None,
               required: Iterable[str] = ()) -> tuple[str, list[dict[str, Any]]]:
    """Read all rows of a local file or a Hugging Face hub dataset.

    Args:
        path_or_id: a local ``.csv``, ``.json``, ``.jsonl`` or ``.parquet`` file, or a hub dataset id
            (``GEM/viggo``), loaded with `datasets.load_dataset`.
        split: split of a hub dataset (local files load as one ``train`` split).
        name: config name of a hub dataset.
        required: columns every row must have; a missing one raises `SourceError`.

    Returns:
        ``(where, rows)``: a printable location for messages, and the rows as dicts.

    Raises:
        SourceError: the file is missing, empty, unreadable, or lacks a required column.
    """
    import datasets

    where = str(path_or_id)
    path = Path(path_or_id)
    if path.suffix.lower() in _LOADERS or path.exists():
        if not path.exists():
            raise SourceError(where, None, None, "file not found")
        if path.stat().st_size == 0:
            raise SourceError(where, None, None, "file is empty")
        kind = _LOADERS.get(path.suffix.lower())
        if kind is None:
            raise SourceError(where, None, None, f"unknown file type {path.suffix!r}; use one of {sorted(_LOADERS)}")
        try:
            ds = datasets.load_dataset(kind, data_files=str(path), split="train")
        except Exception as err:  # datasets wraps parser errors in many types
            raise SourceError(where, None, None, f"cannot be read as {kind}: {err}") from err
    else:
        try:
            ds = datasets.load_dataset(where, name, split=split)
        except Exception as err:
            raise SourceError(where, None, None, f"not a local file, and loading it from the hub failed: {err}") from err
    if len(ds) == 0:
        raise SourceError(where, None, None, "has no rows")
    missing = [c for c in required if c not in ds.column_names]
    if missing:
        raise SourceError(where, None, missing[0],
                          f"missing column(s) {missing}; found {ds.column_names}")
    return where, ds.to_list()

