"""A local append-only journal for usage the ledger could not take (see :mod:`.entries`).

Durability: group commit. ``append`` returns only once its line is written *and*
``fsync``'d, but every append waiting at that moment shares one ``write`` + ``fsync``
(up to 512 lines), done in a worker thread. One fsync per entry would cap settlements at
the disk's flush rate (1-10 ms on cloud disks) exactly when the store is down and every
settlement lands here; doing it on the event loop would stall every Check meanwhile.

Bounds: ``max_bytes`` of unreplayed lines. When full, nothing is dropped silently:
:meth:`append` raises :class:`JournalFull`. Local admissions must :meth:`promise` room for
their own charge first and are refused once 90% is used, so the last 10% stays for the
settlements of reservations the store already holds (and a promised charge always fits).

Replay reads from the head (:meth:`read`) and :meth:`confirm` moves the head past
entries the ledger has taken; only then is the file truncated (all confirmed) or
rewritten without its confirmed head (atomic rename). A crash in between replays those
entries again, which the ledger ignores (settle and charge are idempotent).

Several processes (``authz serve --workers N``) each claim their own file, locked with
``flock`` on a ``.lock`` beside it: ``journal.jsonl``, ``journal.1.jsonl``... At open, a
process adopts the lines of any unlocked sibling (left by a process that is gone).
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import logging
import os
import time
from pathlib import Path

from authz.errors import LedgerError
from authz.ledger.entries import Entry, decode, encode

__all__ = ["Journal", "JournalFull"]

log = logging.getLogger("authz.journal")
_BATCH = 512
_SLOTS = 64
_HEADROOM = 0.9  # local admissions stop here; settlements of real reservations may go on


class JournalFull(LedgerError):
    """The journal is at its size bound; the entry was not written."""


def _sibling(base: Path, n: int) -> Path:
    return base if n == 0 else base.with_name(f"{base.stem}.{n}{base.suffix}")


def _try_lock(path: Path) -> int | None:
    fd = os.open(f"{path}.lock", os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        return None
    return fd


def _complete_lines(path: Path) -> bytes:
    """The file's whole lines: a torn last line was never acknowledged to anyone."""
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        return b""
    return data[: data.rfind(b"\n") + 1]


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class Journal:
    def __init__(self, path: Path, lock_fd: int, max_bytes: int) -> None:
        self.path = path
        self.max_bytes = max_bytes
        self._lock_fd = lock_fd
        data = _complete_lines(path)
        self._fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
        os.ftruncate(self._fd, len(data))  # drop a torn tail
        os.fsync(self._fd)
        _fsync_dir(path.parent)
        self._head = 0  # offset of the first unconfirmed line
        self._end = len(data)  # offset after the last durable line
        self.entries = data.count(b"\n")  # unconfirmed, queued included
        self._queued_bytes = 0
        self._promised = 0
        self._queue: list[tuple[bytes, asyncio.Future[None]]] = []
        self._writer: asyncio.Task[None] | None = None
        self._io = asyncio.Lock()  # one write, read or compaction at a time
        self.fsyncs = 0
        self.refused = 0

    @classmethod
    def open(cls, path: str | Path, max_bytes: int) -> Journal:
        """Claim a journal file under ``path`` (blocking file I/O: call at start-up)."""
        base = Path(path)
        base.parent.mkdir(parents=True, exist_ok=True)
        for n in range(_SLOTS):
            fd = _try_lock(_sibling(base, n))
            if fd is not None:
                journal = cls(_sibling(base, n), fd, max_bytes)
                journal._adopt(base)
                return journal
        raise OSError(f"all {_SLOTS} journal files beside {base} are locked by live processes")

    def _adopt(self, base: Path) -> None:
        for n in range(_SLOTS):
            other = _sibling(base, n)
            if other == self.path or not other.exists() or other.stat().st_size == 0:
                continue
            fd = _try_lock(other)
            if fd is None:
                continue  # a live process owns it
            try:
                data = _complete_lines(other)
                os.write(self._fd, data)
                os.fsync(self._fd)
                self._end += len(data)
                self.entries += data.count(b"\n")
                # Ours is durable before theirs is emptied: a crash here duplicates, never loses.
                with open(other, "r+b") as f:
                    f.truncate(0)
                    os.fsync(f.fileno())
                log.info("adopted %d journal entries from %s", data.count(b"\n"), other)
            finally:
                os.close(fd)

    # -- size -----------------------------------------------------------------------
    @property
    def size(self) -> int:
        """Bytes not yet confirmed (queued included)."""
        return self._end - self._head + self._queued_bytes

    @property
    def full(self) -> bool:
        return self.size + self._promised >= self.max_bytes * _HEADROOM

    def promise(self, nbytes: int) -> bool:
        """Set room aside for a local admission's charge; False once past the headroom."""
        if self.size + self._promised + nbytes > self.max_bytes * _HEADROOM:
            return False
        self._promised += nbytes
        return True

    def release(self, nbytes: int) -> None:
        self._promised = max(0, self._promised - nbytes)

    # -- append (group commit) --------------------------------------------------------
    async def append(self, entry: Entry, *, promised: int = 0) -> None:
        """Write ``entry`` durably; :class:`JournalFull` if there is no room for it."""
        line = encode(entry, time.time())
        self.release(promised)
        if not promised and self.size + self._promised + len(line) > self.max_bytes:
            self.refused += 1
            raise JournalFull(f"journal {self.path} is full ({self.size} bytes)")
        fut = asyncio.get_running_loop().create_future()
        self._queue.append((line, fut))
        self._queued_bytes += len(line)
        self.entries += 1
        if self._writer is None or self._writer.done():
            self._writer = asyncio.get_running_loop().create_task(self._write_queue())
        await asyncio.shield(fut)  # a cancelled caller does not unwrite its line

    async def _write_queue(self) -> None:
        while self._queue:
            batch, self._queue = self._queue[:_BATCH], self._queue[_BATCH:]
            data = b"".join(line for line, _ in batch)
            async with self._io:
                try:
                    await asyncio.to_thread(self._write, data)
                    error: OSError | None = None
                except OSError as exc:
                    error = exc
                self._queued_bytes -= len(data)
                if error is None:
                    self._end += len(data)
                    self.fsyncs += 1
                else:
                    self.entries -= len(batch)
            for _, fut in batch:
                if fut.done():
                    continue
                if error is None:
                    fut.set_result(None)
                else:
                    fut.set_exception(LedgerError(f"journal write failed: {error}"))

    def _write(self, data: bytes) -> None:
        try:
            view = memoryview(data)
            while view:
                view = view[os.write(self._fd, view) :]
            os.fsync(self._fd)
        except OSError:
            with contextlib.suppress(OSError):
                os.ftruncate(self._fd, self._end)  # no torn line for the next batch to follow
            raise

    # -- replay -----------------------------------------------------------------------
    async def read(self, limit: int) -> tuple[list[Entry], int, int]:
        """Up to ``limit`` lines from the head: (entries, lines read, offset after them)."""
        async with self._io:
            start = self._head
            raw = await asyncio.to_thread(self._read, start, self._end, limit)
        entries = []
        for line in raw:
            try:
                entries.append(decode(line))
            except ValueError as exc:
                log.error("skipping an unreadable journal line in %s: %s", self.path, exc)
        return entries, len(raw), start + sum(map(len, raw))

    def _read(self, start: int, end: int, limit: int) -> list[bytes]:
        lines: list[bytes] = []
        with open(self.path, "rb") as f:
            f.seek(start)
            while len(lines) < limit and f.tell() < end:
                lines.append(f.readline())
        return lines

    async def confirm(self, offset: int, lines: int) -> None:
        """The ledger has taken every line before ``offset``: drop them from the file."""
        async with self._io:
            self.entries -= lines
            self._head = offset
            if self._head == self._end:
                await asyncio.to_thread(self._truncate)
            elif self._head >= 1 << 20 and self._head * 2 >= self._end:
                await asyncio.to_thread(self._rewrite)

    def _truncate(self) -> None:
        os.ftruncate(self._fd, 0)
        os.fsync(self._fd)
        self._head = self._end = 0

    def _rewrite(self) -> None:
        tmp = self.path.with_name(self.path.name + ".compact")
        with open(self.path, "rb") as src, open(tmp, "wb") as dst:
            src.seek(self._head)
            dst.write(src.read(self._end - self._head))
            dst.flush()
            os.fsync(dst.fileno())
        os.replace(tmp, self.path)
        _fsync_dir(self.path.parent)
        old, self._fd = self._fd, os.open(self.path, os.O_WRONLY | os.O_APPEND)
        os.close(old)
        self._end -= self._head
        self._head = 0

    async def close(self) -> None:
        if self._lock_fd < 0:
            return
        while self._writer is not None and not self._writer.done():
            await self._writer
        async with self._io:
            if self._head and self._head == self._end:
                await asyncio.to_thread(self._truncate)
            elif self._head:
                await asyncio.to_thread(self._rewrite)
            os.close(self._fd)
            os.close(self._lock_fd)  # releases the flock
            self._lock_fd = -1
