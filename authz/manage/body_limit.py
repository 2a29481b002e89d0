"""A bound on the management API's request bodies, before anything reads them.

FastAPI reads a route's whole JSON body into memory before it validates it, and before
the route's dependencies have checked the caller's credential: without a bound, anyone
who can reach the port could make the service hold a body of any size. Every body this
API takes is a small JSON object (an allocation, a request, a note), so bodies are read
here, up to :data:`MAX_BODY_BYTES`, and a larger one, declared or sent, is answered 413
without reaching the app.
"""

from __future__ import annotations

import json
from typing import Any

__all__ = ["MAX_BODY_BYTES", "BodyLimit"]

MAX_BODY_BYTES = 64 * 1024

Scope = dict[str, Any]
Message = dict[str, Any]


class BodyLimit:
    """ASGI middleware: the app sees a body of at most ``max_bytes``, read in full."""

    def __init__(self, app: Any, max_bytes: int = MAX_BODY_BYTES) -> None:
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope: Scope, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = dict(scope.get("headers", ())).get(b"content-length")
        if declared is not None and (not declared.isdigit() or int(declared) > self.max_bytes):
            await self._too_large(send)
            return
        body = bytearray()
        more = True
        while more:
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            body += message.get("body", b"")
            more = bool(message.get("more_body", False))
            if len(body) > self.max_bytes:
                await self._too_large(send)
                return
        replayed = False

        async def replay() -> Message:
            nonlocal replayed
            if replayed:
                following: Message = await receive()  # only a disconnect follows a whole body
                return following
            replayed = True
            return {"type": "http.request", "body": bytes(body), "more_body": False}

        await self.app(scope, replay, send)

    async def _too_large(self, send: Any) -> None:
        payload = json.dumps({"detail": f"request body over {self.max_bytes} bytes"}).encode()
        await send({
            "type": "http.response.start",
            "status": 413,
            "headers": [(b"content-type", b"application/json"), (b"connection", b"close"),
                        (b"content-length", str(len(payload)).encode())],
        })  # fmt: skip
        await send({"type": "http.response.body", "body": payload})
