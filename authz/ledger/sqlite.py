"""The embedded default: the in-memory ledger, written behind to a SQLite file.

Every decision is the memory ledger's (:class:`MemoryLedger`), on the event loop, as fast
as ``memory://``. The memory ledger records which counters and reservations changed
(:class:`Changes`); every ``flush_ms`` (50 by default) a task copies just those entries,
on the loop and in one step (so the copy is one consistent instant), and a single
worker thread writes them in one transaction. A slow disk therefore never delays a
check: changes simply pile up until the write returns.

What a crash costs (see :mod:`authz.ledger.sqlite_file` for the disk side):

- a clean stop (SIGTERM) writes everything at :meth:`close`: nothing is lost;
- ``kill -9`` loses what changed since the last completed flush: at most ``flush_ms``
  plus one write of settlements and reservations;
- a reservation open at the crash is in the file; after the restart it expires at its
  deadline and is charged per ``reservations.on_expiry``, like any unsettled one.

A failed write (disk full, I/O error) keeps the changes pending and retries at the next
tick; they are lost only if the process dies before a write succeeds. There is no
circuit breaker: like memory, a local file is never "unreachable", and denying traffic
because the disk is slow would turn a persistence hiccup into an outage.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import sqlite3
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from urllib.parse import parse_qs, unquote

from authz.clock import Clock
from authz.errors import LedgerError
from authz.ledger.base import Balance, Limit, Refusal, Reservation, SettleOutcome
from authz.ledger.memory import Changes, MemoryLedger
from authz.ledger.sqlite_file import LedgerFile
from authz.ledger.sqlite_rows import OnDisk, restore, take
from authz.usage.types import TokenUsage

__all__ = ["SqliteLedger", "SqliteOptions", "parse_sqlite_url"]

log = logging.getLogger("authz.ledger.sqlite")


class SqliteOptions:
    __slots__ = ("flush_s", "path", "synchronous")

    def __init__(self, path: Path, flush_s: float = 0.05, synchronous: str = "NORMAL") -> None:
        self.path, self.flush_s, self.synchronous = path, flush_s, synchronous


def parse_sqlite_url(url: str, state_dir: str = ".") -> SqliteOptions:
    """``sqlite:///authz-state/ledger.db`` (relative: under ``state_dir``) or
    ``sqlite:////var/lib/authz/ledger.db`` (absolute), as SQLAlchemy spells them; query
    ``flush_ms`` (10..1000, default 50) and ``sync`` (``normal`` or ``full``)."""
    rest = url.removeprefix("sqlite://")
    if rest == url or not rest.startswith("/"):
        raise ValueError(
            f"expected sqlite:///relative/path.db or sqlite:////abs/path.db (got {url!r})"
        )
    raw, _, query = rest[1:].partition("?")
    if not raw or raw.endswith("/"):
        raise ValueError(f"sqlite URL names no file (got {url!r})")
    params = {k: v[-1] for k, v in parse_qs(query, keep_blank_values=True).items()}
    unknown = set(params) - {"flush_ms", "sync"}
    if unknown:
        raise ValueError(f"unknown sqlite URL parameter {sorted(unknown)[0]!r} (flush_ms, sync)")
    try:
        flush_ms = int(params.get("flush_ms", "50"))
    except ValueError:
        raise ValueError(f"flush_ms must be an integer (got {params['flush_ms']!r})") from None
    if not 10 <= flush_ms <= 1000:
        raise ValueError(f"flush_ms must be 10..1000 (got {flush_ms})")
    sync = params.get("sync", "normal").upper()
    if sync not in ("NORMAL", "FULL"):
        raise ValueError(f"sync must be normal or full (got {params['sync']!r})")
    path = Path(state_dir) / unquote(raw)  # an absolute path replaces state_dir
    return SqliteOptions(path, flush_ms / 1000, sync)


class SqliteLedger:
    """``open_ledger("sqlite:///...")``. Opening locks the file and loads it (raises
    :class:`authz.ledger.sqlite_file.LedgerLocked` if another process has it)."""

    confirms = True  # authz.confirm: a Check's hold waits for the gateway to use it

    def __init__(self, opts: SqliteOptions, clock: Clock) -> None:
        self._clock = clock
        self._flush_s = opts.flush_s
        self._mem = MemoryLedger(clock)
        self._file = LedgerFile(opts.path, synchronous=opts.synchronous)
        started = time.monotonic()
        try:
            loaded = self._file.load(clock.now(), self._mem._cap)
            restore(self._mem, loaded)
        except (sqlite3.Error, ValueError, TypeError, KeyError) as exc:  # a damaged row
            self._file.close()
            raise LedgerError(f"sqlite ledger {opts.path}: cannot load: {exc!r}") from exc
        except BaseException:
            self._file.close()
            raise
        log.info(
            "sqlite ledger %s: loaded %d counters, %d open reservations in %.3f s",
            opts.path, len(loaded.counters), len(loaded.open), time.monotonic() - started,
        )  # fmt: skip
        self._disk = OnDisk(loaded)
        self._mem.changes = Changes()
        self._writer = ThreadPoolExecutor(1, thread_name_prefix="authz-sqlite")
        self._task: asyncio.Task[None] | None = None
        self._closed = False
        self.path = opts.path
        self.flushes = 0
        self.flush_failures = 0
        self.last_flush_s = 0.0  # how long the last write took

    # -- the ledger contract: decided in memory ------------------------------------------
    async def reserve(
        self,
        reservation_id: str,
        limits: tuple[Limit, ...],
        tokens: TokenUsage,
        *,
        deadline: float,
        expiry_charge: TokenUsage,
        model: str = "",
    ) -> Reservation | Refusal:
        self._start()
        return await self._mem.reserve(
            reservation_id, limits, tokens, deadline=deadline, expiry_charge=expiry_charge,
            model=model,
        )  # fmt: skip

    async def settle(self, reservation_id: str, actual: TokenUsage) -> SettleOutcome:
        self._start()
        return await self._mem.settle(reservation_id, actual)

    async def confirm(self, reservation_id: str, deadline: float, charge: TokenUsage) -> bool:
        self._start()
        return await self._mem.confirm(reservation_id, deadline, charge)

    async def expire(self, now: float) -> int:
        self._start()
        return await self._mem.expire(now)

    async def charge(self, charge_id: str, limits: tuple[Limit, ...], actual: TokenUsage) -> bool:
        self._start()
        return await self._mem.charge(charge_id, limits, actual)

    async def balance(self, limit: Limit) -> Balance:
        return await self._mem.balance(limit)

    @property
    def open_reservations(self) -> int:
        return self._mem.open_reservations

    @property
    def pending(self) -> int:
        """Changes not yet written (counter keys + ids)."""
        c = self._mem.changes
        return len(c.keys) + len(c.ids) if c is not None else 0

    # -- write-behind ------------------------------------------------------------------
    def _start(self) -> None:
        if self._task is None and not self._closed:
            self._task = asyncio.get_running_loop().create_task(self._run())

    async def _run(self) -> None:
        while True:
            await asyncio.sleep(self._flush_s)
            await self.flush()

    async def flush(self) -> bool:
        """Write what changed; on failure keep it for the next try. True if written."""
        changes = self._mem.changes
        if changes is None or not (changes.keys or changes.ids):
            return True
        self._mem.changes = pending = Changes()
        rows = take(self._mem, changes, self._disk)  # on the loop, no await: one instant
        started = time.monotonic()
        try:
            await asyncio.get_running_loop().run_in_executor(
                self._writer, self._file.write, rows, self._clock.now()
            )
        except BaseException as exc:  # sqlite3.Error, OSError: the disk, not the caller
            # Kept: their newest values go at the next flush.
            pending.keys |= changes.keys
            pending.ids |= changes.ids
            if not isinstance(exc, Exception):
                raise  # cancelled (close): close writes them
            self.flush_failures += 1
            if self.flush_failures == 1 or self.flush_failures % 100 == 0:
                log.error(
                    "sqlite ledger %s: write failed (%s); %d changes kept in memory and retried"
                    " (failures so far: %d)", self.path, exc, self.pending, self.flush_failures,
                )  # fmt: skip
            return False
        self._disk.written(rows)
        self.flushes += 1
        self.last_flush_s = time.monotonic() - started
        return True

    async def close(self) -> None:
        """Stop the timer, write everything, release the file and its lock."""
        if self._closed:
            return
        self._closed = True
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        for _ in range(3):
            if await self.flush():
                break
        else:
            log.error("sqlite ledger %s: %d changes could not be written", self.path, self.pending)
        self._writer.shutdown(wait=True)
        self._file.close()
