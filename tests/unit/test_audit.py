"""The audit chain, its file backend, the trail that feeds it, and ``authz audit``."""

from __future__ import annotations

import asyncio
import hashlib
import json
import subprocess
import sys
from pathlib import Path

import pytest

from authz.audit import AuditTrail, Broken, Verified, verify, verify_log
from authz.audit.chain import GENESIS, make_entry
from authz.audit.file import FileAuditLog
from authz.clock import FakeClock
from authz.decision import Decision, DenyReason, Quota, Verdict
from authz.errors import PolicyError
from authz.policy.loader import load_policy
from authz.policy.model import Node, SubjectPath
from authz.telemetry.metrics import Metrics

pytestmark = pytest.mark.unit
ROOT = Path(__file__).parent.parent.parent


def _verify_cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "authz", "audit", *args],
        capture_output=True, text=True, timeout=60, cwd=ROOT,
    )  # fmt: skip


async def _fill(path: Path, n: int = 5) -> FileAuditLog:
    log = FileAuditLog(path)
    for i in range(n):
        await log.append("budget_changed", {"budget": f"b{i}", "tokens": 100 * i}, 1000.0 + i)
    return log


def _lines(path: Path) -> list[dict[str, object]]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_entry_hash_covers_every_field_and_links_to_prev() -> None:
    first = make_entry(1, 10.0, "k", {"a": 1}, GENESIS)
    second = make_entry(2, 11.0, "k", {"a": 2}, first.hash)
    assert verify([("1", first.to_json()), ("2", second.to_json())]) == Verified(2, second.hash)
    for field, value in (("seq", 9), ("ts", 10.5), ("kind", "x"), ("data", {"a": 9})):
        obj = json.loads(first.to_json())
        obj[field] = value
        result = verify([("line 1", json.dumps(obj))])
        assert isinstance(result, Broken) and "does not match its hash" in result.problem


async def test_file_chain_appends_and_verifies(tmp_path: Path) -> None:
    log = await _fill(tmp_path / "audit.jsonl")
    result = await verify_log(log)
    entries = _lines(tmp_path / "audit.jsonl")
    assert isinstance(result, Verified) and result.count == 5
    assert result.head == entries[-1]["hash"]
    assert [e["seq"] for e in entries] == [1, 2, 3, 4, 5]
    assert entries[0]["prev"] == GENESIS
    assert all(entries[i]["prev"] == entries[i - 1]["hash"] for i in range(1, 5))


async def test_tampered_entry_is_named_by_verify(tmp_path: Path) -> None:
    path = tmp_path / "audit.jsonl"
    await _fill(path)
    lines = path.read_text().splitlines()
    entry = json.loads(lines[2])
    entry["data"]["tokens"] = 999_999  # someone raises a budget after the fact
    lines[2] = json.dumps(entry, sort_keys=True, separators=(",", ":"))
    path.write_text("\n".join(lines) + "\n")
    out = _verify_cli("verify", "--file", str(path))
    assert out.returncode == 1
    assert out.stdout.strip() == (
        "broken: entry seq=3 at line 3: its content does not match its hash (edited)"
    )


async def test_rehashed_tamper_breaks_the_next_link(tmp_path: Path) -> None:
    path = tmp_path / "audit.jsonl"
    await _fill(path)
    lines = path.read_text().splitlines()
    old = json.loads(lines[1])
    forged = make_entry(old["seq"], old["ts"], old["kind"], {"budget": "b1", "tokens": 1}, old["prev"])
    lines[1] = forged.to_json().decode()
    path.write_text("\n".join(lines) + "\n")
    result = await verify_log(FileAuditLog(path))
    assert isinstance(result, Broken) and result.seq == 3 and result.where == "line 3"
    assert "prev is not the hash of the entry before it" in result.problem


async def test_removed_entry_is_named(tmp_path: Path) -> None:
    path = tmp_path / "audit.jsonl"
    await _fill(path)
    lines = path.read_text().splitlines()
    del lines[1]
    path.write_text("\n".join(lines) + "\n")
    result = await verify_log(FileAuditLog(path))
    assert isinstance(result, Broken) and result.seq == 3 and result.where == "line 2"


async def test_two_writers_on_one_file_keep_one_chain(tmp_path: Path) -> None:
    # Two processes (--workers) each have their own FileAuditLog on the same file.
    path = tmp_path / "audit.jsonl"
    a, b = FileAuditLog(path), FileAuditLog(path)

    async def write(log: FileAuditLog, who: str) -> None:
        for i in range(20):
            await log.append("denied", {"who": who, "i": i}, 1.0)

    await asyncio.gather(write(a, "a"), write(b, "b"))
    result = await verify_log(FileAuditLog(path))
    assert isinstance(result, Verified) and result.count == 40


async def test_export_writes_json_lines_that_verify(tmp_path: Path) -> None:
    path = tmp_path / "audit.jsonl"
    await _fill(path, 3)
    out = tmp_path / "export.jsonl"
    done = _verify_cli("export", "--file", str(path), "--out", str(out))
    assert done.returncode == 0 and "exported 3 entries" in done.stderr
    assert out.read_bytes() == path.read_bytes()
    ok = _verify_cli("verify", "--file", str(out))
    assert ok.returncode == 0 and ok.stdout.startswith("ok: 3 entries, head ")


