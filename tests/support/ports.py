"""Loopback ports for tests: every server under test binds 127.0.0.1, never a fixed port."""

from __future__ import annotations

import socket
import time

__all__ = ["free_port", "wait_port"]


def free_port(host: str = "127.0.0.1") -> int:
    """A port the kernel just handed out and released.

    Another process may grab it before the caller binds it; the window is tiny on a test
    machine. Prefer binding port 0 and reading the port back where the server allows it.
    """
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        port: int = sock.getsockname()[1]
        return port


def free_ports_in_a_row(count: int, host: str = "127.0.0.1") -> int:
    """A port p with p+1 .. p+count-1 free too (`authz serve --workers N` puts worker i's
    admin API on the --http-address port + i)."""
    while True:
        port = free_port(host)
        taken = False
        for extra in range(1, count):
            with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
                try:
                    probe.bind((host, port + extra))
                except OSError:
                    taken = True
                    break
        if not taken:
            return port


def wait_port(host: str, port: int, timeout: float = 10.0) -> None:
    """Return once ``host:port`` accepts TCP connections; ``TimeoutError`` after ``timeout``."""
    deadline = time.monotonic() + timeout
    last_error: OSError | None = None
    while time.monotonic() < deadline:
        try:
            with socket.create_connection((host, port), timeout=0.5):
                return
        except OSError as exc:
            last_error = exc
            time.sleep(0.02)
    raise TimeoutError(f"{host}:{port} did not accept connections within {timeout}s: {last_error}")
