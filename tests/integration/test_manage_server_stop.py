"""A stuck request on the management API cannot hold the service's shutdown: stop() ends
within its grace, closing what is still open (before, it waited for ever)."""

from __future__ import annotations

import asyncio
import contextlib
import socket

import pytest
from fastapi import FastAPI

from authz.manage.server import ManageServer

pytestmark = pytest.mark.integration


async def test_stop_is_bounded_by_its_grace_with_a_request_that_never_ends() -> None:
    app = FastAPI()
    entered = asyncio.Event()

    @app.get("/hang")
    async def hang() -> dict[str, str]:
        entered.set()
        await asyncio.Event().wait()  # a handler that never answers
        return {}

    server = ManageServer(app, grace_s=1)
    await server.start("127.0.0.1", 0)
    _reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
    try:
        writer.write(b"GET /hang HTTP/1.1\r\nHost: t\r\n\r\n")
        await writer.drain()
        async with asyncio.timeout(30):
            await entered.wait()
        async with asyncio.timeout(30):  # far above the 1 s grace (+2 s), far below for ever
            await server.stop()
        # the port is closed: nothing listens there any more
        with pytest.raises(OSError), socket.create_connection(("127.0.0.1", server.port), 5):
            pass
    finally:
        writer.close()
        with contextlib.suppress(ConnectionError, OSError):
            await writer.wait_closed()
