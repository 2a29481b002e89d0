"""Allocations in a SQLite file beside the embedded ledger's (``<ledger>.manage.db``).

The sqlite ledger serves one process (its file is locked), so there is no other
replica to tell: the version is a counter row, bumped in the same transaction as the
write. Each call is a short transaction run in a worker thread, so a slow disk never
stalls the event loop; every write is committed before the API answers (survives a
restart, unlike the ledger's write-behind, since an operator's change must not vanish).
"""

from __future__ import annotations

import asyncio
import sqlite3
import threading
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import TypeVar

from authz.errors import AuthzError
from authz.manage.model import Allocation
from authz.manage.store import MAX_NODES

__all__ = ["SqliteAllocationStore"]

T = TypeVar("T")
_SCHEMA = """
CREATE TABLE IF NOT EXISTS allocations (id TEXT PRIMARY KEY, expires_at REAL, body TEXT);
CREATE TABLE IF NOT EXISTS version (one INTEGER PRIMARY KEY CHECK (one = 1), n INTEGER);
INSERT OR IGNORE INTO version VALUES (1, 0);
CREATE TABLE IF NOT EXISTS nodes (node TEXT PRIMARY KEY);
CREATE TABLE IF NOT EXISTS requests (id TEXT PRIMARY KEY, body TEXT);
"""


class SqliteAllocationStore:
    def __init__(self, path: str) -> None:
        self.path = path
        self._lock = threading.Lock()
        self._db: sqlite3.Connection | None = None

    def _conn(self) -> sqlite3.Connection:
        if self._db is None:
            Path(self.path).parent.mkdir(parents=True, exist_ok=True)
            db = sqlite3.connect(self.path, check_same_thread=False, isolation_level=None)
            db.executescript(_SCHEMA)
            self._db = db
        return self._db

    async def _run(self, fn: Callable[[sqlite3.Connection], T]) -> T:
        def locked() -> T:
            with self._lock:
                db = self._conn()
                try:
                    db.execute("BEGIN IMMEDIATE")
                    out = fn(db)
                    db.execute("COMMIT")
                    return out
                except BaseException:
                    if db.in_transaction:
                        db.execute("ROLLBACK")
                    raise

        try:
            return await asyncio.to_thread(locked)
        except sqlite3.Error as exc:
            raise AuthzError(f"allocation store {self.path}: {exc}") from exc

    @staticmethod
    def _bump(db: sqlite3.Connection) -> None:
        db.execute("UPDATE version SET n = n + 1 WHERE one = 1")

    async def add(self, allocation: Allocation) -> None:
        def write(db: sqlite3.Connection) -> None:
            db.execute("INSERT INTO allocations VALUES (?, ?, ?)",
                       (allocation.id, allocation.expires_at, allocation.to_json()))  # fmt: skip
            self._bump(db)

        await self._run(write)

    async def remove(self, allocation_id: str) -> bool:
        def write(db: sqlite3.Connection) -> bool:
            gone = db.execute("DELETE FROM allocations WHERE id = ?", (allocation_id,)).rowcount
            if gone:
                self._bump(db)
            return bool(gone)

        return await self._run(write)

    async def all(self) -> tuple[Allocation, ...]:
        rows = await self._run(lambda db: db.execute("SELECT body FROM allocations").fetchall())
        return tuple(Allocation.from_json(body) for (body,) in rows)

    async def version(self) -> str:
        row = await self._run(lambda db: db.execute("SELECT n FROM version").fetchone())
        return str(row[0])

    async def purge(self, before: float) -> int:
        def write(db: sqlite3.Connection) -> int:
            n = db.execute("DELETE FROM allocations WHERE expires_at < ?", (before,)).rowcount
            if n:
                self._bump(db)
            return int(n)

        return await self._run(write)

    async def note_nodes(self, nodes: Iterable[str]) -> None:
        batch = [(n,) for n in nodes]

        def write(db: sqlite3.Connection) -> None:
            (count,) = db.execute("SELECT count(*) FROM nodes").fetchone()
            if count < MAX_NODES:
                db.executemany("INSERT OR IGNORE INTO nodes VALUES (?)", batch)

        if batch:
            await self._run(write)

    async def nodes(self) -> frozenset[str]:
        rows = await self._run(lambda db: db.execute("SELECT node FROM nodes").fetchall())
        return frozenset(n for (n,) in rows)

    async def put_request(self, request_id: str, body: str) -> None:
        await self._run(lambda db: db.execute("INSERT OR REPLACE INTO requests VALUES (?, ?)",
                                              (request_id, body)))  # fmt: skip

    async def requests(self) -> tuple[str, ...]:
        rows = await self._run(lambda db: db.execute("SELECT body FROM requests").fetchall())
        return tuple(body for (body,) in rows)

    async def close(self) -> None:
        with self._lock:
            if self._db is not None:
                self._db.close()
                self._db = None