def test_verify_from_the_policy_and_without_a_source(tmp_path: Path) -> None:
    missing = _verify_cli("verify")
    assert missing.returncode == 2 and "--file PATH, --ledger URL or --config POLICY" in (
        missing.stderr
    )
    policy = ROOT / "tests" / "fixtures" / "policies" / "good_observability.yaml"
    empty = _verify_cli("verify", "--config", str(policy))  # audit.jsonl does not exist: empty
    assert empty.returncode == 0 and empty.stdout.startswith("ok: 0 entries")


# ----------------------------------------------------------------------- the trail


def _policy(tmp_path: Path, tokens: int = 1000, denials: str = "[budget_exhausted]") -> Path:
    key = hashlib.sha256(b"k").hexdigest()
    path = tmp_path / "policy.yaml"
    path.write_text(f"""
version: 1
identity:
  api_keys: [{{name: a, sha256: {key}, claims: {{org_id: acme, sub: ann}}}}]
subject:
  org: {{claim: org_id}}
  leaf: [{{level: user, claim: sub}}]
budgets:
  - {{name: user-day, match: {{user: "*"}}, tokens: {tokens}, period: day}}
audit:
  file: audit.jsonl
  denials: {denials}
""")
    return path


def _denial(reason: DenyReason) -> Decision:
    subject = SubjectPath((Node("org", "acme"), Node("user", "ann")))
    quota = Quota("user-day", "org:acme/user:ann", 1000, 3, 3600.0)
    return Decision(Verdict.DENY, 429, reason, "user-day", "no", subject, model="gpt-4o",
                    quota=quota)  # fmt: skip


async def test_trail_records_start_reloads_budget_changes_and_chosen_denials(
    tmp_path: Path,
) -> None:
    clock, metrics = FakeClock(), Metrics()
    trail = AuditTrail(load_policy(_policy(tmp_path)), "memory://", clock, metrics)
    first = hashlib.sha256((tmp_path / "policy.yaml").read_bytes()).hexdigest()
    trail.start()
    trail.started()
    trail.decided(_denial(DenyReason.BUDGET_EXHAUSTED))
    trail.decided(_denial(DenyReason.UNAUTHENTICATED))  # not in audit.denials
    trail.decided(Decision(Verdict.ALLOW))
    trail.reloaded(load_policy(_policy(tmp_path, tokens=2000)))
    trail.reload_failed(PolicyError("policy.yaml", "budgets[0].tokens", "must be ... (got -1)"))
    await trail.close()
    entries = _lines(tmp_path / "audit.jsonl")
    assert [e["kind"] for e in entries] == [
        "service_started", "denied", "policy_reloaded", "budget_changed", "policy_reload_failed",
    ]  # fmt: skip
    assert entries[0]["data"]["sha256"] == first
    assert entries[2]["data"]["sha256"] == hashlib.sha256(
        (tmp_path / "policy.yaml").read_bytes()
    ).hexdigest()
    denied = entries[1]["data"]
    assert denied == {
        "reason": "budget_exhausted", "status": 429, "detail": "user-day", "model": "gpt-4o",
        "subject": "org:acme/user:ann", "budget": "user-day", "node": "org:acme/user:ann",
        "limit": 1000, "remaining": 3,
    }  # fmt: skip
    change = entries[3]["data"]
    assert (change["budget"], change["change"]) == ("user-day", "changed")
    assert (change["before"]["tokens"], change["after"]["tokens"]) == (1000, 2000)
    assert entries[4]["data"]["error"] == "policy.yaml:budgets[0].tokens: must be ... (got -1)"
    assert entries[1]["ts"] == clock.now()
    assert isinstance(await verify_log(FileAuditLog(tmp_path / "audit.jsonl")), Verified)
    assert metrics.audit_entries.labels("denied")._value.get() == 1


async def test_full_queue_loses_entries_counted_never_blocking(tmp_path: Path) -> None:
    metrics = Metrics()
    trail = AuditTrail(load_policy(_policy(tmp_path)), "memory://", FakeClock(), metrics, 2)
    for _ in range(5):  # no writer running: the queue fills at 2
        trail.decided(_denial(DenyReason.BUDGET_EXHAUSTED))
    assert metrics.audit_failures._value.get() == 3
    await trail.close()
    assert len(_lines(tmp_path / "audit.jsonl")) == 2


async def test_memory_ledger_without_audit_file_loses_entries_with_a_reason(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    path = _policy(tmp_path)
    path.write_text(path.read_text().replace("  file: audit.jsonl\n", ""))
    metrics = Metrics()
    trail = AuditTrail(load_policy(path), "memory://", FakeClock(), metrics)
    trail.started()
    await trail.close()
    assert metrics.audit_failures._value.get() == 1
    assert "set audit.file" in caplog.text
