"""The fine-tuning service's state: uploaded files, jobs, their events and checkpoints, in SQLite.

Owns `JobStore` (one SQLite database in write-ahead-log mode, shared by the server and its worker
process; every call opens its own short connection, so threads and processes never share one) and
the layout of the server's data directory::

    <data_dir>/calltune.db            the state (tables files, jobs, events, checkpoints)
    <data_dir>/files/<file-id><ext>    uploaded files, byte for byte
    <data_dir>/runs/<job-id>/          one job's run folder (`calltune.pipeline.run_recipe`'s output)

Ids are made here (``file-``, ``ftjob-``, ``ftevent-``, ``ftckpt-`` and 24 hex digits) and checked by
`valid_id` before any of them names a path, so that no request can address anything outside the
data directory. Objects are returned as plain dicts whose JSON columns are already parsed. Timestamps
are Unix seconds, as in OpenAI's objects.
"""

from __future__ import annotations

import json
import re
import sqlite3
import time
import uuid
from contextlib import closing, contextmanager
from pathlib import Path
from typing import Any, Iterator

PREFIXES = {"file": "file-", "job": "ftjob-", "event": "ftevent-", "checkpoint": "ftckpt-"}
_ID = re.compile(r"^(file|ftjob|ftevent|ftckpt)-[0-9a-f]{24}$")

# statuses of a job (OpenAI's); the last three are final
ACTIVE = ("validating_files", "queued", "running")
FINAL = ("succeeded", "failed", "cancelled")

_SCHEMA = """
CREATE TABLE IF NOT EXISTS files (
    seq INTEGER PRIMARY KEY AUTOINCREMENT, id TEXT UNIQUE NOT NULL, filename TEXT NOT NULL,
    bytes INTEGER NOT NULL, created_at INTEGER NOT NULL, purpose TEXT NOT NULL, source TEXT,
    path TEXT NOT NULL, examples INTEGER);
CREATE TABLE IF NOT EXISTS jobs (
    seq INTEGER PRIMARY KEY AUTOINCREMENT, id TEXT UNIQUE NOT NULL, created_at INTEGER NOT NULL,
    status TEXT NOT NULL, model TEXT NOT NULL, training_file TEXT NOT NULL, validation_file TEXT,
    suffix TEXT, seed INTEGER NOT NULL, metadata TEXT, hyperparameters TEXT NOT NULL, method TEXT NOT NULL,
    recipe TEXT NOT NULL, fine_tuned_model TEXT, started_at INTEGER, finished_at INTEGER,
    trained_tokens INTEGER, result_files TEXT NOT NULL DEFAULT '[]', error TEXT, worker_pid INTEGER,
    resume_from TEXT);
CREATE TABLE IF NOT EXISTS events (
    seq INTEGER PRIMARY KEY AUTOINCREMENT, id TEXT UNIQUE NOT NULL, job_id TEXT NOT NULL,
    created_at INTEGER NOT NULL, level TEXT NOT NULL, message TEXT NOT NULL, data TEXT, type TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS checkpoints (
    seq INTEGER PRIMARY KEY AUTOINCREMENT, id TEXT UNIQUE NOT NULL, job_id TEXT NOT NULL,
    created_at INTEGER NOT NULL, step INTEGER NOT NULL, path TEXT NOT NULL, metrics TEXT NOT NULL);
CREATE INDEX IF NOT EXISTS events_job ON events (job_id, seq);
CREATE INDEX IF NOT EXISTS checkpoints_job ON checkpoints (job_id, seq);
"""
_JSON_COLUMNS = ("metadata", "hyperparameters", "method", "recipe", "result_files", "error", "data", "metrics")


def new_id(kind: str) -> str:
    """A fresh id of `kind` (``file``, ``job``, ``event``, ``checkpoint``), e.g. ``ftjob-3f9c...``."""
    return PREFIXES[kind] + uuid.uuid4().hex[:24]


