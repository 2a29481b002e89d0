"""Shared set-up for the spine's e2e tests: a JWKS server, a policy, the real service."""

from __future__ import annotations

import time
import urllib.request
from pathlib import Path
from typing import Any

from prometheus_client.parser import text_string_to_metric_families

from tests.support.tokens import SigningKey, mint

POLICY = """
version: 1
timezone: UTC
identity:
  jwt:
    issuer: https://idp.test/
    audience: llm-gateway
    algorithms: [RS256, ES256]
    jwks_url: {jwks_url}
    leeway_s: 5
subject:
  org: {{claim: org_id}}
  department: {{claim: department, missing: skip}}
  leaf:
    - {{level: app, claim: client_id}}
    - {{level: user, claim: sub}}
budgets:
  - {{name: org-default, match: {{org: "*"}}, tokens: 1000000, period: day}}
  - {{name: org-small, match: {{org: small}}, tokens: 300, period: day}}
  - {{name: burst-org, match: {{org: burst}}, tokens: {burst_tokens}, period: day}}
  - {{name: user-daily, match: {{user: "*"}}, tokens: 1000, period: day}}
models:
  rules:
    - {{match: "gpt-*", max_output_tokens: 50}}
    - {{match: "claude-*", max_output_tokens: 50}}
  unknown: deny
"""


def write_policy(path: Path, jwks_url: str, burst_tokens: int) -> Path:
    path.write_text(POLICY.format(jwks_url=jwks_url, burst_tokens=burst_tokens))
    return path


def token(key: SigningKey, sub: str, org: str, **extra: Any) -> str:
    now = int(time.time())
    claims = {
        "iss": "https://idp.test/",
        "aud": "llm-gateway",
        "sub": sub,
        "org_id": org,
        "iat": now,
        "exp": now + 600,
        **extra,
    }
    return mint(key, claims)


def metric(http_url: str, name: str, **labels: str) -> float:
    """The value of one sample on /metrics (0 if absent)."""
    with urllib.request.urlopen(http_url + "/metrics", timeout=5) as resp:
        text = resp.read().decode()
    total = 0.0
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == name and all(sample.labels.get(k) == v for k, v in labels.items()):
                total += sample.value
    return total


def wait_metric(
    http_url: str, name: str, at_least: float, timeout: float = 5.0, **labels: str
) -> float:
    deadline = time.monotonic() + timeout
    while True:
        value = metric(http_url, name, **labels)
        if value >= at_least or time.monotonic() > deadline:
            return value
        time.sleep(0.02)
