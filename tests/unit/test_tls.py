"""authz/tls.py and authz/listen.py without a server: files, reloads, address rules."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest

from authz.errors import AuthzError, PolicyError
from authz.listen import check_transport, is_local, jwt_authn_guard
from authz.policy.loader import parse_policy
from authz.tls import ReloadingCredentials, TlsFiles, tls_files
from tests.support.certs import TestCA

pytestmark = pytest.mark.unit


def write_pki(folder: Path, ca: TestCA) -> TlsFiles:
    ca.issue("authz", server=True).write(folder, "server")
    ca.write(folder / "ca.crt")
    return TlsFiles(str(folder / "server.crt"), str(folder / "server.key"), str(folder / "ca.crt"))


def test_tls_flags_all_or_none() -> None:
    assert tls_files(None, None, None) is None
    assert tls_files("c", "k", "ca") == TlsFiles("c", "k", "ca")
    with pytest.raises(AuthzError, match="missing --tls-client-ca"):
        tls_files("c", "k", None)  # a TLS port that takes any client protects nothing


def test_start_up_names_the_bad_file(tmp_path: Path) -> None:
    files = write_pki(tmp_path, TestCA())
    (tmp_path / "server.key").write_text("not a key")
    with pytest.raises(AuthzError, match=r"server\.key is not an unencrypted PEM key"):
        ReloadingCredentials(files)
    missing = TlsFiles(files.cert, files.key, str(tmp_path / "nope.crt"))
    with pytest.raises(AuthzError, match="cannot read the client CA bundle"):
        ReloadingCredentials(missing)


def test_fetch_reloads_only_when_the_files_change(tmp_path: Path) -> None:
    files = write_pki(tmp_path, TestCA())
    creds = ReloadingCredentials(files)
    assert creds.fetch() is None  # unchanged: gRPC keeps its configuration
    write_pki(tmp_path, TestCA("second"))
    assert creds.fetch() is not None and creds.reloads == 1
    assert creds.fetch() is None


def test_a_mismatched_pair_keeps_the_last_good_and_logs_once(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    files = write_pki(tmp_path, TestCA())
    creds = ReloadingCredentials(files)
    other = TestCA("other").issue("authz", server=True)
    (tmp_path / "server.key").write_bytes(other.key_pem)  # half of a rotation
    with caplog.at_level(logging.ERROR, "authz.tls"):
        for _ in range(3):
            assert creds.fetch() is None
    # Errors only: the INFO "serving" line of the constructor is captured too when an
    # earlier test in the same process left the authz loggers at INFO.
    errors = [r for r in caplog.records if r.levelno >= logging.ERROR]
    assert creds.reload_failures == 1 and len(errors) == 1
    assert "does not match the certificate" in errors[0].getMessage()
    (tmp_path / "server.crt").write_bytes(other.cert_pem)  # the other half lands
    assert creds.fetch() is not None


@pytest.mark.parametrize(
    ("address", "local"),
    [
        ("127.0.0.1:9191", True),
        ("127.0.0.2:1", True),
        ("[::1]:9191", True),
        ("localhost:9191", True),
        ("unix:/run/authz.sock", True),
        ("0.0.0.0:9191", False),
        ("[::]:9191", False),
        (":9191", False),
        ("10.0.0.5:9191", False),
        ("authz.svc:9191", False),
    ],
)
def test_is_local(address: str, local: bool) -> None:
    assert is_local(address) is local


def test_plaintext_rules() -> None:
    check_transport("127.0.0.1:9191", mtls=False, insecure_plaintext=False)
    check_transport("0.0.0.0:9191", mtls=True, insecure_plaintext=False)
    check_transport("0.0.0.0:9191", mtls=False, insecure_plaintext=True)
    with pytest.raises(AuthzError, match=r"refusing plaintext gRPC on 0\.0\.0\.0:9191"):
        check_transport("0.0.0.0:9191", mtls=False, insecure_plaintext=False)
    with pytest.raises(AuthzError, match="contradict"):
        check_transport("0.0.0.0:9191", mtls=True, insecure_plaintext=True)


BASE = {
    "version": 1,
    "subject": {"org": {"claim": "org"}, "leaf": [{"level": "user", "claim": "sub"}]},
    "budgets": [{"name": "b", "match": {"org": "*"}, "tokens": 10, "period": "day"}],
}


def test_trust_network_is_validated_with_file_and_path() -> None:
    with pytest.raises(PolicyError, match=r"^p\.yaml:identity\.trust_network: .*\(got 'yes'\)"):
        parse_policy(
            {**BASE, "identity": {"source": "envoy_jwt_authn", "trust_network": "yes"}}, "p.yaml"
        )
    with pytest.raises(PolicyError, match="only when source is envoy_jwt_authn"):
        parse_policy(
            {**BASE, "identity": {"api_keys": [], "jwt": None, "trust_network": True}}, "p.yaml"
        )


def test_envoy_jwt_authn_needs_mtls_or_trust() -> None:
    plain = parse_policy({**BASE, "identity": {"source": "envoy_jwt_authn"}}, "p.yaml")
    trusted = parse_policy(
        {**BASE, "identity": {"source": "envoy_jwt_authn", "trust_network": True}}, "p.yaml"
    )
    with pytest.raises(PolicyError, match=r"^p\.yaml:identity\.source: envoy_jwt_authn"):
        jwt_authn_guard("p.yaml", mtls=False)(plain)
    jwt_authn_guard("p.yaml", mtls=True)(plain)
    jwt_authn_guard("p.yaml", mtls=False)(trusted)
