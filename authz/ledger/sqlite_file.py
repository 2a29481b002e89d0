"""The SQLite file behind the embedded ledger: its lock, its tables, one load, many writes.

Nothing here knows the ledger's logic; :mod:`authz.ledger.sqlite` decides, in memory,
and hands this module rows. Every write is one transaction, so the file always holds
the whole ledger as of one instant (the last flush) and never half of a settlement.

WAL mode with ``synchronous=NORMAL``: a commit is in the OS page cache when it returns,
so it survives the process being killed (``kill -9``, OOM); only a power loss or kernel
crash may roll back the last commits. ``synchronous=FULL`` (``?sync=full``) fsyncs
every flush instead and survives those too, at one fsync per flush interval.

One process per file: an exclusive ``flock`` on ``<db>.lock``, taken at open and held
until close. Two replicas sharing one volume would otherwise each load the same budgets
and each overwrite the other's counters, letting every caller spend twice.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import sqlite3
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from authz.errors import LedgerError

__all__ = ["FileRows", "LedgerFile", "LedgerLocked"]

_SCHEMA = 1
_CHUNK = 200  # rows per statement (x 6 columns: well under SQLite's 32,766 parameters)
_TABLES = """
CREATE TABLE IF NOT EXISTS meta (k TEXT PRIMARY KEY, v TEXT NOT NULL) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS counters (
  key TEXT PRIMARY KEY, amount INTEGER NOT NULL, window_end REAL NOT NULL,
  used INTEGER NOT NULL, reserved INTEGER NOT NULL, nominal INTEGER NOT NULL
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS debts (
  key TEXT PRIMARY KEY, debt INTEGER NOT NULL, forget_at REAL NOT NULL
) WITHOUT ROWID;
-- rowid tables: their rows are large (a reservation's limits), see sqlite.org/withoutrowid
CREATE TABLE IF NOT EXISTS open (id TEXT PRIMARY KEY, deadline REAL NOT NULL, body TEXT NOT NULL);
-- expired reservations (body: limits and what the expiry charged), for a late settle
CREATE TABLE IF NOT EXISTS expired (
  id TEXT PRIMARY KEY, forget_at REAL NOT NULL, body TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS charges (id TEXT PRIMARY KEY, forget_at REAL NOT NULL) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS expired_forget ON expired (forget_at);
CREATE INDEX IF NOT EXISTS charges_forget ON charges (forget_at);
"""

# key, amount, window_end, used, reserved, nominal
CounterRow = tuple[str, int, float, int, int, int]


class LedgerLocked(LedgerError):
    """Another process holds the file: refuse to start rather than share it."""


@dataclass(slots=True)
class FileRows:
    """One flush (what changed), or the whole file at load."""

    counters: list[CounterRow] = field(default_factory=list)
    debts: list[tuple[str, int, float]] = field(default_factory=list)
    open: list[tuple[str, float, str]] = field(default_factory=list)
    expired: list[tuple[str, float, str]] = field(default_factory=list)
    charges: list[tuple[str, float]] = field(default_factory=list)
    # Keys and ids whose rows are to go (counter or debt gone, reservation closed).
    gone_counters: list[str] = field(default_factory=list)
    gone_debts: list[str] = field(default_factory=list)
    gone_open: list[str] = field(default_factory=list)
    gone_expired: list[str] = field(default_factory=list)


def _lock(path: Path) -> int:
    fd = os.open(f"{path}.lock", os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = os.read(fd, 32).decode(errors="replace").strip() or "unknown"
        os.close(fd)
        raise LedgerLocked(
            f"sqlite ledger {path} is in use by another process (pid {holder}); one file"
            " serves one process: give each its own file, or use redis:// for several replicas"
        ) from None
    os.ftruncate(fd, 0)
    os.write(fd, f"{os.getpid()}\n".encode())
    return fd


class LedgerFile:
    """The open, locked file. Not thread-safe: one thread at a time (the flush thread)."""

    def __init__(self, path: Path, *, synchronous: str = "NORMAL") -> None:
        self.path = path
        self._lock_fd: int | None = None
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            self._lock_fd = _lock(path)
        except OSError as exc:
            raise LedgerError(f"sqlite ledger {path}: cannot open: {exc}") from exc
        try:
            self._db = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute(f"PRAGMA synchronous={synchronous}")
            self._db.executescript(_TABLES)
            found = self._db.execute("SELECT v FROM meta WHERE k = 'schema'").fetchone()
            if found is None:
                self._db.execute("INSERT INTO meta VALUES ('schema', ?)", (str(_SCHEMA),))
            elif found[0] != str(_SCHEMA):
                raise LedgerError(f"sqlite ledger {path}: schema {found[0]}, expected {_SCHEMA}")
        except (OSError, sqlite3.Error) as exc:  # unreadable, not a database, read-only...
            self.close()
            raise LedgerError(f"sqlite ledger {path}: cannot open: {exc}") from exc
        except BaseException:
            self.close()
            raise

    def load(self, now: float, cap: int) -> FileRows:
        """Everything the ledger remembers; ids already due are left out (and deleted at
        the next write), and of each id memory only the newest ``cap``."""
        q = self._db.execute

        def newest(sql: str) -> list[tuple[object, ...]]:
            return list(reversed(q(sql + " WHERE forget_at > ? ORDER BY forget_at DESC LIMIT ?",
                                   (now, cap)).fetchall()))  # fmt: skip

        return FileRows(
            counters=q("SELECT * FROM counters").fetchall(),
            debts=q("SELECT * FROM debts WHERE forget_at > ?", (now,)).fetchall(),
            open=q("SELECT * FROM open").fetchall(),
            expired=newest("SELECT id, forget_at, body FROM expired"),  # type: ignore[arg-type]
            charges=newest("SELECT id, forget_at FROM charges"),  # type: ignore[arg-type]
        )

    def write(self, rows: FileRows, now: float) -> None:
        """Apply one flush in one transaction; forget ids that are due."""
        db = self._db
        db.execute("BEGIN IMMEDIATE")
        try:
            _upsert(db, "counters", 6, rows.counters)
            _upsert(db, "debts", 3, rows.debts)
            _upsert(db, "open", 3, rows.open)
            _upsert(db, "expired", 3, rows.expired)
            _upsert(db, "charges", 2, rows.charges)
            for table, column, gone in (
                ("counters", "key", rows.gone_counters),
                ("debts", "key", rows.gone_debts),
                ("open", "id", rows.gone_open),
                ("expired", "id", rows.gone_expired),
            ):
                for i in range(0, len(gone), _CHUNK):
                    part = gone[i : i + _CHUNK]
                    marks = ",".join("?" * len(part))
                    db.execute(f"DELETE FROM {table} WHERE {column} IN ({marks})", part)
            for table in ("expired", "charges", "debts"):
                db.execute(f"DELETE FROM {table} WHERE forget_at <= ?", (now,))
            db.execute("COMMIT")
        except BaseException:
            with contextlib.suppress(sqlite3.Error):
                db.execute("ROLLBACK")
            raise

    def close(self) -> None:
        db = getattr(self, "_db", None)
        if db is not None:
            with contextlib.suppress(sqlite3.Error):
                db.close()
        if self._lock_fd is not None:
            os.close(self._lock_fd)  # releases the flock
            self._lock_fd = None


def _upsert(db: sqlite3.Connection, table: str, width: int, rows: Sequence[Any]) -> None:
    # Many rows per statement rather than executemany: sqlite3 lets go of the GIL around
    # every step, and a step per row had the event loop and this thread trading the GIL
    # hundreds of times a flush (measured: most of the write-behind's CPU cost).
    one = "(" + ",".join("?" * width) + ")"
    for i in range(0, len(rows), _CHUNK):
        part = rows[i : i + _CHUNK]
        values = [v for row in part for v in row]
        db.execute(f"INSERT OR REPLACE INTO {table} VALUES " + ",".join([one] * len(part)), values)
