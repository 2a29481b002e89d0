"""A real HTTP webhook receiver on loopback, for alert delivery tests.

    with WebhookReceiver(fail_first=1) as hooks:   # each delivery's first POST gets a 500
        ... point the policy's alerts.webhooks[].url at hooks.url ...
        hooks.wait_delivered(1)                     # accepted (2xx) deliveries

Every request is recorded (path, headers, body, the status it was answered with), so a
test can check signatures, retries and that each delivery id was accepted exactly once.
"""

from __future__ import annotations

import json
import threading
import time
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

__all__ = ["Received", "WebhookReceiver"]


@dataclass(frozen=True)
class Received:
    path: str
    headers: dict[str, str]  # lowercase names
    body: bytes
    status: int  # what the receiver answered

    @property
    def json(self) -> Any:
        return json.loads(self.body)


class WebhookReceiver:
    def __init__(self, fail_first: int = 0, fail_status: int = 500) -> None:
        self.fail_first = fail_first  # per delivery id (header x-authz-delivery)
        self.fail_status = fail_status
        self._lock = threading.Condition()
        self.requests: list[Received] = []
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers.get("content-length", "0")))
                with receiver._lock:
                    headers = {k.lower(): v for k, v in self.headers.items()}
                    delivery = headers.get("x-authz-delivery", "")
                    seen = sum(
                        1 for r in receiver.requests if r.headers.get("x-authz-delivery") == delivery
                    )
                    status = receiver.fail_status if seen < receiver.fail_first else 200
                    receiver.requests.append(Received(self.path, headers, body, status))
                    receiver._lock.notify_all()
                self.send_response(status)
                self.send_header("content-length", "0")
                self.end_headers()

            def log_message(self, *args: object) -> None:
                pass

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self._server.server_address[1]}/hooks/authz"

    def __enter__(self) -> WebhookReceiver:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(5)

    @property
    def delivered(self) -> list[Received]:
        with self._lock:
            return [r for r in self.requests if 200 <= r.status < 300]

    def wait_delivered(self, count: int, timeout: float = 10.0) -> list[Received]:
        deadline = time.monotonic() + timeout
        with self._lock:
            while True:
                ok = [r for r in self.requests if 200 <= r.status < 300]
                if len(ok) >= count:
                    return ok
                left = deadline - time.monotonic()
                if left <= 0:
                    raise TimeoutError(
                        f"{len(ok)} of {count} deliveries after {timeout}s "
                        f"({len(self.requests)} requests)"
                    )
                self._lock.wait(left)
