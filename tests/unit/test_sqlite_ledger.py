"""The embedded sqlite ledger: what survives a close, a crash, a slow or failing disk,
and a second process on the same file (the shared contract is in tests/contract/)."""

from __future__ import annotations

import asyncio
import os
import signal
import sqlite3
import subprocess
import sys
import textwrap
import threading
from pathlib import Path

import pytest
from prometheus_client import CollectorRegistry

from authz.clock import FakeClock
from authz.errors import LedgerError
from authz.ledger import Limit, Reservation, open_ledger
from authz.ledger.sqlite import SqliteLedger, parse_sqlite_url
from authz.ledger.sqlite_file import LedgerLocked
from authz.telemetry.ledger_file import LedgerFileCollector
from tests.contract.backends import ONE, lim, tok
from tests.support.service import REPO_ROOT

pytestmark = pytest.mark.unit

URL = "sqlite:///state/ledger.db"


def _open(tmp_path: Path, clock: FakeClock) -> SqliteLedger:
    ledger = open_ledger(URL, clock, state_dir=str(tmp_path))
    assert isinstance(ledger, SqliteLedger)
    return ledger


async def test_everything_survives_close_and_reopen(tmp_path: Path) -> None:
    clock = FakeClock()
    org, user = lim("org|a", 10_000, clock), lim("user|a/u", 1000, clock)
    ledger = _open(tmp_path, clock)
    deadline = clock.now() + 60
    for rid in ("settled", "open", "expires"):
        res = await ledger.reserve(rid, (org, user), tok(100), deadline=deadline,
                                   expiry_charge=tok(40))  # fmt: skip
        assert isinstance(res, Reservation)
    await ledger.settle("settled", tok(70, 5))
    assert await ledger.charge("journal-1", (org,), tok(3))
    await ledger.close()

    ledger = _open(tmp_path, clock)
    assert (await ledger.balance(org)).used == 78 and (await ledger.balance(org)).reserved == 200
    assert (await ledger.balance(user)).used == 75
    # The settled id and the charge id are remembered: settle stays idempotent.
    assert not (await ledger.settle("settled", tok(70, 5))).settled
    assert not await ledger.charge("journal-1", (org,), tok(3))
    # The open reservations came back: one settles, the other expires per its charge.
    assert (await ledger.settle("open", tok(10))).settled
    clock.advance(61)
    assert await ledger.expire(clock.now()) == 1
    await ledger.close()

    ledger = _open(tmp_path, clock)
    assert await ledger.balance(user) == (await ledger.balance(user))  # loaded once, stable
    bal = await ledger.balance(user)
    assert (bal.used, bal.reserved) == (75 + 10 + 40, 0)
    # The expired reservation is remembered: a late settle still corrects its charge.
    late = await ledger.settle("expires", tok(90))
    assert late.settled and late.late
    assert (await ledger.balance(user)).used == 75 + 10 + 90
    await ledger.close()


async def test_burst_debt_carries_over_a_restart(tmp_path: Path) -> None:
    clock = FakeClock()
    first = Limit("b|w1", "b", "org:a", 150, clock.now() + 100, ONE, nominal=100)
    ledger = _open(tmp_path, clock)
    await ledger.reserve("r", (first,), tok(130), deadline=clock.now() + 10, expiry_charge=tok(0))
    await ledger.settle("r", tok(130))
    clock.advance(101)  # the window ends; the next reserve prunes it and keeps the debt
    other = lim("x|1", 10, clock)
    await ledger.reserve("x", (other,), tok(1), deadline=clock.now() + 10, expiry_charge=tok(0))
    await ledger.close()

    ledger = _open(tmp_path, clock)
    second = Limit("b|w2", "b", "org:a", 150, clock.now() + 100, ONE, carry_from="b|w1",
                   nominal=100)  # fmt: skip
    assert (await ledger.balance(second)).used == 0  # not created yet
    await ledger.reserve("s", (second,), tok(1), deadline=clock.now() + 10, expiry_charge=tok(0))
    assert (await ledger.balance(second)).used == 30  # opened with last window's overdraft
    await ledger.close()


