"""``authz serve --workers N``: N serving processes on one gRPC port, and their supervisor.

Each worker is a full ``authz serve`` (its own event loop, policy store, ledger client,
admin port) whose gRPC socket sets SO_REUSEPORT, so the kernel spreads *connections*
over the workers. Envoy multiplexes its checks over few HTTP/2 connections, so the
``authz`` cluster must open several (``max_concurrent_streams`` in envoy/envoy.yaml) for
a second worker to see any traffic: see docs/performance.md.

The supervisor only starts, forwards signals and reaps: SIGTERM/SIGINT/SIGHUP go to
every worker (each stops or reloads gracefully on its own); if one worker dies, the
others are stopped and the supervisor exits non-zero, so the orchestrator restarts the
whole set rather than running on with less capacity than it thinks.
"""

from __future__ import annotations

import ctypes
import logging
import os
import signal
import subprocess
from collections.abc import Sequence

__all__ = ["admin_address", "supervise"]

log = logging.getLogger("authz.workers")
_PR_SET_PDEATHSIG = 1


def admin_address(address: str, index: int) -> str:
    """Worker ``index`` serves its admin HTTP on the given port + index (0 stays 0)."""
    host, _, port = address.rpartition(":")
    number = int(port)
    return f"{host}:{number + index if number else 0}"


def _die_with_parent() -> None:  # pragma: no cover - runs in the forked child
    # A supervisor killed with SIGKILL cannot forward anything: have the kernel send
    # each worker SIGTERM then, so no orphan keeps serving on the shared port.
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)
    except (OSError, AttributeError):
        pass


def supervise(commands: Sequence[Sequence[str]]) -> int:
    """Run one process per command until all exit; returns the exit code to use."""
    procs = [subprocess.Popen(list(cmd), preexec_fn=_die_with_parent) for cmd in commands]
    by_pid = {p.pid: p for p in procs}
    stopping = False

    def forward(signum: int, _frame: object) -> None:
        nonlocal stopping
        if signum != signal.SIGHUP:
            stopping = True
        for p in procs:
            if p.poll() is None:
                p.send_signal(signum)

    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        signal.signal(sig, forward)
    log.info("started %d workers", len(procs), extra={"pids": list(by_pid)})
    code = 0
    alive = set(by_pid)
    while alive:
        try:
            pid, status = os.waitpid(-1, 0)
        except ChildProcessError:
            break
        if pid not in alive:
            continue
        alive.discard(pid)
        rc = os.waitstatus_to_exitcode(status)
        by_pid[pid].returncode = rc
        if not stopping:
            log.error("worker %d exited with %d; stopping the others", pid, rc)
            stopping = True
            code = rc or 1
            for other in alive:
                os.kill(other, signal.SIGTERM)
        elif rc:
            code = code or rc
    return code
