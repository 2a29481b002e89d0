"""``authz budgets``, ``authz allocate`` and ``authz check-config --ledger`` against a
real service on the embedded SQLite ledger: same permissions as the API, and the
allocations survive the service (check-config reads them from beside the ledger)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.support.manage_env import ADMIN_KEY, token, write_policy
from tests.support.service import REPO_ROOT, AuthzService
from tests.support.tokens import make_rsa_key

pytestmark = pytest.mark.integration
RESEARCH = "org:acme/department:research"


def authz(*args: str, token_: str | None = None, api: str | None = None
          ) -> subprocess.CompletedProcess[str]:  # fmt: skip
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT)}
    env.pop("AUTHZ_MANAGE_TOKEN", None)
    if token_ is not None:
        env["AUTHZ_MANAGE_TOKEN"] = token_
    if api is not None:
        env["AUTHZ_MANAGE_URL"] = api
    return subprocess.run([sys.executable, "-m", "authz", *args], capture_output=True,
                          text=True, env=env, timeout=120, check=False)  # fmt: skip


def test_cli_mirrors_the_api_with_its_permissions(tmp_path: Path) -> None:
    key = make_rsa_key("manage-cli")
    policy = write_policy(tmp_path, key)
    head = token(key, "rhead", "research", ["dept-head"])
    sales = token(key, "shead", "sales", ["dept-head"])
    with AuthzService(policy, workdir=tmp_path,
                      extra_args=["--ledger", "sqlite:///ledger.db"]) as svc:  # fmt: skip
        made = authz("allocate", "--node", RESEARCH, "--budget", "dept-day", "--tokens", "300",
                     "--expires", "+2h", "--reason", "quarter end", "--json",
                     token_=head, api=svc.manage_url)  # fmt: skip
        assert made.returncode == 0, made.stderr
        alloc = json.loads(made.stdout)
        assert alloc["tokens"] == 300 and alloc["created_by"].endswith("user:rhead")
        shown = authz("budgets", "--node", RESEARCH, token_=head, api=svc.manage_url)
        assert shown.returncode == 0, shown.stderr
        line = next(x for x in shown.stdout.splitlines() if x.startswith("dept-day"))
        assert line.split()[2:4] == ["1000", "1300"]  # yaml, effective
        # The sibling's manager: refused, with the API's reason, and no data.
        for args in (("budgets", "--node", RESEARCH), ("allocate", "--withdraw", alloc["id"]),
                     ("allocate", "--node", RESEARCH, "--budget", "dept-day", "--tokens", "1",
                      "--reason", "x")):  # fmt: skip
            out = authz(*args, token_=sales, api=svc.manage_url)
            assert out.returncode == 1, (args, out.stdout)
            assert out.stderr.startswith(("authz: 403", "authz: 404")), out.stderr
            assert "1300" not in out.stdout + out.stderr
        listed = authz("allocate", "--list", token_=sales, api=svc.manage_url)
        assert listed.returncode == 0 and listed.stdout == ""
        bad = authz("allocate", "--node", RESEARCH, "--budget", "dept-day", "--tokens",
                    str(2**60), "--reason", "x", token_=ADMIN_KEY, api=svc.manage_url)
        assert bad.returncode == 1 and "422" in bad.stderr and "tokens" in bad.stderr
        assert authz("budgets", "--node", RESEARCH, api=svc.manage_url).returncode != 0
        # authz requests: a user asks, the sibling cannot decide, the manager approves.
        user = token(key, "ursula", "research")
        asked = authz("requests", "ask", "--node", RESEARCH, "--budget", "dept-day",
                      "--tokens", "100", "--reason", "launch", "--json",
                      token_=user, api=svc.manage_url)  # fmt: skip
        assert asked.returncode == 0, asked.stderr
        rid = json.loads(asked.stdout)["id"]
        out = authz("requests", "approve", rid, token_=sales, api=svc.manage_url)
        assert out.returncode == 1 and out.stderr.startswith("authz: 404"), out.stderr
        out = authz("requests", "approve", rid, "--note", "ok", token_=head, api=svc.manage_url)
        assert out.returncode == 0 and out.stdout.startswith(f"approved {rid}"), out.stderr
        listed = authz("requests", "list", token_=user, api=svc.manage_url)
        assert f"{rid}  approved" in listed.stdout
    effective = authz("check-config", str(policy), "--ledger", "sqlite:///ledger.db",
                      "--state-dir", str(tmp_path))  # fmt: skip
    assert effective.returncode == 0, effective.stderr
    assert (f"budget dept-day on {RESEARCH}: 1000 in the YAML, effective 1400"
            f" ({alloc['id']} adjust +300, req-{rid} adjust +100)") in effective.stdout
