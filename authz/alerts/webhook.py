"""Alert webhooks: one JSON POST per alert and hook, signed, retried with backoff.

Headers of every attempt::

    content-type: application/json
    x-authz-delivery: <alert id>        the same on every retry: receivers dedupe on it
    x-authz-attempt: <n>
    x-authz-timestamp: <unix seconds>
    x-authz-signature: sha256=<hex HMAC-SHA256(secret, "<timestamp>." + body)>

The receiver recomputes the HMAC over the timestamp, a dot and the raw body with the
shared secret (the policy names the environment variable that holds it), compares in
constant time, and rejects old timestamps to stop replays.

A 2xx is delivered. A network error, a timeout, a 408, a 429 or a 5xx is retried after
1, 2, 4, 8... seconds (at most 60) up to ``max_attempts``; any other 4xx is final (the
receiver said no; sending the same thing again will not change its mind).
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import json
import logging
import os
from collections.abc import Awaitable, Callable, Mapping

import aiohttp

from authz.alerts.model import Alert
from authz.clock import Clock
from authz.policy.observability import Webhook
from authz.telemetry.metrics import Metrics

__all__ = ["WebhookSender", "sign"]

log = logging.getLogger("authz.alerts.webhook")
Sleep = Callable[[float], Awaitable[None]]
_RETRY_STATUS = {408, 429}


def sign(secret: bytes, timestamp: str, body: bytes) -> str:
    return (
        "sha256=" + hmac.new(secret, timestamp.encode() + b"." + body, hashlib.sha256).hexdigest()
    )


def backoff(attempt: int) -> float:
    """Seconds to wait after failed attempt number ``attempt`` (1-based)."""
    return float(min(60, 2 ** (attempt - 1)))


class WebhookSender:
    def __init__(
        self,
        hooks: Callable[[], tuple[Webhook, ...]],
        clock: Clock,
        metrics: Metrics,
        env: Mapping[str, str] | None = None,
        sleep: Sleep = asyncio.sleep,
    ) -> None:
        self._hooks = hooks
        self._clock = clock
        self._metrics = metrics
        self._env = os.environ if env is None else env
        self._sleep = sleep  # tests pass one that returns at once and records the delays
        self._pending: set[asyncio.Task[None]] = set()

    def send(self, alert: Alert) -> None:
        for hook in self._hooks():
            task = asyncio.get_running_loop().create_task(self._deliver(hook, alert))
            self._pending.add(task)
            task.add_done_callback(self._pending.discard)

    def _count(self, outcome: str) -> None:
        self._metrics.alert_deliveries.labels(outcome).inc()

    async def _deliver(self, hook: Webhook, alert: Alert) -> None:
        secret = self._env.get(hook.secret_env)
        if not secret:
            log.error("webhook %s: $%s is not set; not sending unsigned", hook.url, hook.secret_env)
            self._count("failed")
            return
        body = json.dumps(alert.payload(), separators=(",", ":")).encode()
        # Alerts are rare: a session per delivery, closed when it ends, leaks nothing.
        async with aiohttp.ClientSession() as session:
            await self._attempts(session, hook, alert, secret, body)

    async def _attempts(
        self,
        session: aiohttp.ClientSession,
        hook: Webhook,
        alert: Alert,
        secret: str,
        body: bytes,
    ) -> None:
        for attempt in range(1, hook.max_attempts + 1):
            ts = str(int(self._clock.now()))
            headers = {
                "content-type": "application/json",
                "user-agent": "authz-alerts",
                "x-authz-delivery": alert.id,
                "x-authz-attempt": str(attempt),
                "x-authz-timestamp": ts,
                "x-authz-signature": sign(secret.encode(), ts, body),
            }
            why: str
            try:
                timeout = aiohttp.ClientTimeout(total=hook.timeout_s)
                async with session.post(
                    hook.url, data=body, headers=headers, timeout=timeout
                ) as resp:
                    status = resp.status
                if 200 <= status < 300:
                    self._count("ok")
                    return
                if status < 500 and status not in _RETRY_STATUS:
                    log.error("webhook %s refused alert %s: HTTP %d", hook.url, alert.id, status)
                    self._count("failed")
                    return
                why = f"HTTP {status}"
            except (aiohttp.ClientError, TimeoutError) as exc:
                why = type(exc).__name__
            if attempt == hook.max_attempts:
                break
            self._count("retry")
            log.warning(
                "webhook %s: attempt %d for %s failed (%s)", hook.url, attempt, alert.id, why
            )
            await self._sleep(backoff(attempt))
        log.error("webhook %s: giving up on alert %s after %d attempts", hook.url, alert.id,
                  hook.max_attempts)  # fmt: skip
        self._count("failed")

    async def drain(self, wait_s: float | None = None) -> None:
        """Wait for deliveries in flight (graceful stop, tests)."""
        if self._pending:
            await asyncio.wait(list(self._pending), timeout=wait_s)

    async def close(self, wait_s: float = 5.0) -> None:
        await self.drain(wait_s)
        for task in list(self._pending):
            task.cancel()
        if self._pending:
            await asyncio.wait(list(self._pending), timeout=1.0)
