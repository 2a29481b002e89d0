"""Ledger URLs: ``redis://``, ``rediss://``, ``redis+cluster://`` (and ``rediss+cluster://``).

Parsing only: this module imports no Redis client, so the policy loader can validate a
URL offline. Passwords come from the URL or ``AUTHZ_REDIS_PASSWORD``; :meth:`safe` and
``repr`` never show them.

    redis://[user[:password]@]host[:port][/db][?option=value&...]
    redis+cluster://[user[:password]@]host:port,host:port[?option=value&...]

Options (all optional): ``prefix`` (key prefix, default ``authz``), ``pool`` (connections
per Redis node, default 32), ``timeout`` / ``connect_timeout`` (seconds, default 0.5),
``lease`` (``on``/``off``, default ``off``: edge leases, see :mod:`authz.ledger.lease`;
docs/capacity.md says why they are off),
``lease_fraction`` (share of what is left one lease may take, default 0.1),
``lease_max`` (units, default 1000000), ``lease_ttl`` (seconds, default 10),
``lease_flush_ms`` (batch interval, default 50).
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from urllib.parse import parse_qsl, unquote, urlsplit

__all__ = ["SCHEMES", "LeaseOptions", "RedisOptions", "parse_redis_url", "redact_url"]

SCHEMES = ("redis", "rediss", "redis+cluster", "rediss+cluster")
_OPTIONS = {
    "prefix", "pool", "timeout", "connect_timeout",
    "lease", "lease_fraction", "lease_max", "lease_ttl", "lease_flush_ms",
}  # fmt: skip


@dataclass(frozen=True, slots=True)
class LeaseOptions:
    enabled: bool = True
    fraction: float = 0.1  # a lease takes at most this share of what is left
    max_units: int = 1_000_000  # ... and never more than this
    ttl_s: float = 10.0  # unrenewed for this long (a dead replica): counted as spent
    flush_s: float = 0.05  # batch interval: settlements and lease returns go out this often


@dataclass(frozen=True, slots=True)
class RedisOptions:
    hosts: tuple[tuple[str, int], ...]
    cluster: bool = False
    tls: bool = False
    db: int = 0
    username: str | None = None
    password: str | None = field(default=None, repr=False)
    prefix: str = "authz"
    pool: int = 32
    timeout_s: float = 0.5
    connect_timeout_s: float = 0.5
    lease: LeaseOptions = LeaseOptions()

    def safe(self) -> str:
        """The URL without credentials, for logs and error messages."""
        scheme = ("rediss" if self.tls else "redis") + ("+cluster" if self.cluster else "")
        hosts = ",".join(f"{h}:{p}" for h, p in self.hosts)
        return f"{scheme}://{hosts}" + ("" if self.cluster else f"/{self.db}")


def redact_url(url: str) -> str:
    """``url`` with any password replaced by ``***`` (for messages about a bad URL)."""
    scheme, sep, rest = url.partition("://")
    netloc, slash, tail = rest.partition("/")
    creds, at, hosts = netloc.rpartition("@")
    if at and ":" in creds:
        creds = creds.split(":", 1)[0] + ":***"
    return f"{scheme}{sep}{creds}{at}{hosts}{slash}{tail}"


def _num(opts: dict[str, str], name: str, default: float, lo: float, hi: float) -> float:
    if name not in opts:
        return default
    try:
        value = float(opts[name])
    except ValueError:
        raise ValueError(f"option {name} must be a number (got {opts[name]!r})") from None
    if not lo <= value <= hi:
        raise ValueError(f"option {name} must be between {lo} and {hi} (got {value})")
    return value


def parse_redis_url(url: str) -> RedisOptions:
    """Parse a Redis ledger URL; ``ValueError`` (never showing the password) if it is bad."""
    scheme, sep, rest = url.partition("://")
    if not sep or scheme not in SCHEMES:
        raise ValueError(f"unsupported ledger URL scheme {scheme + '://'!r}")
    cluster = scheme.endswith("+cluster")
    parts = urlsplit("redis://" + rest)
    creds, _, hostlist = parts.netloc.rpartition("@")
    username, _, password = creds.partition(":") if creds else ("", "", "")
    hosts = []
    for item in filter(None, hostlist.split(",")):
        if item.startswith("["):  # [::1]:6379
            host, _, port = item[1:].partition("]")
            port = port.removeprefix(":") or "6379"
        else:
            host, _, port = item.partition(":")
            port = port or "6379"
        if not port.isdigit() or not 0 < int(port) < 65536:
            raise ValueError(f"bad port in ledger URL host {item!r}")
        hosts.append((host or "127.0.0.1", int(port)))
    if not hosts:
        raise ValueError("the ledger URL names no host")
    if len(hosts) > 1 and not cluster:
        raise ValueError("several hosts need redis+cluster://")
    path = parts.path.strip("/")
    if cluster and path:
        raise ValueError("redis+cluster:// has no database number (cluster mode uses db 0)")
    if path and not path.isdigit():
        raise ValueError(f"the database must be a number (got {path!r})")
    opts = dict(parse_qsl(parts.query, keep_blank_values=True))
    unknown = sorted(set(opts) - _OPTIONS)
    if unknown:
        raise ValueError(f"unknown ledger URL option(s): {', '.join(unknown)}")
    # Off by default: with many distinct subjects (a lease per user counter) the batched
    # syncs serialise per org and, under saturation, run past the breaker's timeout
    # (docs/performance.md). Turn them on for few, hot budgets shared by many checks.
    lease_flag = opts.get("lease", "off")
    if lease_flag not in ("on", "off"):
        raise ValueError(f"option lease must be on or off (got {lease_flag!r})")
    lease = LeaseOptions(
        enabled=lease_flag == "on",
        fraction=_num(opts, "lease_fraction", 0.1, 0.0, 1.0),
        max_units=int(_num(opts, "lease_max", 1_000_000, 0, 1e15)),
        ttl_s=_num(opts, "lease_ttl", 10.0, 0.1, 3600),
        flush_s=_num(opts, "lease_flush_ms", 50, 1, 10_000) / 1000,
    )
    prefix = opts.get("prefix", "authz")
    if not prefix or any(c in prefix for c in "{}"):
        raise ValueError(f"option prefix must be non-empty and without braces (got {prefix!r})")
    return RedisOptions(
        hosts=tuple(hosts),
        cluster=cluster,
        tls=scheme.startswith("rediss"),
        db=int(path or 0),
        username=unquote(username) or None,
        password=unquote(password) or os.environ.get("AUTHZ_REDIS_PASSWORD") or None,
        prefix=prefix,
        pool=int(_num(opts, "pool", 32, 1, 10_000)),
        timeout_s=_num(opts, "timeout", 0.5, 0.001, 60),
        connect_timeout_s=_num(opts, "connect_timeout", 0.5, 0.001, 60),
        lease=lease,
    )
