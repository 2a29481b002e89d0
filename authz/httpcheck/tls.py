"""mTLS for the HTTP check port: the gRPC port's files and rules (authz/tls.py).

The same ``--tls-cert``, ``--tls-key`` and ``--tls-client-ca`` serve both ports, with a
client certificate required: whoever can call ``/check`` can spend budgets, and whoever
can call ``/settle`` with a handle can settle it. As on the gRPC port the files are
followed without a restart: before each new connection's handshake (Python's
``sni_callback``, which every TLS client reaches) the three files are stat'ed, and when
one changed a new context is loaded and used from that connection on. Files caught
half-written do not load: the last good context stays, the error is logged once, and
the files are tried again at most once a second.
"""

from __future__ import annotations

import logging
import os
import ssl
import time

from authz.errors import AuthzError
from authz.tls import TlsFiles

__all__ = ["ReloadingContext"]

log = logging.getLogger("authz.tls")
_RETRY_BROKEN_S = 1.0
_Stamp = tuple[tuple[int, int, int], ...]


def _context(files: TlsFiles) -> ssl.SSLContext:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.verify_mode = ssl.CERT_REQUIRED  # no client certificate, no request
    try:
        ctx.load_cert_chain(files.cert, files.key)
        ctx.load_verify_locations(cafile=files.client_ca)
    except (OSError, ssl.SSLError) as exc:
        raise AuthzError(
            f"tls (HTTP check port): cannot load {files.cert}, {files.key} or"
            f" {files.client_ca}: {exc}"
        ) from None
    ctx.set_alpn_protocols(["http/1.1"])
    return ctx


def _stamp(files: TlsFiles) -> _Stamp | None:
    try:
        stats = [os.stat(p) for p in (files.cert, files.key, files.client_ca)]
    except OSError:
        return None
    return tuple((st.st_mtime_ns, st.st_size, st.st_ino) for st in stats)


class ReloadingContext:
    """The server context for aiohttp; it swaps itself for a fresh one when files change."""

    def __init__(self, files: TlsFiles) -> None:
        self.files = files
        self._stamp = _stamp(files)
        self.current = _context(files)  # start-up: unreadable files are fatal
        self._broken = ""
        self._retry_at = 0.0
        self.reloads = 0
        self.context = _context(files)  # the one the listener holds; it hands over
        self.context.sni_callback = self._on_hello

    def _on_hello(self, conn: ssl.SSLObject | ssl.SSLSocket, _name: str | None,
                  _ctx: ssl.SSLContext) -> None:  # fmt: skip
        self._refresh()
        conn.context = self.current

    def _refresh(self) -> None:
        stamp = _stamp(self.files)
        if stamp is None:
            return  # a file missing mid-swap: keep what works
        if stamp == self._stamp and not (self._broken and time.monotonic() >= self._retry_at):
            return
        self._stamp = stamp
        try:
            fresh = _context(self.files)
        except AuthzError as exc:
            self._retry_at = time.monotonic() + _RETRY_BROKEN_S
            if str(exc) != self._broken:
                log.error("%s; keeping the previous certificates", exc)
            self._broken = str(exc)
            return
        self._broken = ""
        self.current = fresh
        self.reloads += 1
        log.info("tls (HTTP check port): reloaded %s", self.files.cert)
