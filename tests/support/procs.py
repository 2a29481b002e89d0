"""Helpers shared by the harness: subprocess lifecycle, log tails, and a background loop.

The e2e tests drive the system with the *sync* openai/anthropic clients, so any asyncio
server the test itself hosts (fake LLM, a stub gRPC service) must run on a loop of its
own in another thread: a loop owned by pytest-asyncio only runs while an async test runs.
"""

from __future__ import annotations

import asyncio
import contextlib
import signal
import subprocess
import threading
import time
from collections.abc import Callable, Coroutine
from pathlib import Path
from typing import Any, TypeVar

__all__ = ["BackgroundLoop", "HarnessError", "tail", "terminate", "wait_until"]

T = TypeVar("T")


class HarnessError(RuntimeError):
    """A process or server of the test harness could not be started or stopped.

    Never turned into a skip: in CI a missing or broken Envoy/service is a failure.
    """


def tail(path: Path, lines: int = 40) -> str:
    """The last ``lines`` lines of a log file, for error messages ('' if there is none)."""
    try:
        text = path.read_text(errors="replace")
    except FileNotFoundError:
        return ""
    return "\n".join(text.splitlines()[-lines:])


def terminate(proc: subprocess.Popen[bytes], grace: float = 10.0) -> int:
    """SIGTERM, wait up to ``grace`` s, then SIGKILL. Returns the exit code.

    SIGTERM first so a graceful stop (flush usage, drain) is exercised on every run.
    """
    if proc.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(grace)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                proc.kill()
            proc.wait()
    return proc.returncode


def wait_until(
    predicate: Callable[[], T], *, timeout: float, what: str, interval: float = 0.02
) -> T:
    """Poll ``predicate`` until it returns something truthy; ``TimeoutError`` names ``what``."""
    deadline = time.monotonic() + timeout
    while True:
        result = predicate()
        if result:
            return result
        if time.monotonic() >= deadline:
            raise TimeoutError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(interval)


class BackgroundLoop:
    """An asyncio loop running in a daemon thread, for servers that sync tests talk to.

    ``run(coro)`` executes a coroutine on that loop and returns its result in the caller's
    thread. ``close()`` cancels what is left, closes the loop and joins the thread, so no
    ResourceWarning escapes (the test suite turns warnings into errors).
    """

    def __init__(self, name: str = "harness-loop") -> None:
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._main, name=name, daemon=True)
        self._thread.start()

    @property
    def loop(self) -> asyncio.AbstractEventLoop:
        return self._loop

    def _main(self) -> None:
        asyncio.set_event_loop(self._loop)
        self._loop.run_forever()

    def run(self, coro: Coroutine[Any, Any, T], timeout: float | None = 30.0) -> T:
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result(timeout)

    def close(self) -> None:
        if self._loop.is_closed():
            return

        async def _drain() -> None:
            tasks = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            await self._loop.shutdown_asyncgens()
            await self._loop.shutdown_default_executor()

        with contextlib.suppress(Exception):
            self.run(_drain(), timeout=10)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)
        self._loop.close()
