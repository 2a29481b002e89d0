"""mTLS for the gRPC port: the server's certificate, and the CA its callers must chain to.

Whoever can call Check can spend anyone's budget (and with ``identity.source:
envoy_jwt_authn`` be anyone); whoever can open a Process stream can settle any
reservation. With mTLS only a holder of a client certificate from ``client_ca``, the
gateway, gets that far: the handshake refuses the rest before a single RPC.

Files, not values, and reloaded on change without a restart, because certificates
rotate (cert-manager, a Kubernetes Secret's symlink swap, a sidecar writing new files).
gRPC's ``dynamic_ssl_server_credentials`` asks a fetcher for the configuration before
*every new connection's* handshake (checked with grpc.aio 1.85: called on a gRPC core
thread, never on the event loop). The fetcher here only stats the three files (a few
microseconds) and reads them again when one changed; Envoy keeps its connections for
hours, so this is paid per connection, not per request. A rotation applies to the next
connection: connections already open keep the credentials they were made with.

Files caught half-written (a new certificate beside the old key) fail validation; the
last good configuration stays in use, the error is logged once, and the files are read
again at most once a second until they load (a file's mtime can be too coarse to show
the second half of a write).
"""

from __future__ import annotations

import logging
import os
import threading
import time
from dataclasses import dataclass

import grpc
from cryptography import x509
from cryptography.hazmat.primitives import serialization

from authz.errors import AuthzError

__all__ = ["ReloadingCredentials", "TlsFiles", "tls_files"]

log = logging.getLogger("authz.tls")

_Stamp = tuple[tuple[int, int, int], ...]
_RETRY_BROKEN_S = 1.0


@dataclass(frozen=True, slots=True)
class TlsFiles:
    """PEM files: the server's chain and key, and the CA bundle client certs must chain to."""

    cert: str
    key: str
    client_ca: str


def tls_files(cert: str | None, key: str | None, client_ca: str | None) -> TlsFiles | None:
    """All three paths, or none (plaintext). A client CA is not optional: a TLS port that
    takes any client would look protected and protect nothing."""
    given = {"--tls-cert": cert, "--tls-key": key, "--tls-client-ca": client_ca}
    if not any(given.values()):
        return None
    missing = [flag for flag, value in given.items() if not value]
    if missing:
        raise AuthzError(
            "mTLS needs --tls-cert, --tls-key and --tls-client-ca together;"
            f" missing {', '.join(missing)}"
        )
    assert cert and key and client_ca
    return TlsFiles(cert, key, client_ca)


@dataclass(frozen=True, slots=True)
class _Loaded:
    config: grpc.ServerCertificateConfiguration
    subject: str
    not_after: str


def _load(files: TlsFiles) -> _Loaded:
    """Read and cross-check the three files; :class:`AuthzError` naming the bad one."""

    def read(path: str, what: str) -> bytes:
        try:
            with open(path, "rb") as f:
                return f.read()
        except OSError as exc:
            raise AuthzError(f"tls: cannot read the {what} {path}: {exc.strerror}") from None

    cert_pem = read(files.cert, "certificate")
    key_pem = read(files.key, "key")
    ca_pem = read(files.client_ca, "client CA bundle")
    try:
        chain = x509.load_pem_x509_certificates(cert_pem)
    except ValueError as exc:
        raise AuthzError(f"tls: {files.cert} is not a PEM certificate chain: {exc}") from None
    try:
        key = serialization.load_pem_private_key(key_pem, password=None)
    except (ValueError, TypeError) as exc:  # TypeError: an encrypted key
        raise AuthzError(f"tls: {files.key} is not an unencrypted PEM key: {exc}") from None
    try:
        x509.load_pem_x509_certificates(ca_pem)
    except ValueError as exc:
        raise AuthzError(f"tls: {files.client_ca} is not a PEM CA bundle: {exc}") from None
    raw = serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    if key.public_key().public_bytes(*raw) != chain[0].public_key().public_bytes(*raw):
        raise AuthzError(f"tls: the key {files.key} does not match the certificate {files.cert}")
    config = grpc.ssl_server_certificate_configuration([(key_pem, cert_pem)], ca_pem)
    leaf = chain[0]
    return _Loaded(config, leaf.subject.rfc4514_string(), leaf.not_valid_after_utc.isoformat())


def _stamp(files: TlsFiles) -> _Stamp | None:
    try:
        stats = [os.stat(p) for p in (files.cert, files.key, files.client_ca)]
    except OSError:
        return None
    return tuple((st.st_mtime_ns, st.st_size, st.st_ino) for st in stats)


class ReloadingCredentials:
    """Server credentials that require a client certificate and follow the files."""

    def __init__(self, files: TlsFiles) -> None:
        self.files = files
        self._lock = threading.Lock()  # the fetcher runs on gRPC's threads
        self._stamp = _stamp(files)
        loaded = _load(files)  # start-up: unreadable or mismatched files are fatal
        self._initial = loaded.config
        self.reloads = self.reload_failures = 0
        self._broken = ""  # the error of the files as they are now, if they do not load
        self._retry_at = 0.0
        log.info(
            "tls: serving %s (valid until %s), client certificates required",
            loaded.subject, loaded.not_after,
            extra={"tls_cert": files.cert, "tls_client_ca": files.client_ca},
        )  # fmt: skip

    def credentials(self) -> grpc.ServerCredentials:
        return grpc.dynamic_ssl_server_credentials(
            self._initial, self.fetch, require_client_authentication=True
        )

    def fetch(self) -> grpc.ServerCertificateConfiguration | None:
        """gRPC's fetcher: a new configuration if the files changed, else None (keep)."""
        stamp = _stamp(self.files)
        if stamp is None or not self._due(stamp):
            return None  # unchanged, or a file missing mid-swap: keep what works
        with self._lock:
            if not self._due(stamp):
                return None  # another handshake's thread got here first
            self._stamp = stamp
            try:
                loaded = _load(self.files)
            except Exception as exc:  # never let a bad file break the handshake itself
                self._retry_at = time.monotonic() + _RETRY_BROKEN_S
                if str(exc) != self._broken:  # once per error, not per connection
                    self.reload_failures += 1
                    log.error("%s; keeping the previous certificates", exc)
                self._broken = str(exc)
                return None
            self._broken = ""
            self.reloads += 1
        log.info("tls: reloaded %s (valid until %s)", loaded.subject, loaded.not_after)
        return loaded.config

    def _due(self, stamp: _Stamp) -> bool:
        return stamp != self._stamp or bool(self._broken and time.monotonic() >= self._retry_at)
