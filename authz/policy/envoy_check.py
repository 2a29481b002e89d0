"""Offline cross-checks between a policy and an Envoy bootstrap (``check-config --envoy``)."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import yaml

from authz.policy.model import Policy

__all__ = ["envoy_warnings"]

_EXT_AUTHZ = "envoy.filters.http.ext_authz"


def _duration_s(value: Any) -> float | None:
    if isinstance(value, int | float):
        return float(value)
    m = re.fullmatch(r"(\d+(?:\.\d+)?)s", str(value).strip())
    return float(m.group(1)) if m else None


def _walk(node: Any) -> list[dict[str, Any]]:
    """Every ext_authz filter config anywhere in the bootstrap (listeners, per route...)."""
    found: list[dict[str, Any]] = []
    if isinstance(node, dict):
        if node.get("name") == _EXT_AUTHZ and isinstance(node.get("typed_config"), dict):
            found.append(node["typed_config"])
        for value in node.values():
            found.extend(_walk(value))
    elif isinstance(node, list):
        for item in node:
            found.extend(_walk(item))
    return found


def envoy_warnings(policy: Policy, envoy_yaml: Path) -> list[str]:
    """Settings that make the policy misbehave behind this Envoy."""
    cfg = yaml.safe_load(envoy_yaml.read_text())
    out = []
    for i, typed in enumerate(_walk(cfg)):
        timeout = _duration_s(typed.get("grpc_service", {}).get("timeout", "0.2s"))
        wait = policy.queue.max_wait_s
        if timeout is not None and wait > 0 and timeout <= wait:
            out.append(
                f"{envoy_yaml}: ext_authz filter #{i + 1} times out after {timeout:g}s but "
                f"queue.max_wait_s is {wait:g}s: queued checks will get Envoy's status_on_error "
                f"instead of a 429; set grpc_service.timeout above {wait:g}s"
            )
    return out
