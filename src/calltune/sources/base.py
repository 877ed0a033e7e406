"""Shared plumbing of the dataset adapters: reading rows from a file or the hub, and the rejects file.

Owns `SourceError` (bad input, naming file, row and field), `Rejects` (rows a source or a cleaning
rule could not use, written as JSONL with the reason, never dropped in silence), `read_table`,
which reads CSV / JSON / JSONL / Parquet files or a hub dataset id through the `datasets` library,
and the checks every local data file passes first (`check_file`, `read_text`): a readable regular
file, not empty, UTF-8 (a leading BOM is accepted); a failure is a `SourceError` naming the file and,
for bad bytes, the line (and the row of a ``.jsonl`` file).
"""

from __future__ import annotations

import codecs
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable

from calltune.errors import CalltuneError


class SourceError(CalltuneError):
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
_TEXT_KINDS = {".csv", ".json", ".jsonl"}
_CHUNK = 1 << 20


def is_local_path(path_or_id: str | Path) -> bool:
    """Whether `path_or_id` names a local file (it exists, or has a data file suffix), not a hub id."""
    path = Path(path_or_id)
    return path.suffix.lower() in _LOADERS or path.exists()


def _one_line(err: Exception) -> str:
    return " ".join(str(err).split())


def check_file(path: str | Path, where: str | None = None) -> Path:
    """`path` as a `Path` if it is an existing, non-empty regular file that can be opened.

    Raises:
        SourceError: missing, a directory (or other non-file), empty, or not readable.
    """
    path = Path(path)
    where = where or str(path)
    if not path.exists():
        raise SourceError(where, None, None, "file not found; check the path")
    if path.is_dir():
        raise SourceError(where, None, None, "is a directory, not a file; give the path of the file itself")
    if not path.is_file():
        raise SourceError(where, None, None, "is not a regular file; give the path of a data file")
    try:
        with path.open("rb"):
            pass
        size = path.stat().st_size
    except OSError as err:
        raise SourceError(where, None, None, f"cannot be read ({err.strerror}); check its permissions") from None
    if size == 0:
        raise SourceError(where, None, None, "file is empty; give a file with rows")
    return path


def _not_utf8(where: str, path: Path, data: bytes, err: UnicodeDecodeError, before: int = 0,
              lines_before: int = 0) -> SourceError:
    """The `SourceError` for bytes that are not UTF-8: names the line (and the row of a ``.jsonl`` file).

    `data` is what `err` indexes; `before` bytes and `lines_before` newlines precede it in the file.
    """
    head = data[:err.start]
    line = lines_before + head.count(b"\n") + 1
    row = None
    if path.suffix.lower() == ".jsonl" and not before:  # rows are the non-blank lines before this one
        row = sum(1 for text in head.split(b"\n")[:-1] if text.strip())
    bad = data[err.start:err.end].hex(" ")
    return SourceError(where, row, None, f"line {line} (byte {before + err.start}) is not UTF-8 (bytes {bad}); "
                                         "save the file as UTF-8, e.g. iconv -f latin1 -t utf-8")


def read_text(path: str | Path, where: str | None = None) -> str:
    """The text of a local UTF-8 file, a leading byte-order mark removed (`check_file` first).

    Raises:
        SourceError: as `check_file`, or bytes that are not UTF-8 (naming the line, and the row of a
            ``.jsonl`` file).
    """
    path = check_file(path, where)
    where = where or str(path)
    try:
        data = path.read_bytes()
    except OSError as err:
        raise SourceError(where, None, None, f"cannot be read ({err.strerror}); check its permissions") from None
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as err:
        bom = 3 if data.startswith(codecs.BOM_UTF8) else 0
        err.start, err.end = err.start + bom, err.end + bom  # utf-8-sig indexes after the BOM
        raise _not_utf8(where, path, data, err) from None


def check_utf8(path: Path, where: str) -> None:
    """Raise `SourceError` (naming the line) if the file is not UTF-8; reads it in chunks."""
    decoder = codecs.getincrementaldecoder("utf-8")()
    offset = lines = 0  # bytes and newlines before the current chunk
    with path.open("rb") as f:
        while chunk := f.read(_CHUNK):
            pending = decoder.getstate()[0]  # bytes of a character split across chunks
            try:
                decoder.decode(chunk)
            except UnicodeDecodeError as err:
                raise _not_utf8(where, path, err.object, err, offset - len(pending), lines) from None
            offset, lines = offset + len(chunk), lines + chunk.count(b"\n")
        try:
            decoder.decode(b"", final=True)
        except UnicodeDecodeError as err:
            raise _not_utf8(where, path, err.object, err, offset - len(err.object), lines) from None


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
        SourceError: the file is missing, a directory, empty, unreadable, not UTF-8 (CSV / JSON),
            or lacks a required column.
    """
    import datasets

    where = str(path_or_id)
    path = Path(path_or_id)
    if is_local_path(path):
        check_file(path, where)
        kind = _LOADERS.get(path.suffix.lower())
        if kind is None:
            raise SourceError(where, None, None, f"unknown file type {path.suffix!r}; use one of {sorted(_LOADERS)}")
        if path.suffix.lower() in _TEXT_KINDS:
            check_utf8(path, where)  # `datasets` would name neither the file nor the line
        try:
            ds = datasets.load_dataset(kind, data_files=str(path), split="train")
        except Exception as err:  # datasets wraps parser errors in many types
            raise SourceError(where, None, None, f"cannot be read as {kind}: {_one_line(err)}") from err
    else:
        try:
            ds = datasets.load_dataset(where, name, split=split)
        except Exception as err:
            raise SourceError(where, None, None, "not a local file (check the path), and loading it as a hub dataset "
                                                 f"failed: {_one_line(err)}") from err
    if len(ds) == 0:
        raise SourceError(where, None, None, "has no rows")
    missing = [c for c in required if c not in ds.column_names]
    if missing:
        raise SourceError(where, None, missing[0],
                          f"missing column(s) {missing}; found {ds.column_names}; check that the file is in "
                          "this source's layout")
    return where, ds.to_list()

