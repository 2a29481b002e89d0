"""A policy with management roles, signed tokens for each kind of caller, and the
management API in-process (httpx over ASGI) or against a running service."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

from authz.identity.apikeys import hash_api_key
from tests.support.tokens import SigningKey, jwks_document, mint

ADMIN_KEY = "adm-" + "k" * 40
ISSUER, AUDIENCE = "https://idp.test/", "llm-gateway"

POLICY = """
version: 1
timezone: UTC
identity:
  jwt: {{issuer: "{issuer}", audience: {audience}, algorithms: [RS256], {jwks}, leeway_s: 5}}
subject:
  org: {{claim: org_id}}
  department: {{claim: department, missing: skip}}
  leaf: [{{level: user, claim: sub}}]
budgets:
  - {{name: dept-day, match: {{org: acme, department: "*"}}, tokens: {dept_tokens}, period: day}}
  - {{name: user-day, match: {{user: "*"}}, tokens: {user_tokens}, period: day}}
models:
  rules: [{{match: "gpt-*", max_output_tokens: 50}}]
  unknown: deny
management:
  admin_keys_file: admin-keys
  roles:
    - {{role: admin, claim: roles, value: quota-admin, scope: org}}
    - {{role: manager, claim: roles, value: dept-head, scope: department, max_tokens: "50%"}}
    - {{role: approver, claim: roles, value: approver, scope: department, max_tokens: 100000}}
    - {{role: viewer, claim: roles, value: finance, scope: department}}
{extra}"""


def write_policy(workdir: Path, key: SigningKey, *, jwks_url: str | None = None,
                 dept_tokens: int = 1000, user_tokens: int = 100000, extra: str = "") -> Path:
    if jwks_url is None:
        (workdir / "jwks.json").write_text(json.dumps(jwks_document(key)))
        jwks = "jwks_file: jwks.json"
    else:
        jwks = f"jwks_url: {jwks_url}"
    (workdir / "admin-keys").write_text(f"# name sha256\nops {hash_api_key(ADMIN_KEY)}\n")
    path = workdir / "policy.yaml"
    path.write_text(POLICY.format(issuer=ISSUER, audience=AUDIENCE, jwks=jwks, extra=extra,
                                  dept_tokens=dept_tokens, user_tokens=user_tokens))
    return path


def token(key: SigningKey, sub: str, department: str | None = "research",
          roles: list[str] | None = None, org: str = "acme", **extra: Any) -> str:
    now = int(time.time())
    claims: dict[str, Any] = {"iss": ISSUER, "aud": AUDIENCE, "sub": sub, "org_id": org,
                              "iat": now, "exp": now + 600, **extra}
    if department is not None:
        claims["department"] = department
    if roles is not None:
        claims["roles"] = roles
    return mint(key, claims)


def bearer(credential: str) -> dict[str, str]:
    return {"authorization": f"Bearer {credential}"}
