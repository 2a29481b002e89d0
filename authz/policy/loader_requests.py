"""Validation of ``requests.unmetered``: what may pass without a charge.

Same rules as :mod:`authz.policy.loader` (whose reader ``r`` is passed in): unknown
keys are errors, and every error names ``file:path`` and the bad value.

Before, ``requests.other_paths: allow`` (the default, and the example's setting) let
every path the service did not recognise through free, which included spellings of a
metered path the upstream still served, and metered APIs the service does not know
(images, audio, batches). Now nothing passes free unless it is listed:

    requests:
      unmetered: ["GET /v1/models", "GET /v1/models/*"]   # the default

``other_paths: allow`` is refused at load with a message naming ``unmetered``: keeping
it working would keep the hole open in every policy copied from the old example.
``other_paths: deny`` still loads and means what it meant (nothing passes free) unless
``unmetered`` is also given.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from authz.apis import METERED_PATHS
from authz.paths import PathRule, parse_path_rule, readings
from authz.policy.loader_admission import Reader
from authz.policy.model import RequestPolicy

__all__ = ["parse_unmetered"]


def _rule(r: Reader, raw: Any, p: str) -> PathRule:
    if not isinstance(raw, str):
        r.fail(p, 'must be a string "METHOD /path", e.g. "GET /v1/models"', raw)
    rule = parse_path_rule(raw)
    if isinstance(rule, str):
        r.fail(p, rule, raw)
    if rule.method == "POST":
        # A POST to a metered API is always metered (authz.apis.route): say so now
        # rather than leave a rule that silently never applies.
        for path in METERED_PATHS.values():
            if any(rule.matches("POST", s) for s in readings(path)):
                r.fail(p, f"would free {path}: a POST to a metered API is always metered", raw)
    return rule


def parse_unmetered(r: Reader, m: Mapping[str, Any]) -> tuple[PathRule, ...]:
    """``requests.unmetered`` (and the retired ``other_paths``) as path rules."""
    if "other_paths" in m:
        old = m["other_paths"]
        if old == "allow":
            r.fail(
                "requests.other_paths",
                "allow is no longer supported (it let unrecognised paths, including metered"
                " APIs, through free); list what may pass free in requests.unmetered,"
                ' e.g. ["GET /v1/models", "GET /v1/models/*"]',
                old,
            )
        if old != "deny":
            r.fail("requests.other_paths", "must be deny (retired: use requests.unmetered)", old)
        if "unmetered" not in m:
            return ()  # what deny always meant: nothing passes free
    if "unmetered" not in m:
        return RequestPolicy().unmetered  # the default: listing models
    raw = m["unmetered"]
    if not isinstance(raw, list):
        r.fail("requests.unmetered", 'must be a list of "METHOD /path" strings', raw)
    return tuple(_rule(r, v, f"requests.unmetered[{i}]") for i, v in enumerate(raw))
