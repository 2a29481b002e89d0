"""One synchronous LDAP lookup: subject -> the level names its entry gives.

ldap3 is synchronous, so this runs on worker threads (:mod:`authz.directory.cache`
owns them and bounds each lookup in time); each thread keeps one bound connection of
its own (an ldap3 connection is not safe to share across threads), made again after
any failure. The bind password is read from its file at each bind, so a rotated
password needs no reload. Library errors become :class:`DirectoryUnavailable` here, at
the boundary: the caller only knows "found", "not found" or "could not ask".
"""

from __future__ import annotations

import contextlib
import logging
import math
import ssl
import threading
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from authz.directory.filters import fill, level_names
from authz.directory.ldap import LDAPException, ldap3
from authz.errors import AuthzError
from authz.policy.directory import DN_SLOT, SUBJECT_SLOT, DirectorySettings

__all__ = ["DirectoryUnavailable", "LdapClient"]

log = logging.getLogger("authz.directory")
_SUCCESS, _SIZE_LIMIT, _NO_SUCH_OBJECT = 0, 4, 32
_MAX_GROUPS = 1000


class DirectoryUnavailable(AuthzError):
    """The directory could not be asked (down, too slow, refused our bind)."""

    transient = True


def _values(raw: Any) -> list[str]:
    items = raw if isinstance(raw, list | tuple) else [raw]
    out = []
    for item in items:
        if isinstance(item, bytes):
            item = item.decode("utf-8", "replace")
        if isinstance(item, str):
            out.append(item)
    return out


class _VerifiedTls(ldap3.Tls):  # type: ignore[misc]
    """TLS whose certificate *and host name* the standard library checks.

    ldap3 2.9.1 checks the name itself with ``ssl.match_hostname``, deprecated since
    Python 3.7 and gone in 3.12 (where ldap3 falls back to a copy of its own). Here the
    context does it during the handshake (``check_hostname``, ``server_hostname``), with
    the defaults of :func:`ssl.create_default_context` (TLS 1.2 or later)."""

    def __init__(self, ca_file: str | None, host: str) -> None:
        super().__init__(validate=ssl.CERT_REQUIRED, ca_certs_file=ca_file)
        self._context = ssl.create_default_context(cafile=ca_file)
        self._host = host

    def wrap_socket(self, connection: Any, do_handshake: bool = False) -> None:
        connection.socket = self._context.wrap_socket(
            connection.socket,
            server_side=False,
            do_handshake_on_connect=do_handshake,
            server_hostname=self._host,
        )


def _close(conn: ldap3.Connection) -> None:
    """Unbind, and close the socket whatever happened: ldap3 leaves it open when the
    server is gone (the unbind cannot be sent) or a connect was refused."""
    with contextlib.suppress(LDAPException, OSError):
        conn.unbind()
    sock = getattr(conn, "socket", None)
    if sock is not None:
        with contextlib.suppress(OSError):
            sock.close()


