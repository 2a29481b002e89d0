"""The Istio overlay's EnvoyFilter, applied as istiod applies it, is a config the real
Envoy accepts (``envoy --mode validate``).

Istio copies an EnvoyFilter's ``patch.value`` into the gateway's Envoy config as it is:
a field Envoy does not know, a wrong type or a bad enum is only found when the gateway
rejects the listener. So each patch is applied here to what a gateway with the
``envoyExtAuthzGrpc`` provider runs: the ``service``-mode bootstrap of
``authz envoy-config`` (its ext_authz filter stands in for the one the CUSTOM
AuthorizationPolicy adds), without its own ext_proc, with the cluster Istio generates
for the authz Service's gRPC port. A match that finds nothing is a failure too.

The Envoy Gateway overlay carries no raw Envoy config (its ``EnvoyExtensionPolicy`` and
``SecurityPolicy`` are Envoy Gateway's own API, translated by its controller): those
are held to envoy/envoy.yaml field by field (test_k8s_manifests.py) and to their CRD
schemas (test_k8s_schemas.py).
"""

from __future__ import annotations

import copy
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

from authz.cli import main
from tests.deploy.render import find, render
from tests.support.envoy_proc import envoy_binary

pytestmark = [pytest.mark.deploy, pytest.mark.e2e]

HCM = "envoy.filters.network.http_connection_manager"
ISTIO_CLUSTER = "outbound|9191||authz.authz.svc.cluster.local"


def _gateway_bootstrap(tmp_path: Path) -> dict[str, Any]:
    out = tmp_path / "gateway.yaml"
    args = ["envoy-config", "--bootstrap", "--mode", "service",
            "--address", "authz.authz.svc.cluster.local:9191", "-o", str(out)]  # fmt: skip
    assert main(args) == 0
    cfg: dict[str, Any] = yaml.safe_load(out.read_text())
    for hcm in _hcms(cfg):
        hcm["http_filters"] = [
            f for f in hcm["http_filters"] if f["name"] != "envoy.filters.http.ext_proc"
        ]
    # Istio's cluster for the Service's gRPC port: an HTTP/2 cluster like the bootstrap's.
    clusters = cfg["static_resources"]["clusters"]
    grpc = next(c for c in clusters if "http2_protocol_options" in str(c))
    clusters.append({**copy.deepcopy(grpc), "name": ISTIO_CLUSTER})
    return cfg


def _hcms(cfg: dict[str, Any]) -> list[dict[str, Any]]:
    return [
        f["typed_config"]
        for listener in cfg["static_resources"]["listeners"]
        for chain in listener["filter_chains"]
        for f in chain["filters"]
        if f["name"] == HCM
    ]


def _apply(cfg: dict[str, Any], patch: dict[str, Any]) -> int:
    """Apply one HTTP_FILTER configPatch as istiod does; how many places it matched."""
    assert patch["applyTo"] == "HTTP_FILTER", "only HTTP_FILTER patches are modelled here"
    match = patch["match"]
    assert match["context"] in ("GATEWAY", "ANY")
    chain = match["listener"]["filterChain"]["filter"]
    assert chain["name"] == HCM
    sub = chain["subFilter"]["name"]
    op, value = patch["patch"]["operation"], patch["patch"]["value"]
    assert op in ("INSERT_BEFORE", "INSERT_AFTER"), op
    hits = 0
    for hcm in _hcms(cfg):
        names = [f["name"] for f in hcm["http_filters"]]
        if sub in names:
            at = names.index(sub) + (op == "INSERT_AFTER")
            hcm["http_filters"].insert(at, copy.deepcopy(value))
            hits += 1
    return hits


def _validate(path: Path) -> None:
    done = subprocess.run(
        [envoy_binary(), "--mode", "validate", "-c", str(path), "--log-level", "warn"],
        capture_output=True, text=True, timeout=120, check=False,
    )  # fmt: skip
    assert done.returncode == 0, f"{path.read_text()}\n{done.stderr[-3000:]}"


def test_istio_envoyfilter_patches_validate_in_envoy(tmp_path: Path) -> None:
    patches = find(render("overlays/istio"), "EnvoyFilter", "authz-ext-proc")["spec"]
    cfg = _gateway_bootstrap(tmp_path)
    for patch in patches["configPatches"]:
        assert _apply(cfg, patch) == 1, patch["match"]
    order = [f["name"] for hcm in _hcms(cfg) for f in hcm["http_filters"]]
    # After ext_authz (the Check reserves), right before the router.
    assert order.index("envoy.filters.http.ext_authz") < order.index("envoy.filters.http.ext_proc")
    assert order[order.index("envoy.filters.http.ext_proc") + 1] == "envoy.filters.http.router"
    path = tmp_path / "istio-gateway.yaml"
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    _validate(path)


def test_a_wrong_field_in_the_patch_is_refused(tmp_path: Path) -> None:
    """The check has teeth: a misspelt field in the patch fails Envoy's validation."""
    patch = copy.deepcopy(
        find(render("overlays/istio"), "EnvoyFilter", "authz-ext-proc")["spec"]["configPatches"][0]
    )
    patch["patch"]["value"]["typed_config"]["processing_mode"]["response_body_mode"] = "STREAM"
    cfg = _gateway_bootstrap(tmp_path)
    assert _apply(cfg, patch) == 1
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    with pytest.raises(AssertionError, match="STREAM"):
        _validate(path)
