"""Loopback ports for tests: every server under test binds 127.0.0.1, never a fixed port."""

from __future__ import annotations

import random
import socket
import time

__all__ = ["free_port", "wait_port"]


def _ephemeral_low() -> int:
    try:
        with open("/proc/sys/net/ipv4/ip_local_port_range") as f:
            return int(f.read().split()[0])
    except (OSError, ValueError, IndexError):
        return 32768


_RNG = random.Random()


def free_port(host: str = "127.0.0.1") -> int:
    """A free port BELOW the kernel's ephemeral range.

    A port the kernel hands out for port 0 is ephemeral: between our releasing it and
    the server binding it, any outgoing connection (Envoy dialling a cluster, a client)
    may take it as its source port, and the server then fails with "address already in
    use" (seen in CI). Ports below the range are never handed out implicitly, so only
    an explicit bind elsewhere can race us.
    """
    high = _ephemeral_low() - 1
    for _ in range(200):
        port = _RNG.randint(20000, high)
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
            try:
                sock.bind((host, port))
            except OSError:
                continue
            return port
    raise OSError("no free port below the ephemeral range")


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
