"""Errors raised by authz.

A denial is never an exception: it is a :class:`authz.decision.Decision` value. An
exception means the service could not decide, or could not start.

    AuthzError
    ├── PolicyError            a policy file is invalid (message starts with file:path)
    ├── IdentityError          a credential is missing or invalid (-> 401)
    ├── BodyError              the request body cannot be read as an AI request
    ├── AddressInUse           a port to listen on is taken (exit code 3, not 2)
    └── LedgerError
        ├── LedgerUnavailable  storage could not be reached (transient = True)
        └── UnknownReservation settle/release named a reservation the ledger never had
"""

from __future__ import annotations

__all__ = [
    "AddressInUse",
    "AuthzError",
    "BodyError",
    "IdentityError",
    "LedgerError",
    "LedgerUnavailable",
    "PolicyError",
    "UnknownReservation",
]


class AuthzError(Exception):
    """Base of every error authz raises on purpose."""


class PolicyError(AuthzError):
    """An invalid policy. ``str(err)`` is ``"<file>:<path>: <what is wrong> (got <value>)"``."""

    def __init__(self, file: str, path: str, message: str) -> None:
        self.file = file
        self.path = path
        self.message = message
        super().__init__(f"{file}:{path}: {message}" if path else f"{file}: {message}")


class IdentityError(AuthzError):
    """The caller's credential is missing or does not verify.

    ``reason`` is a stable, short string safe to show the client and to use as a metric
    label (``missing_credential``, ``invalid_token``, ``expired``...). The message never
    contains the token itself.
    """

    def __init__(self, reason: str, message: str) -> None:
        self.reason = reason
        super().__init__(message)


class BodyError(AuthzError):
    """The request body is missing, truncated or not the JSON of an AI API request."""


class AddressInUse(AuthzError):
    """Another process listens on an address the service must bind (start-up only)."""


class LedgerError(AuthzError):
    """A ledger operation failed."""

    transient = False


class LedgerUnavailable(LedgerError):
    """Storage is unreachable or timed out; retrying later may succeed."""

    transient = True


class UnknownReservation(LedgerError):
    """A reservation id the ledger does not know (never made, or long forgotten)."""
