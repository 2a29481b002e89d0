"""The real ``authz serve`` on the sqlite ledger: one process per file, refused clearly
otherwise; and ``memory://`` says at start that it forgets on restart."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from tests.support.procs import HarnessError
from tests.support.service import REPO_ROOT, AuthzService

pytestmark = pytest.mark.integration

POLICY = """
version: 1
identity:
  api_keys:
    - {name: gw, sha256: "%s", claims: {org_id: acme, sub: ann}}
subject:
  org: {claim: org_id}
  leaf: [{level: user, claim: sub}]
budgets:
  - {name: user-day, match: {user: "*"}, tokens: 1000, period: day}
models:
  rules: [{match: "gpt-*", max_output_tokens: 10}]
ledger: {url: "sqlite:///authz-state/ledger.db"}
""" % ("0" * 64)


def _policy(folder: Path) -> Path:
    (folder / "policy.yaml").write_text(POLICY)
    return folder / "policy.yaml"


def test_a_second_process_on_the_same_file_is_refused(tmp_path: Path) -> None:
    first_dir, second_dir = tmp_path / "first", tmp_path / "second"
    first_dir.mkdir()
    second_dir.mkdir()
    with AuthzService(_policy(first_dir), workdir=first_dir) as first:
        # Another replica whose state dir is the same volume.
        second = AuthzService(_policy(second_dir), workdir=second_dir,
                              env={"AUTHZ_STATE_DIR": str(first_dir)})  # fmt: skip
        with pytest.raises(HarnessError):
            second.start()
        assert second.returncode == 2
        err = second.stderr_text()
        assert "Traceback" not in err
        lines = [line for line in err.splitlines() if "in use by another process" in line]
        assert lines == [
            f"authz: sqlite ledger {first_dir / 'authz-state' / 'ledger.db'} is in use by"
            f" another process (pid {first.pid}); one file serves one process: give each its"
            " own file, or use redis:// for several replicas"
        ]
        assert first.returncode is None  # the first one serves on
        assert first.http_get("/readyz")[0] == 200
        assert "authz_ledger_file_flush_failures_total 0.0" in first.metrics_text()


def test_workers_with_the_sqlite_ledger_are_refused(tmp_path: Path) -> None:
    out = subprocess.run(
        [sys.executable, "-m", "authz", "serve", "--config", str(_policy(tmp_path)),
         "--workers", "2", "--grpc-address", "127.0.0.1:19191", "--state-dir", str(tmp_path)],
        cwd=REPO_ROOT, capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert out.returncode == 2
    assert out.stderr.strip().splitlines() == [
        "authz: --workers 2 with the sqlite ledger: its file serves one process."
        " Use --workers 1, or a shared ledger (--ledger redis://...)."
    ]
    assert not (tmp_path / "authz-state").exists()  # refused before any worker opened it


def test_memory_ledger_warns_at_start_that_usage_is_lost_on_restart(tmp_path: Path) -> None:
    with AuthzService(_policy(tmp_path), workdir=tmp_path,
                      extra_args=["--ledger", "memory://"]) as svc:  # fmt: skip
        assert svc.http_get("/readyz")[0] == 200
    err = svc.stderr_text() + svc.stdout_text()
    assert "memory:// keeps usage in this process only" in err
    assert not (tmp_path / "authz-state" / "ledger.db").exists()
