"""Reservation handles (authz/handles.py) and where their key comes from (handle_keys.py)."""

from __future__ import annotations

import hmac
import os
from pathlib import Path

import pytest

from authz.envoy.convert import check_response, metadata_fields
from authz.errors import AuthzError
from authz.handle_keys import open_handle_keys, read_key_file
from authz.handles import MAC_FIELD, Handle, HandleKeys, SettleRefusal, _message, reservation_org

pytestmark = pytest.mark.unit

H = Handle(
    reservation_id="0123456789abcdef0123456789abcdef@acme",
    subject="org:acme/department:ml/user:ann",
    org="acme",
    api="openai.chat",
    model="gpt-4o",
    input_estimate=25,
    output_reserved=100,
    stream=True,
)


def test_sign_is_hmac_sha256_truncated_for_any_key_length() -> None:
    for size in (32, 64, 65, 500):  # over one SHA-256 block, HMAC hashes the key first
        keys = HandleKeys(os.urandom(size), "test")
        want = hmac.digest(keys.key, _message(H), "sha256")[:16].hex()
        assert keys.sign(H) == want
        assert keys.verify(H, want) is None


@pytest.mark.parametrize(
    "field, value",
    [
        ("subject", "org:acme/user:eve"),
        ("api", "anthropic.messages"),
        ("model", "gpt-4o-mini"),
        ("input_estimate", 26),
        ("output_reserved", 1),
        ("stream", False),
        ("reservation_id", "ffffffffffffffffffffffffffffffff@acme"),
        ("reservation_id", "local:0123456789abcdef0123456789abcdef@acme"),
    ],
)
def test_any_changed_field_is_forged(field: str, value: object) -> None:
    keys = HandleKeys.random()
    mac = keys.sign(H)
    assert keys.verify(H._replace(**{field: value}), mac) is SettleRefusal.FORGED  # type: ignore[arg-type]


def test_org_must_be_the_one_the_id_carries() -> None:
    keys = HandleKeys.random()
    evil = H._replace(org="evil", subject="org:evil/user:eve")
    # Even correctly signed (it never is: Check signs the id it made for that org).
    assert keys.verify(evil, keys.sign(evil)) is SettleRefusal.ORG_MISMATCH
    assert keys.verify(H._replace(reservation_id="no-at-sign"), keys.sign(H)) is (
        SettleRefusal.ORG_MISMATCH
    )
    assert reservation_org("local:abc@acme@x") == "acme@x"


def test_missing_foreign_and_garbage_macs() -> None:
    keys, other = HandleKeys.random(), HandleKeys.random()
    assert keys.verify(H, "") is SettleRefusal.UNSIGNED
    assert keys.verify(H, None) is SettleRefusal.UNSIGNED
    assert keys.verify(H, other.sign(H)) is SettleRefusal.FORGED
    for junk in ("é" * 32, "\ud800", "0" * 32, keys.sign(H)[:-1], keys.sign(H) + "0"):
        assert keys.verify(H, junk) is SettleRefusal.FORGED  # never a TypeError


def test_fields_cannot_shift_across_boundaries() -> None:
    keys = HandleKeys.random()
    a = H._replace(subject="org:acme/user:ab", model="c")
    b = H._replace(subject="org:acme/user:a", model="bc")
    assert keys.sign(a) != keys.sign(b)
    odd = H._replace(model="\ud800\x00|1")  # a lone surrogate from a JSON body
    assert keys.verify(odd, keys.sign(odd)) is None


def test_adopting_a_key_keeps_recent_handles_valid() -> None:
    keys = HandleKeys.random()
    first = keys.sign(H)
    assert keys.adopt(keys.key, "redis") is False and keys.source == "redis"
    new = os.urandom(32)
    assert keys.adopt(new, "redis") is True
    assert keys.sign(H) != first
    assert keys.verify(H, first) is None and keys.verify(H, keys.sign(H)) is None
    for _ in range(4):  # only a few old keys are kept
        keys.adopt(os.urandom(32), "redis")
    assert keys.verify(H, first) is SettleRefusal.FORGED


def test_short_keys_are_refused(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="at least 32 bytes"):
        HandleKeys(b"x" * 31, "test")
    short = tmp_path / "short.key"
    short.write_bytes(b"tooshort\n")
    with pytest.raises(AuthzError, match=r"short\.key: needs at least 32 bytes \(got 8\)"):
        read_key_file(str(short))
    with pytest.raises(AuthzError, match=r"missing\.key: No such file"):
        read_key_file(str(tmp_path / "missing.key"))


async def test_key_sources(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "handle.key"
    path.write_bytes(b"k" * 40 + b"\n")
    keys, refresh = await open_handle_keys(str(path), "redis://127.0.0.1:1")
    assert (keys.key, keys.source, refresh) == (b"k" * 40, "file", None)  # the file wins
    monkeypatch.setenv("AUTHZ_HANDLE_KEY_FILE", str(path))
    keys, _ = await open_handle_keys(None, "memory://")
    assert keys.source == "file"
    monkeypatch.delenv("AUTHZ_HANDLE_KEY_FILE")
    one, refresh = await open_handle_keys(None, "memory://")
    two, _ = await open_handle_keys(None, "memory://")
    assert one.source == "process" and refresh is None and one.key != two.key


async def test_sqlite_ledger_keeps_its_key_beside_the_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The embedded store survives a restart, so must the key: else a stream that
    # straddles a graceful restart is settled at its expiry charge, not its usage.
    monkeypatch.delenv("AUTHZ_HANDLE_KEY_FILE", raising=False)
    url = "sqlite:///state/ledger.db"
    (tmp_path / "state").mkdir()
    one, refresh = await open_handle_keys(None, url, str(tmp_path))
    two, _ = await open_handle_keys(None, url, str(tmp_path))
    key_file = tmp_path / "state" / "ledger.db.handle-key"
    assert refresh is None and one.source == "ledger file" and one.key == two.key
    assert key_file.stat().st_mode & 0o777 == 0o600 and len(one.key) >= 32
    other, _ = await open_handle_keys(None, "sqlite:///other.db", str(tmp_path))
    assert other.key != one.key


def test_check_response_signs_and_keeps_the_id_from_upstream() -> None:
    from authz.apis import Api
    from authz.decision import Decision, Verdict
    from authz.enforcer import CheckInput
    from authz.policy.model import Node, SubjectPath

    subject = SubjectPath((Node("org", "acme"), Node("department", "ml"), Node("user", "ann")))
    d = Decision(
        verdict=Verdict.ALLOW, subject=subject, api=Api.OPENAI_CHAT, model="gpt-4o",
        stream=True, input_estimate=25, output_reserved=100, reservation_id=H.reservation_id,
    )  # fmt: skip
    keys = HandleKeys.random()
    inp = CheckInput("POST", "/v1/chat/completions", {"x-authz-reservation": "x"}, b"{}")
    resp = check_response(d, inp, keys)
    fields = resp.dynamic_metadata.fields
    assert keys.verify(H, fields[MAC_FIELD].string_value) is None
    upstream = {h.header.key: h.header.value for h in resp.ok_response.headers}
    assert upstream == {"x-authz-subject": str(subject)}  # no reservation id upstream
    assert "x-authz-reservation" in resp.ok_response.headers_to_remove  # nor a client's
    assert MAC_FIELD not in metadata_fields(d)  # no keys: unsigned, ext_proc refuses it
