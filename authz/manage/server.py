"""The management API's listener: uvicorn, inside the service's own event loop.

No second process: ``uvicorn.Server.serve`` runs as a task of ``authz serve``, over a
socket bound here first (so a taken port is one clear :class:`AddressInUse`, never
uvicorn's ``sys.exit``), with uvicorn's signal capture turned off (the service's own
SIGTERM handling stops it, after the check ports). Who may reach it follows the other
ports' rule (authz/listen.py): loopback, TLS (``--tls-cert``/``--tls-key``: the same
server certificate; callers authenticate with bearer tokens, so no client certificate
is asked for), or ``--insecure-plaintext``.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import logging
import socket
from collections.abc import Iterator

import uvicorn
from fastapi import FastAPI

from authz.errors import AddressInUse, AuthzError
from authz.tls import TlsFiles

__all__ = ["ManageServer"]

log = logging.getLogger("authz.manage")


class _Server(uvicorn.Server):
    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        yield  # the service owns SIGTERM/SIGINT (authz/server.py)


def _bind(host: str, port: int) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host, port))
        sock.listen(128)
    except OSError as exc:
        sock.close()
        where = f"{host}:{port}" if ":" not in host else f"[{host}]:{port}"
        if exc.errno == errno.EADDRINUSE:
            raise AddressInUse(f"the management API address {where} is already in use") from None
        raise AuthzError(f"cannot listen on the management API address {where}: {exc}") from None
    sock.setblocking(False)
    return sock


# How long a stop waits for requests in flight before it closes their connections: the
# management API never holds a request open (no streams, no long polls), so this only
# bounds a slow or stuck client, which must not hold the service's shutdown.
STOP_GRACE_S = 5


class ManageServer:
    def __init__(
        self, app: FastAPI, tls: TlsFiles | None = None, grace_s: int = STOP_GRACE_S
    ) -> None:
        self._app = app
        self._tls = tls
        self._grace_s = grace_s
        self._server: _Server | None = None
        self._task: asyncio.Task[None] | None = None
        self._sock: socket.socket | None = None
        self.port = 0

    async def start(self, host: str, port: int) -> None:
        self._sock = _bind(host, port)
        self.port = self._sock.getsockname()[1]
        config = uvicorn.Config(
            self._app, log_config=None, access_log=False, lifespan="off",
            ssl_certfile=self._tls.cert if self._tls else None,
            ssl_keyfile=self._tls.key if self._tls else None,
            timeout_keep_alive=75, limit_concurrency=256, h11_max_incomplete_event_size=16384,
            timeout_graceful_shutdown=self._grace_s,
        )  # fmt: skip
        self._server = _Server(config)
        self._task = asyncio.create_task(self._server.serve(sockets=[self._sock]))
        while not self._server.started:  # bound already: only the app's own start-up
            if self._task.done():
                await self._task  # raises what stopped it
                raise AuthzError("the management API stopped at start")
            await asyncio.sleep(0.01)

    async def stop(self) -> None:
        if self._server is not None and self._task is not None:
            self._server.should_exit = True
            # uvicorn bounds the wait for running requests (timeout_graceful_shutdown);
            # this bounds the rest (a connection that never closes), then forces it.
            done, _ = await asyncio.wait({self._task}, timeout=self._grace_s + 2.0)
            if not done:
                log.warning("the management API did not stop in time; closing it")
                self._server.force_exit = True
                self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        if self._sock is not None:
            self._sock.close()
            self._sock = None
