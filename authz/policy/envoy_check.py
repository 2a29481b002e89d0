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
        body = typed.get("with_request_body", {}).get("max_request_bytes")
        cap = policy.bounds.request_body_bytes
        if isinstance(body, int) and body > cap:
            out.append(
                f"{envoy_yaml}: ext_authz filter #{i + 1} forwards bodies up to {body} bytes but "
                f"bounds.request_body_bytes is {cap}: bigger bodies are handled as truncated "
                f"(requests.bad_body); raise bounds.request_body_bytes to {body}"
            )
    out += _buffer_warnings(policy, cfg, envoy_yaml)
    return out


def _buffer_warnings(policy: Policy, cfg: Any, envoy_yaml: Path) -> list[str]:
    """ext_proc sends a BUFFERED body up to the listener's buffer limit in one message."""
    out = []
    room = policy.bounds.grpc_max_message_bytes - 1024 * 1024  # headers, metadata
    for listener in (cfg or {}).get("static_resources", {}).get("listeners", []) or []:
        limit = listener.get("per_connection_buffer_limit_bytes", 1024 * 1024)
        if isinstance(limit, int) and limit > room:
            out.append(
                f"{envoy_yaml}: listener {listener.get('name', '?')} buffers bodies up to "
                f"{limit} bytes but bounds.grpc_max_message_bytes is "
                f"{policy.bounds.grpc_max_message_bytes}: ext_proc messages that big are "
                f"refused and their usage is never settled; raise it to {limit + 1024 * 1024}"
            )
    return out