class LdapClient:
    """Lookups against one directory; call :meth:`lookup` from worker threads only."""

    def __init__(self, settings: DirectorySettings) -> None:
        self._s = settings
        url = urlsplit(settings.url)
        tls = None
        if url.scheme == "ldaps" or settings.start_tls:
            tls = _VerifiedTls(settings.ca_file, url.hostname or "localhost")
        self._server = ldap3.Server(
            url.hostname or "localhost",
            port=url.port,
            use_ssl=url.scheme == "ldaps",
            tls=tls,
            get_info=ldap3.NONE,
            connect_timeout=settings.timeout_s,
        )
        self._local = threading.local()
        self._lock = threading.Lock()
        self._open: set[ldap3.Connection] = set()
        attrs = {s.attribute for s in settings.levels if s.attribute}
        if settings.groups is not None and settings.groups.attribute:
            attrs.add(settings.groups.attribute)
        self._attributes = sorted(attrs) or [ldap3.NO_ATTRIBUTES]

    def _connection(self) -> ldap3.Connection:
        conn: ldap3.Connection | None = getattr(self._local, "conn", None)
        if conn is not None:
            if not conn.closed:
                return conn
            self._unbind(conn)  # closed under us (the server hung up): forget it
        password = None
        if self._s.password_file is not None:
            password = Path(self._s.password_file).read_text(encoding="utf-8").rstrip("\r\n")
        conn = ldap3.Connection(
            self._server,
            user=self._s.bind_dn,
            password=password,
            auto_bind=ldap3.AUTO_BIND_NONE,
            # whole seconds: ldap3 packs it into SO_RCVTIMEO (the cache bounds it finer)
            receive_timeout=max(1, math.ceil(self._s.timeout_s)),
            read_only=True,
            auto_referrals=False,  # AD refers to other domains: never chase them (time)
            raise_exceptions=False,
        )
        try:  # step by step, so a refused bind closes its socket instead of leaking it
            conn.open()
            if self._s.start_tls and not conn.start_tls():
                raise DirectoryUnavailable(f"StartTLS failed: {conn.result}")
            if not conn.bind():
                raise DirectoryUnavailable(f"bind refused: {conn.result.get('description')}")
        except BaseException:
            _close(conn)
            raise
        self._local.conn = conn
        with self._lock:
            self._open.add(conn)
        return conn

    def _drop(self) -> None:
        conn: ldap3.Connection | None = getattr(self._local, "conn", None)
        self._local.conn = None
        if conn is not None:
            self._unbind(conn)

    def _unbind(self, conn: ldap3.Connection) -> None:
        with self._lock:
            self._open.discard(conn)
        _close(conn)

    def _search(self, conn: ldap3.Connection, base: str, flt: str, attrs: Sequence[str],
                limit: int) -> tuple[int, list[dict[str, Any]]]:  # fmt: skip
        conn.search(
            base, flt, ldap3.SUBTREE, attributes=list(attrs), size_limit=limit,
            time_limit=max(1, math.ceil(self._s.timeout_s)),
        )  # fmt: skip
        code = int(conn.result.get("result", -1))
        if code not in (_SUCCESS, _SIZE_LIMIT, _NO_SUCH_OBJECT):
            raise DirectoryUnavailable(f"search failed: {conn.result.get('description')}")
        entries = [e for e in conn.response or () if e.get("type") == "searchResEntry"]
        return code, entries

    def lookup(self, subject: str) -> Mapping[str, str] | None:
        """The raw level names of ``subject``'s entry; None if the directory has no
        single entry for it (none, or more than one: ambiguous is never guessed)."""
        try:
            return self._lookup(subject)
        except DirectoryUnavailable:
            self._drop()
            raise
        except (LDAPException, OSError) as exc:
            self._drop()
            raise DirectoryUnavailable(f"{type(exc).__name__}: {exc}") from exc

    def _lookup(self, subject: str) -> Mapping[str, str] | None:
        conn = self._connection()
        flt = fill(self._s.user_filter, SUBJECT_SLOT, subject)
        code, entries = self._search(conn, self._s.base_dn, flt, self._attributes, 2)
        if code == _SIZE_LIMIT or len(entries) > 1:
            log.warning("directory: more than one entry matches a subject; treated as unknown",
                        extra={"subject": subject})  # fmt: skip
            return None
        if not entries:
            return None
        entry = entries[0]
        attributes = {k: _values(v) for k, v in (entry.get("attributes") or {}).items()}
        groups: list[str] = []
        g = self._s.groups
        if g is not None and g.attribute:
            groups = next((v for k, v in attributes.items() if k.lower() == g.attribute.lower()),
                          [])  # fmt: skip
        elif g is not None and g.base_dn:
            gflt = fill(g.filter, DN_SLOT, str(entry.get("dn", "")))
            _, found = self._search(conn, g.base_dn, gflt, [ldap3.NO_ATTRIBUTES], _MAX_GROUPS)
            groups = [str(e.get("dn", "")) for e in found]
        return level_names(self._s.levels, attributes, groups)

    def close(self) -> None:
        with self._lock:
            conns = list(self._open)
        for conn in conns:
            self._unbind(conn)