def valid_id(kind: str, value: str) -> bool:
    """Whether `value` is an id of `kind` as `new_id` makes them (so it is safe inside a path)."""
    return isinstance(value, str) and value.startswith(PREFIXES[kind]) and _ID.match(value) is not None


def now() -> int:
    return int(time.time())


class JobStore:
    """The SQLite state under `data_dir` (created if missing), and the folders beside it."""

    def __init__(self, data_dir: str | Path):
        self.root = Path(data_dir).resolve()
        self.files_dir = self.root / "files"
        self.runs_dir = self.root / "runs"
        for folder in (self.root, self.files_dir, self.runs_dir):
            folder.mkdir(parents=True, exist_ok=True)
        self.db = self.root / "calltune.db"
        with self._connect() as db:
            db.execute("PRAGMA journal_mode=WAL")  # readers don't block the writer (server and worker)
            db.executescript(_SCHEMA)

    @contextmanager
    def _connect(self) -> Iterator[sqlite3.Connection]:
        """A connection for one transaction: committed when the block ends, rolled back on error."""
        with closing(sqlite3.connect(self.db, timeout=30)) as db:
            db.row_factory = sqlite3.Row
            with db:
                yield db

    @staticmethod
    def _row(row: sqlite3.Row | None) -> dict[str, Any] | None:
        if row is None:
            return None
        out = dict(row)
        for key in _JSON_COLUMNS:
            if key in out and out[key] is not None:
                out[key] = json.loads(out[key])
        return out

    # -- paths --------------------------------------------------------------------------------
    def file_path(self, file: dict[str, Any]) -> Path:
        return self.files_dir / file["path"]

    def run_dir(self, job_id: str) -> Path:
        if not valid_id("job", job_id):
            raise ValueError(f"not a job id: {job_id!r}")
        return self.runs_dir / job_id

    # -- files --------------------------------------------------------------------------------
    def add_file(self, file_id: str, filename: str, size: int, purpose: str, source: str | None, path: str,
                 examples: int | None) -> dict[str, Any]:
        with self._connect() as db:
            db.execute("INSERT INTO files (id, filename, bytes, created_at, purpose, source, path, examples) "
                       "VALUES (?, ?, ?, ?, ?, ?, ?, ?)", (file_id, filename, size, now(), purpose, source, path, examples))
        return self.get_file(file_id)  # type: ignore[return-value]

    def get_file(self, file_id: str) -> dict[str, Any] | None:
        if not valid_id("file", file_id):
            return None
        with self._connect() as db:
            return self._row(db.execute("SELECT * FROM files WHERE id = ?", (file_id,)).fetchone())

    def list_files(self, purpose: str | None = None, after: str | None = None, limit: int = 10000,
                   newest_first: bool = True) -> tuple[list[dict[str, Any]], bool]:
        """Files (newest first unless `newest_first` is False) after the file `after`; returns (page, has_more)."""
        return self._page("files", "1 = 1" if purpose is None else "purpose = ?", () if purpose is None else (purpose,),
                          after, limit, newest_first)

    def delete_file(self, file_id: str) -> bool:
        file = self.get_file(file_id)
        if file is None:
            return False
        with self._connect() as db:
            db.execute("DELETE FROM files WHERE id = ?", (file_id,))
        self.file_path(file).unlink(missing_ok=True)
        return True

    # -- jobs ---------------------------------------------------------------------------------
    def add_job(self, job: dict[str, Any]) -> dict[str, Any]:
        columns = list(job)
        values = [json.dumps(v) if k in _JSON_COLUMNS and v is not None else v for k, v in job.items()]
        with self._connect() as db:
            db.execute(f"INSERT INTO jobs ({', '.join(columns)}) VALUES ({', '.join('?' * len(columns))})", values)
        return self.get_job(job["id"])  # type: ignore[return-value]

    def get_job(self, job_id: str) -> dict[str, Any] | None:
        if not valid_id("job", job_id):
            return None
        with self._connect() as db:
            return self._row(db.execute("SELECT * FROM jobs WHERE id = ?", (job_id,)).fetchone())

    def list_jobs(self, after: str | None = None, limit: int = 20,
                  status: tuple[str, ...] | None = None) -> tuple[list[dict[str, Any]], bool]:
        """Jobs, newest first, after the job `after`; returns (page, has_more)."""
        where = f"status IN ({', '.join('?' * len(status))})" if status else "1 = 1"
        return self._page("jobs", where, tuple(status or ()), after, limit, True)

    def oldest_job(self, status: str) -> dict[str, Any] | None:
        with self._connect() as db:
            return self._row(db.execute("SELECT * FROM jobs WHERE status = ? ORDER BY seq LIMIT 1",
                                        (status,)).fetchone())

    def update_job(self, job_id: str, only_if: tuple[str, ...] | None = None, **fields: Any) -> bool:
        """Set `fields` of a job; with `only_if`, only while its status is one of those (atomically).

        Returns whether the job was changed.
        """
        sets = ", ".join(f"{k} = ?" for k in fields)
        values = [json.dumps(v) if k in _JSON_COLUMNS and v is not None else v for k, v in fields.items()]
        where = "id = ?"
        if only_if:
            where += f" AND status IN ({', '.join('?' * len(only_if))})"
            values += [job_id, *only_if]
        else:
            values.append(job_id)
        with self._connect() as db:
            return db.execute(f"UPDATE jobs SET {sets} WHERE {where}", values).rowcount == 1

    # -- events and checkpoints ---------------------------------------------------------------
    def add_event(self, job_id: str, message: str, level: str = "info", data: dict[str, Any] | None = None,
                  type: str = "message") -> None:
        with self._connect() as db:
            db.execute("INSERT INTO events (id, job_id, created_at, level, message, data, type) VALUES (?, ?, ?, ?, ?, ?, ?)",
                       (new_id("event"), job_id, now(), level, message, json.dumps(data) if data is not None else None, type))

    def list_events(self, job_id: str, after: str | None = None, limit: int = 10000,
                    newest_first: bool = True) -> tuple[list[dict[str, Any]], bool]:
        return self._page("events", "job_id = ?", (job_id,), after, limit, newest_first)

    def add_checkpoint(self, job_id: str, step: int, path: str, metrics: dict[str, Any]) -> None:
        with self._connect() as db:
            db.execute("INSERT INTO checkpoints (id, job_id, created_at, step, path, metrics) VALUES (?, ?, ?, ?, ?, ?)",
                       (new_id("checkpoint"), job_id, now(), step, path, json.dumps(metrics)))

    def list_checkpoints(self, job_id: str, after: str | None = None, limit: int = 10000) -> tuple[list[dict[str, Any]], bool]:
        return self._page("checkpoints", "job_id = ?", (job_id,), after, limit, True)

    def _page(self, table: str, where: str, args: tuple, after: str | None, limit: int,
              newest_first: bool) -> tuple[list[dict[str, Any]], bool]:
        """Rows of `table` matching `where`, in insertion order (or reversed), starting after the row
        whose id is `after` (an unknown `after` gives an empty page); (page, has_more)."""
        order, compare = ("DESC", "<") if newest_first else ("ASC", ">")
        with self._connect() as db:
            if after is not None:
                cursor = db.execute(f"SELECT seq FROM {table} WHERE id = ?", (after,)).fetchone()
                if cursor is None:
                    return [], False
                where, args = f"({where}) AND seq {compare} ?", (*args, cursor["seq"])
            rows = db.execute(f"SELECT * FROM {table} WHERE {where} ORDER BY seq {order} LIMIT ?",
                              (*args, limit + 1)).fetchall()
        return [self._row(r) for r in rows[:limit]], len(rows) > limit  # type: ignore[misc]
