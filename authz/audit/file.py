"""The audit chain in a JSON-lines file: the backend for the memory:// ledger.

One entry per line, appended under an exclusive ``flock`` so several processes
(``authz serve --workers N``) extend one chain without forking it: under the lock the
writer reads the last line to learn the head, unless the file is still the size it left
it (then its cached head is current). Each append is flushed and fsync'd before it counts.
File I/O runs in a worker thread so the event loop never waits on the disk.
"""

from __future__ import annotations

import asyncio
import fcntl
import json
import os
from collections.abc import AsyncIterator, Mapping
from pathlib import Path
from typing import Any

from authz.audit.chain import GENESIS, Entry, make_entry

__all__ = ["FileAuditLog"]

_TAIL = 64 * 1024  # an entry is far smaller; read this much back to find the last line


def _last_line(fd: int, size: int) -> bytes:
    start = max(0, size - _TAIL)
    data = os.pread(fd, size - start, start)
    lines = data.rstrip(b"\n").rsplit(b"\n", 1)
    return lines[-1] if lines and lines[-1] else b""


class FileAuditLog:
    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self._cached: tuple[int, int, str] | None = None  # (file size, seq, hash)

    def _append(self, kind: str, data: Mapping[str, Any], ts: float) -> Entry:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_APPEND, 0o640)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            size = os.fstat(fd).st_size
            if self._cached is not None and self._cached[0] == size:
                seq, prev = self._cached[1], self._cached[2]
            elif size == 0:
                seq, prev = 0, GENESIS
            else:
                last = json.loads(_last_line(fd, size))
                seq, prev = int(last["seq"]), str(last["hash"])
            entry = make_entry(seq + 1, ts, kind, data, prev)
            line = entry.to_json() + b"\n"
            os.write(fd, line)
            os.fsync(fd)
            self._cached = (size + len(line), entry.seq, entry.hash)
            return entry
        finally:
            os.close(fd)  # closing releases the lock

    async def append(self, kind: str, data: Mapping[str, Any], ts: float) -> Entry:
        return await asyncio.to_thread(self._append, kind, data, ts)

    async def stored(self) -> AsyncIterator[tuple[str, bytes]]:
        if not self.path.exists():
            return
        with self.path.open("rb") as f:
            for n, line in enumerate(f, 1):
                line = line.rstrip(b"\n")
                if line:
                    yield f"line {n}", line

    async def head(self) -> str | None:
        return None  # a file keeps no separate head: anchor it elsewhere

    async def close(self) -> None:
        return None
