"""Choose the audit store from the ledger URL (and the policy's ``audit.file``)."""

from __future__ import annotations

from authz.audit.base import AuditLog

__all__ = ["open_audit_log"]


def open_audit_log(ledger_url: str, file: str | None) -> AuditLog:
    """``redis://``-family ledgers keep the chain in a Redis stream beside the budgets;
    ``memory://`` and ``sqlite://`` keep it in ``file`` (required: memory does not survive a
    restart, and the chain is append-only where the sqlite ledger's tables are not)."""
    scheme = ledger_url.partition("://")[0]
    if scheme in ("redis", "rediss", "redis+cluster", "rediss+cluster"):
        from authz.audit.redis import RedisAuditLog

        return RedisAuditLog(ledger_url)
    if scheme in ("memory", "sqlite"):  # the embedded ledgers
        if not file:
            raise ValueError(
                f"the {scheme}:// ledger keeps the audit chain in a file: set audit.file"
            )
        from authz.audit.file import FileAuditLog

        return FileAuditLog(file)
    raise ValueError(f"no audit store for ledger URL scheme {scheme}://")
