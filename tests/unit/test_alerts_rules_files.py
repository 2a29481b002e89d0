"""The shipped Prometheus rules and Grafana dashboard name only metrics the service has."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import yaml

from authz.telemetry.metrics import METRIC_NAMES, Metrics

pytestmark = pytest.mark.unit
DOCS = Path(__file__).parent.parent.parent / "docs" / "observability"
_NAME = re.compile(r"\bauthz_[a-z_]+")


def _known(name: str) -> bool:
    for suffix in ("_bucket", "_count", "_sum"):
        if name.endswith(suffix) and name.removesuffix(suffix) in METRIC_NAMES:
            return True
    return name in METRIC_NAMES


def test_metric_catalogue_matches_the_registry() -> None:
    text = Metrics().render().decode()
    declared = {m.group(1) for m in re.finditer(r"^# TYPE (\S+) ", text, re.M)}
    # (the breaker's own counters join the registry once a Redis ledger is wired)
    assert {n for n in declared if not n.endswith("_created")} <= set(METRIC_NAMES)


def test_rules_parse_and_use_known_metrics() -> None:
    doc = yaml.safe_load((DOCS / "prometheus-rules.yaml").read_text())
    rules = [r for g in doc["groups"] for r in g["rules"]]
    assert len(rules) >= 10 and all({"alert", "expr", "labels"} <= set(r) for r in rules)
    for r in rules:
        for name in _NAME.findall(r["expr"]):
            assert _known(name), f"{r['alert']}: unknown metric {name}"


def test_dashboard_parses_and_uses_known_metrics() -> None:
    dash = json.loads((DOCS / "grafana-dashboard.json").read_text())
    exprs = [t["expr"] for p in dash["panels"] for t in p["targets"]]
    assert len(dash["panels"]) >= 10 and exprs
    used = {n for e in exprs for n in _NAME.findall(e)}
    assert all(_known(n) for n in used), sorted(n for n in used if not _known(n))
    # every metric of the catalogue is on some panel
    assert {n.removesuffix("_total") for n in METRIC_NAMES} <= {
        re.sub(r"_(bucket|count|sum|total)$", "", n) for n in used
    }
