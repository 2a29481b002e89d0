"""Directory answers on the request path: cached, single-flight, never on the loop.

A check needs the subject's department and team before it can reserve anything, but
an LDAP round trip (and ldap3 is synchronous) must not stall every other check. So:

- a fresh answer comes from the cache (``cache_s``; "not in the directory" for
  ``negative_cache_s``), a dict lookup;
- a subject seen in the last part of its entry's life (``refresh_ahead``) is looked up
  again in the background, so an active caller never waits for an expiry;
- a miss runs one lookup on a worker thread, bounded by ``timeout_s``; concurrent
  checks of the same subject wait for that one lookup (single flight) instead of each
  asking the directory;
- the cache holds at most ``max_entries`` subjects (least recently used go first);
- after a failure the directory counts as down: for ``retry_s`` misses do not ask it
  (each would wait ``timeout_s``), then one lookup probes it. What a check gets while
  it is down is the policy's ``on_down`` (:class:`~authz.policy.directory.OnDown`).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections import OrderedDict
from collections.abc import Callable, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any

from authz.clock import Clock
from authz.directory.client import DirectoryUnavailable, LdapClient
from authz.directory.stats import DirectoryStats
from authz.policy.directory import DirectorySettings

__all__ = ["Directory"]

log = logging.getLogger("authz.directory")
_NOTHING: Mapping[str, str] = MappingProxyType({})
# Looked up (never cached) by the probe while the directory is down: any answer, found
# or not, means it answers again.
PROBE_SUBJECT = "authz-directory-probe"


@dataclass(frozen=True, slots=True)
class _Entry:
    levels: Mapping[str, str] | None  # None: the directory has no entry for the subject
    fetched: float
    expires: float


class Directory:
    """Answers "which department and team is this subject in" for the enforcer."""

    def __init__(
        self,
        settings: DirectorySettings,
        clock: Clock,
        stats: DirectoryStats | None = None,
        lookup: Callable[[str], Mapping[str, str] | None] | None = None,
    ) -> None:
        self.settings = settings
        self.stats = stats or DirectoryStats()
        self._clock = clock
        self._client = LdapClient(settings) if lookup is None else None
        self._lookup_fn: Callable[[str], Mapping[str, str] | None] = (
            lookup or self._client.lookup  # type: ignore[union-attr]
        )
        self._pool = ThreadPoolExecutor(settings.workers, thread_name_prefix="authz-ldap")
        self._entries: OrderedDict[str, _Entry] = OrderedDict()
        self._inflight: dict[str, asyncio.Task[_Entry]] = {}
        self._background: set[asyncio.Task[Any]] = set()
        self._down_until = 0.0
        self._probing = False
        self._watching: asyncio.Task[None] | None = None
        self._retired = False
        self.stats.on_down_mode = settings.on_down.mode

    async def levels(self, subject: str) -> Mapping[str, str]:
        """The raw names the directory gives ``subject`` (level -> name; empty if it has
        no entry), by the rules above. Raises :class:`DirectoryUnavailable` when it
        cannot answer and ``on_down`` says deny (or last_known knows nothing)."""
        now = self._clock.now()
        entry = self._entries.get(subject)
        if entry is not None and now < entry.expires:
            self._entries.move_to_end(subject)
            self.stats.cache("hit" if entry.levels is not None else "negative_hit")
            ahead = (entry.expires - entry.fetched) * self.settings.refresh_ahead
            if now >= entry.expires - ahead and subject not in self._inflight:
                self._refresh(subject)
            return entry.levels if entry.levels is not None else _NOTHING
        self.stats.cache("miss" if entry is None else "expired")
        try:
            entry = await self._fetch(subject)
        except DirectoryUnavailable:
            return self._when_down(subject)
        return entry.levels if entry.levels is not None else _NOTHING

    def _when_down(self, subject: str) -> Mapping[str, str]:
        on_down = self.settings.on_down
        if on_down.mode == "fallback":
            self.stats.cache("fallback")
            return MappingProxyType(dict(on_down.fallback))
        if on_down.mode == "last_known":
            known = self._entries.get(subject)
            if known is not None:
                self.stats.cache("last_known")
                return known.levels if known.levels is not None else _NOTHING
        self.stats.cache("denied")
        raise DirectoryUnavailable(f"the directory is unavailable ({self.stats.last_error})")

    def _fetch(self, subject: str) -> asyncio.Future[_Entry]:
        task = self._inflight.get(subject)
        if task is None:
            task = asyncio.get_running_loop().create_task(self._lookup(subject))
            self._inflight[subject] = task
            task.add_done_callback(lambda _t: self._inflight.pop(subject, None))
        # shield: a check that gives up (its client went away) must not cancel the
        # lookup other checks of the same subject are waiting for.
        return asyncio.shield(task)

    def _refresh(self, subject: str) -> None:
        async def refresh() -> None:
            # On failure the entry stays until it expires; then on_down decides.
            with contextlib.suppress(DirectoryUnavailable):
                await self._fetch(subject)

        task = asyncio.get_running_loop().create_task(refresh())
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    async def _lookup(self, subject: str) -> _Entry:
        now = self._clock.now()
        if now < self._down_until or self._probing:
            raise DirectoryUnavailable(f"down since the last failure: {self.stats.last_error}")
        self._probing = not self.stats.up  # while down, one lookup at a time probes
        try:
            levels = await self._ask(subject)
        finally:
            self._probing = False
        ttl = self.settings.cache_s if levels is not None else self.settings.negative_cache_s
        now = self._clock.now()
        frozen = MappingProxyType(dict(levels)) if levels is not None else None
        entry = _Entry(frozen, now, now + ttl)
        self._entries[subject] = entry
        self._entries.move_to_end(subject)
        while len(self._entries) > self.settings.max_entries:
            self._entries.popitem(last=False)
        self.stats.entries = len(self._entries)
        return entry

    async def _ask(self, subject: str) -> Mapping[str, str] | None:
        """One lookup on a worker thread, bounded in time; keeps the up/down state."""
        loop = asyncio.get_running_loop()
        try:
            levels: Mapping[str, str] | None = await asyncio.wait_for(
                loop.run_in_executor(self._pool, self._lookup_fn, subject),
                self.settings.timeout_s,
            )
        except (DirectoryUnavailable, TimeoutError) as exc:
            why = str(exc) or f"no answer within {self.settings.timeout_s:g}s"
            self.stats.lookup("timeout" if isinstance(exc, TimeoutError) else "error")
            if self.stats.up:
                log.warning("directory unavailable: %s (on_down: %s)", why,
                            self.settings.on_down.mode)  # fmt: skip
            self.stats.went_down(why)
            self._down_until = self._clock.now() + self.settings.retry_s
            self._watch_until_up()
            raise DirectoryUnavailable(why) from exc
        if not self.stats.up:
            log.info("directory answers again")
        self.stats.lookup("found" if levels is not None else "not_found")
        self.stats.came_up()
        return levels

    def _watch_until_up(self) -> None:
        """While down, probe every ``retry_s`` even with no traffic: a replica taken out
        of the Service by /readyz (on_down: deny) gets no check that could notice the
        directory is back."""
        if self._retired or (self._watching is not None and not self._watching.done()):
            return

        async def watch() -> None:
            while not self.stats.up:
                await asyncio.sleep(max(self.settings.retry_s, 0.1))
                if not self.stats.up and not self._probing:
                    with contextlib.suppress(DirectoryUnavailable):
                        await self._ask(PROBE_SUBJECT)

        self._watching = asyncio.get_running_loop().create_task(watch())

    def retire(self) -> None:
        """A reload replaced this directory: checks already waiting on it finish, but it
        no longer probes, nor reports into the stats its successor now keeps."""
        self._retired = True
        if self._watching is not None:
            self._watching.cancel()
        self.stats = DirectoryStats()

    async def aclose(self) -> None:
        watching = [self._watching] if self._watching is not None else []
        for task in [*self._background, *self._inflight.values(), *watching]:
            task.cancel()
        # Wait for lookups already on a thread (each bounded by the client's timeouts):
        # one finishing after close() would open a connection nobody closes.
        await asyncio.to_thread(self._pool.shutdown, wait=True, cancel_futures=True)
        if self._client is not None:
            self._client.close()