CRASHER = textwrap.dedent(
    """
    import asyncio, os, signal, sys
    from authz.clock import FakeClock
    from authz.ledger import open_ledger
    from tests.contract.backends import lim, tok

    async def main():
        clock = FakeClock()
        org = lim("org|a", 10_000, clock)
        ledger = open_ledger(sys.argv[1], clock, state_dir=sys.argv[2])
        await ledger.reserve("flushed", (org,), tok(100), deadline=clock.now() + 60,
                             expiry_charge=tok(100))
        await ledger.reserve("settled", (org,), tok(50), deadline=clock.now() + 60,
                             expiry_charge=tok(50))
        await ledger.settle("settled", tok(20))
        assert await ledger.flush()
        # After the last flush: what a kill -9 loses.
        await ledger.reserve("unflushed", (org,), tok(7), deadline=clock.now() + 60,
                             expiry_charge=tok(7))
        print("ready", flush=True)
        os.kill(os.getpid(), signal.SIGKILL)

    asyncio.run(main())
    """
)


async def test_reservation_open_at_a_kill_expires_after_restart_and_is_charged(
    tmp_path: Path,
) -> None:
    # A real kill -9 of a process holding the file: no close, no final flush.
    out = await asyncio.to_thread(
        subprocess.run,
        [sys.executable, "-c", CRASHER, URL, str(tmp_path)],
        cwd=REPO_ROOT, capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert out.returncode == -signal.SIGKILL, out.stderr
    assert out.stdout.strip() == "ready"
    clock = FakeClock()
    org = lim("org|a", 10_000, clock)
    ledger = _open(tmp_path, clock)  # the dead process's lock is gone with it
    bal = await ledger.balance(org)
    assert (bal.used, bal.reserved) == (20, 100)  # "unflushed" (7) is what the kill lost
    assert ledger.open_reservations == 1
    clock.advance(61)
    assert await ledger.expire(clock.now()) == 1  # the sweep after the restart
    bal = await ledger.balance(org)
    assert (bal.used, bal.reserved) == (20 + 100, 0)
    assert not (await ledger.settle("settled", tok(20))).settled
    await ledger.close()


async def test_a_second_opener_is_refused_until_the_first_closes(tmp_path: Path) -> None:
    clock = FakeClock()
    first = _open(tmp_path, clock)
    with pytest.raises(LedgerLocked) as err:
        _open(tmp_path, clock)
    assert f"pid {os.getpid()}" in str(err.value) and "redis://" in str(err.value)
    await first.close()
    second = _open(tmp_path, clock)
    await second.close()


async def test_a_failed_write_keeps_the_changes_and_retries(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    clock = FakeClock()
    org = lim("org|a", 1000, clock)
    ledger = _open(tmp_path, clock)
    real_write = ledger._file.write
    failures = [sqlite3.OperationalError("disk I/O error")]

    def flaky(rows: object, now: float) -> None:
        if failures:
            raise failures.pop()
        real_write(rows, now)  # type: ignore[arg-type]

    monkeypatch.setattr(ledger._file, "write", flaky)
    await ledger.reserve("r", (org,), tok(10), deadline=clock.now() + 60, expiry_charge=tok(0))
    await ledger.settle("r", tok(9))
    registry = CollectorRegistry()
    registry.register(LedgerFileCollector(ledger))
    assert not await ledger.flush()
    assert ledger.flush_failures == 1 and ledger.pending > 0
    assert registry.get_sample_value("authz_ledger_file_flush_failures_total") == 1
    assert registry.get_sample_value("authz_ledger_file_pending_changes") == ledger.pending
    assert await ledger.flush()
    assert ledger.pending == 0
    assert registry.get_sample_value("authz_ledger_file_pending_changes") == 0
    db = sqlite3.connect(tmp_path / "state" / "ledger.db")
    try:
        assert db.execute("SELECT used, reserved FROM counters").fetchall() == [(9, 0)]
    finally:
        db.close()
    await ledger.close()


async def test_a_slow_disk_never_blocks_checks(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    clock = FakeClock()
    org = lim("org|a", 10**9, clock)
    ledger = _open(tmp_path, clock)
    real_write = ledger._file.write

    release = threading.Event()

    def slow(rows: object, now: float) -> None:
        release.wait(60)  # on the flush thread: a write that takes until the test ends it
        real_write(rows, now)  # type: ignore[arg-type]

    monkeypatch.setattr(ledger._file, "write", slow)
    await ledger.reserve("warm", (org,), tok(1), deadline=clock.now() + 60, expiry_charge=tok(0))
    flushing = asyncio.create_task(ledger.flush())
    await asyncio.sleep(0)  # the write is now on the thread

    async def reserves() -> None:
        for i in range(200):
            res = await ledger.reserve(f"r{i}", (org,), tok(1), deadline=clock.now() + 60,
                                       expiry_charge=tok(0))  # fmt: skip
            assert isinstance(res, Reservation)
            await asyncio.sleep(0)

    try:
        # All 200 while the write is still running: none of them waits for it (if one
        # did, this would time out, the write being held until the end).
        await asyncio.wait_for(reserves(), timeout=30)
        assert not flushing.done()
    finally:
        release.set()
        await flushing
    assert await flushing
    await ledger.close()  # writes the 200 taken while the disk was slow
    ledger = _open(tmp_path, clock)
    assert (await ledger.balance(org)).reserved == 201
    await ledger.close()


def test_url_forms(tmp_path: Path) -> None:
    rel = parse_sqlite_url("sqlite:///authz-state/ledger.db", str(tmp_path))
    assert rel.path == tmp_path / "authz-state" / "ledger.db"
    assert (rel.flush_s, rel.synchronous) == (0.05, "NORMAL")
    absolute = parse_sqlite_url("sqlite:////var/lib/authz/l.db?flush_ms=100&sync=full", "/x")
    assert absolute.path == Path("/var/lib/authz/l.db")
    assert (absolute.flush_s, absolute.synchronous) == (0.1, "FULL")
    for bad, why in (
        ("sqlite://ledger.db", "expected sqlite:///"),
        ("sqlite:///", "names no file"),
        ("sqlite:///l.db?flush_ms=5", "flush_ms must be 10..1000"),
        ("sqlite:///l.db?sync=off", "sync must be normal or full"),
        ("sqlite:///l.db?cache=1", "unknown sqlite URL parameter 'cache'"),
    ):
        with pytest.raises(ValueError, match=why):
            parse_sqlite_url(bad)


def test_an_unusable_file_is_one_clear_error(tmp_path: Path) -> None:
    (tmp_path / "state").mkdir()
    (tmp_path / "state" / "ledger.db").write_bytes(b"not a database" * 100)
    with pytest.raises(LedgerError, match="cannot open: file is not a database"):
        open_ledger(URL, FakeClock(), state_dir=str(tmp_path))


def test_the_shipped_configs_default_to_the_persistent_ledger() -> None:
    import yaml

    from authz.policy.loader import load_policy

    default = "sqlite:///authz-state/ledger.db"
    assert load_policy(REPO_ROOT / "examples" / "policy.yaml").ledger_url == default
    from tests.deploy.render import render

    docs = render("base")  # k8s/base, rendered by kubectl kustomize
    cm = next(d for d in docs if d["kind"] == "ConfigMap" and d["metadata"]["name"] == "authz-policy")
    assert yaml.safe_load(cm["data"]["policy.yaml"])["ledger"]["url"] == default  # the example
    deploy = next(d for d in docs if d["kind"] == "Deployment")
    # One pod per file: one replica, and never two during a rollout.
    assert deploy["spec"]["replicas"] == 1
    assert deploy["spec"]["strategy"] == {"type": "Recreate"}
    volumes = {v["name"]: v for v in deploy["spec"]["template"]["spec"]["volumes"]}
    claim = volumes["state"]["persistentVolumeClaim"]["claimName"]
    assert any(d["kind"] == "PersistentVolumeClaim" and d["metadata"]["name"] == claim
               for d in docs)  # fmt: skip
    assert "authz-state" in (REPO_ROOT / "scripts" / "serve").read_text()
    assert "/var/lib/authz/authz-state" in (REPO_ROOT / "Dockerfile").read_text()


async def test_a_damaged_row_is_one_clear_error(tmp_path: Path) -> None:
    clock = FakeClock()
    ledger = _open(tmp_path, clock)
    await ledger.reserve("r", (lim("org|a", 100, clock),), tok(1), deadline=clock.now() + 60,
                         expiry_charge=tok(1))  # fmt: skip
    await ledger.close()
    db = sqlite3.connect(tmp_path / "state" / "ledger.db")
    try:
        with db:
            db.execute("UPDATE open SET body = '{\"limits\": [{\"key\": 1}]}'")
    finally:
        db.close()
    with pytest.raises(LedgerError, match="cannot load: KeyError"):
        _open(tmp_path, clock)
    # The failed open let go of the lock: the same error again, not LedgerLocked.
    with pytest.raises(LedgerError, match="cannot load"):
        _open(tmp_path, clock)
