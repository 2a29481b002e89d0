"""What we ship for operators must load (k8s/ is checked in tests/deploy)."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

pytestmark = pytest.mark.unit
ROOT = Path(__file__).parent.parent.parent


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
