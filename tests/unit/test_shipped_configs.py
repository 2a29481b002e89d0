"""What we ship for operators must load: the k8s ConfigMap's policy and the example."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from authz.policy.loader import parse_policy

pytestmark = pytest.mark.unit
ROOT = Path(__file__).parent.parent.parent


def test_k8s_configmap_policy_is_valid() -> None:
    docs = list(yaml.safe_load_all((ROOT / "k8s" / "authz.yaml").read_text()))
    cm = next(d for d in docs if d["kind"] == "ConfigMap")
    policy = parse_policy(yaml.safe_load(cm["data"]["policy.yaml"]), "k8s/authz.yaml#policy.yaml")
    assert [b.name for b in policy.budgets] == ["org-monthly", "user-daily"]
    deploy = next(d for d in docs if d["kind"] == "Deployment")
    probe = deploy["spec"]["template"]["spec"]["containers"][0]["readinessProbe"]
    assert probe["httpGet"]["path"] == "/readyz"


def test_envoy_yaml_points_both_filters_at_one_authz_cluster() -> None:
    cfg = yaml.safe_load((ROOT / "envoy" / "envoy.yaml").read_text())
    listener = cfg["static_resources"]["listeners"][0]
    hcm = listener["filter_chains"][0]["filters"][0]["typed_config"]
    filters = {f["name"]: f["typed_config"] for f in hcm["http_filters"]}
    authz = filters["envoy.filters.http.ext_authz"]
    proc = filters["envoy.filters.http.ext_proc"]
    assert authz["grpc_service"]["envoy_grpc"]["cluster_name"] == "authz"
    assert proc["grpc_service"]["envoy_grpc"]["cluster_name"] == "authz"
    assert authz["with_request_body"]["pack_as_bytes"] is True
    assert authz["failure_mode_allow"] is False
