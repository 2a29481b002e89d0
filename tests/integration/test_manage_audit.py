"""Every management step lands in the hash-chained audit trail (who, what, why, the
amount before and after), through the real service, and ``authz audit verify`` holds."""

from __future__ import annotations

import json
from pathlib import Path

import httpx
import pytest

from tests.integration.test_manage_cli import authz
from tests.support.manage_env import ADMIN_KEY, bearer, token, write_policy
from tests.support.service import AuthzService
from tests.support.tokens import make_rsa_key

pytestmark = pytest.mark.integration
RESEARCH = "org:acme/department:research"


def test_requests_approvals_and_allocations_are_in_the_chain(tmp_path: Path) -> None:
    key = make_rsa_key("manage-audit")
    policy = write_policy(tmp_path, key, extra="audit: {file: audit.jsonl}\n")
    user = bearer(token(key, "ursula", "research"))
    approver = bearer(token(key, "rita", "research", ["approver"]))
    with AuthzService(policy, workdir=tmp_path) as svc, httpx.Client(
        base_url=svc.manage_url, timeout=20
    ) as api:
        req = api.post("/v1/requests", headers=user, json={
            "node": RESEARCH, "budget": "dept-day", "tokens": 250, "reason": "launch"}).json()
        ok = api.post(f"/v1/requests/{req['id']}/approve", headers=approver,
                      json={"note": "approved for launch"})  # fmt: skip
        assert ok.status_code == 200, ok.text
        frozen = api.post("/v1/allocations", headers=bearer(ADMIN_KEY), json={
            "kind": "freeze", "node": RESEARCH, "reason": "incident 9"}).json()
        assert api.delete(f"/v1/allocations/{frozen['id']}",
                          headers=bearer(ADMIN_KEY)).status_code == 204  # fmt: skip
    verified = authz("audit", "verify", "--file", str(tmp_path / "audit.jsonl"))
    assert verified.returncode == 0 and verified.stdout.startswith("ok: "), verified.stdout
    entries = [json.loads(line) for line in (tmp_path / "audit.jsonl").read_text().splitlines()]
    by_kind = {e["kind"]: e["data"] for e in entries}
    assert by_kind["quota_requested"]["who"] == f"jwt:{RESEARCH}/user:ursula"
    assert by_kind["quota_requested"]["why"] == "launch"
    approved = by_kind["request_approved"]
    assert approved["who"] == f"jwt:{RESEARCH}/user:rita"
    assert (approved["before"], approved["after"]) == (1000, 1250)
    assert approved["why"] == "approved for launch"
    assert by_kind["allocation_created"]["who"] == "key:ops"
    assert (by_kind["allocation_created"]["before"], by_kind["allocation_created"]["after"]
            ) == (False, True)  # fmt: skip
    assert (by_kind["allocation_withdrawn"]["before"], by_kind["allocation_withdrawn"]["after"]
            ) == (True, False)  # fmt: skip
