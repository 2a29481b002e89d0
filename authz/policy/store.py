"""The live policy: loaded at start, reloaded on SIGHUP or file change.

A reload that fails validation keeps the last good policy and logs why: a typo pushed
to a config map must never open (or close) the gateway.
"""

from __future__ import annotations

import asyncio
import logging
import os
from collections.abc import Callable
from pathlib import Path

from authz.errors import PolicyError
from authz.policy.loader import load_policy
from authz.policy.loader_budgets import applied_renames
from authz.policy.model import Policy

__all__ = ["PolicyStore"]

log = logging.getLogger("authz.policy")


class PolicyStore:
    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.current: Policy = load_policy(self.path)  # start-up: a bad policy is fatal
        self._stamp = self._file_stamp()
        self.reloads = 0
        self.reload_failures = 0
        self._listeners: list[Callable[[Policy], None]] = []
        self._failure_listeners: list[Callable[[PolicyError], None]] = []
        self._guards: list[Callable[[Policy], None]] = []

    def on_change(self, listener: Callable[[Policy], None]) -> None:
        self._listeners.append(listener)

    def guard(self, check: Callable[[Policy], None]) -> None:
        """A rule the file alone cannot know (e.g. one about how the server listens):
        checked now, and on every reload, where a :class:`PolicyError` fails the reload."""
        check(self.current)
        self._guards.append(check)

    def on_failure(self, listener: Callable[[PolicyError], None]) -> None:
        """Called with the error of each reload that failed (the audit trail records it)."""
        self._failure_listeners.append(listener)

    def _file_stamp(self) -> tuple[int, int, int] | None:
        try:
            st = os.stat(self.path)
        except OSError:
            return None
        return (st.st_mtime_ns, st.st_size, st.st_ino)

    def reload(self) -> bool:
        """Load the file again; on any error keep the current policy. True if replaced."""
        self._stamp = self._file_stamp()
        try:
            policy = applied_renames(load_policy(self.path), self.current)
            for check in self._guards:
                check(policy)
        except PolicyError as exc:
            self.reload_failures += 1
            log.error("policy reload failed; keeping the last good policy: %s", exc)
            for failed in self._failure_listeners:
                failed(exc)
            return False
        self.current = policy
        self.reloads += 1
        log.info("policy reloaded from %s (%d budgets)", self.path, len(policy.budgets))
        for listener in self._listeners:
            listener(policy)
        return True

    async def watch(self, interval_s: float = 1.0) -> None:
        """Poll the file's mtime/size/inode (config maps swap the file by symlink)."""
        while True:
            await asyncio.sleep(interval_s)
            if self._file_stamp() != self._stamp:
                self.reload()
