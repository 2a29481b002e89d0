"""What the k8s manifests promise: one replica on the file ledger unless Redis, a grace
period above the drain, the real CLI's flags, the shipped policy, rules and dashboard
reused, gateway settings that match envoy/envoy.yaml, and who may reach which port."""

from __future__ import annotations

import argparse
import json
import re
import runpy
from typing import Any

import pytest
import yaml

import authz.cli
from authz.policy.loader import load_policy
from tests.deploy.render import OVERLAYS, ROOT, find, pod_specs, render

pytestmark = pytest.mark.deploy
# Flags of issue 11 owned by another change (helper hA: the HTTP check API); dropped
# from the parse check only while this tree's CLI does not have them yet.
PENDING_FLAGS = ("--check-http-address",)


def authz_container(objs: list[dict[str, Any]]) -> dict[str, Any]:
    spec = find(objs, "Deployment", "authz")["spec"]["template"]["spec"]
    return dict(spec["containers"][0])


def drain_timeout(container: dict[str, Any]) -> float:
    flags = [a for a in container["args"] if a.startswith("--drain-timeout=")]
    assert len(flags) == 1, container["args"]
    return float(flags[0].split("=", 1)[1])


def test_base_is_one_replica_recreated_on_a_claim() -> None:
    objs = render("base")
    deploy = find(objs, "Deployment", "authz")
    assert deploy["spec"]["replicas"] == 1
    assert deploy["spec"]["strategy"] == {"type": "Recreate"}
    volumes = {v["name"]: v for v in deploy["spec"]["template"]["spec"]["volumes"]}
    assert volumes["state"]["persistentVolumeClaim"]["claimName"] == "authz-state"
    find(objs, "PersistentVolumeClaim", "authz-state")
    policy = yaml.safe_load(find(objs, "ConfigMap", "authz-policy")["data"]["policy.yaml"])
    assert policy["ledger"]["url"].startswith("sqlite:")


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_more_than_one_replica_only_with_redis(overlay: str) -> None:
    objs = render(overlay)
    deploy = find(objs, "Deployment", "authz")
    env = {e["name"]: e for e in authz_container(objs).get("env", [])}
    if overlay == "overlays/redis":
        assert deploy["spec"]["replicas"] >= 2
        assert deploy["spec"]["strategy"]["type"] == "RollingUpdate"
        assert env["AUTHZ_LEDGER_URL"]["valueFrom"]["secretKeyRef"]["name"] == "authz-ledger"
        assert not [o for o in objs if o["kind"] == "PersistentVolumeClaim"]
    else:
        assert deploy["spec"]["replicas"] == 1
        assert deploy["spec"]["strategy"]["type"] == "Recreate"
        assert "AUTHZ_LEDGER_URL" not in env


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_grace_period_covers_the_drain(overlay: str) -> None:
    """The kubelet's SIGKILL must come after preStop + the service's drain + its flush."""
    objs = render(overlay)
    spec = find(objs, "Deployment", "authz")["spec"]["template"]["spec"]
    container = authz_container(objs)
    pre_stop = container.get("lifecycle", {}).get("preStop", {}).get("sleep", {}).get("seconds", 0)
    assert spec["terminationGracePeriodSeconds"] >= pre_stop + drain_timeout(container) + 15
    if overlay == "overlays/redis":  # replicas take new requests: wait for long streams
        envoy = (ROOT / "envoy" / "envoy.yaml").read_text()
        idle = max(int(s) for s in re.findall(r"idle_timeout: (\d+)s", envoy))
        assert drain_timeout(container) >= idle


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_container_args_are_what_the_cli_takes(
    overlay: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    container = authz_container(render(overlay))
    assert container["command"] == ["authz", "serve"]
    args = list(container["args"])
    seen: list[argparse.Namespace] = []
    monkeypatch.setattr(authz.cli, "_serve", lambda ns: seen.append(ns) or 0)
    for flag in PENDING_FLAGS:
        probe = authz.cli.main  # the real parser: does it know the flag yet?
        try:
            probe(["serve", "--config", "x", f"{flag}=127.0.0.1:0"])
        except SystemExit:
            args = [a for a in args if not a.startswith(flag + "=")]
    seen.clear()
    assert authz.cli.main(["serve", *args]) == 0
    ns = seen[0]
    assert ns.config == "/etc/authz/policy.yaml"
    assert ns.grpc_address == "0.0.0.0:9191" and ns.http_address == "0.0.0.0:9192"


def test_the_image_user_is_the_dockerfiles() -> None:
    uid = re.search(r"--uid (\d+)", (ROOT / "Dockerfile").read_text())
    assert uid, "Dockerfile: useradd --uid N"
    for overlay in OVERLAYS:
        spec = find(render(overlay), "Deployment", "authz")["spec"]["template"]["spec"]
        assert spec["securityContext"]["runAsUser"] == int(uid.group(1))


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_every_pod_is_locked_down(overlay: str) -> None:
    for name, spec in pod_specs(render(overlay)):
        assert spec["securityContext"]["runAsNonRoot"] is True, name
        assert spec["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}, name
        assert spec["automountServiceAccountToken"] is False, name
        for c in spec["containers"]:
            sc = c["securityContext"]
            assert sc["readOnlyRootFilesystem"] is True, name
            assert sc["allowPrivilegeEscalation"] is False, name
            assert sc["capabilities"] == {"drop": ["ALL"]}, name
            assert "memory" in c["resources"]["limits"], name
            assert "cpu" in c["resources"]["requests"], name


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_only_the_gateway_reaches_the_decision_ports(overlay: str) -> None:
    policy = find(render(overlay), "NetworkPolicy", "authz")["spec"]
    assert policy["policyTypes"] == ["Ingress"]
    by_port: dict[int, list[dict[str, Any]]] = {}
    for rule in policy["ingress"]:
        assert rule["from"], "a rule without `from` admits everyone"
        for port in rule["ports"]:
            by_port.setdefault(port["port"], []).extend(rule["from"])
    assert set(by_port) == {9191, 9192, 9193}
    assert by_port[9191] == by_port[9193]
    prometheus = by_port[9192]
    assert prometheus != by_port[9191]
    assert prometheus[0]["podSelector"]["matchLabels"] == {"app.kubernetes.io/name": "prometheus"}


def test_the_policy_is_the_example_and_loads() -> None:
    data = find(render("base"), "ConfigMap", "authz-policy")["data"]
    text = (ROOT / "examples" / "policy.yaml").read_text()
    assert data["policy.yaml"] == text
    assert json.loads(data["jwks.json"]) == json.loads(
        (ROOT / "examples" / "dev" / "jwks.json").read_text()
    )
    raw = yaml.safe_load(text)
    assert raw["identity"]["jwt"]["jwks_file"] == "dev/jwks.json"  # the mounted item's path
    load_policy(str(ROOT / "examples" / "policy.yaml"))


def test_rules_and_dashboard_are_the_docs_files() -> None:
    objs = render("base")
    rendered = runpy.run_path(str(ROOT / "scripts" / "k8s-rules"), run_name="k8s_rules")
    on_disk = (ROOT / "k8s" / "base" / "prometheusrule.yaml").read_text()
    assert on_disk == rendered["render"](), "run scripts/k8s-rules"
    rule = find(objs, "PrometheusRule", "authz")
    docs = yaml.safe_load((ROOT / "docs" / "observability" / "prometheus-rules.yaml").read_text())
    assert rule["spec"]["groups"] == docs["groups"]
    dash = find(objs, "ConfigMap", "authz-grafana-dashboard")
    assert dash["metadata"]["labels"]["grafana_dashboard"] == "1"
    assert dash["data"]["authz.json"] == (
        ROOT / "docs" / "observability" / "grafana-dashboard.json"
    ).read_text()
    monitor = find(objs, "ServiceMonitor", "authz")["spec"]
    service = find(objs, "Service", "authz-metrics")
    assert service["metadata"]["labels"][monitor["jobLabel"]] == "authz"  # AuthzDown's job


def _envoy_ext_proc() -> dict[str, Any]:
    cfg = yaml.safe_load((ROOT / "envoy" / "envoy.yaml").read_text())
    hcm = cfg["static_resources"]["listeners"][0]["filter_chains"][0]["filters"][0]
    filters = {f["name"]: f["typed_config"] for f in hcm["typed_config"]["http_filters"]}
    return dict(filters["envoy.filters.http.ext_proc"])


def test_istio_ext_proc_is_envoy_yamls() -> None:
    objs = render("overlays/istio")
    patch = find(objs, "EnvoyFilter", "authz-ext-proc")["spec"]["configPatches"][0]
    mine = patch["patch"]["value"]["typed_config"]
    shipped = _envoy_ext_proc()
    for key in ("processing_mode", "allow_mode_override", "metadata_options",
                "response_attributes", "failure_mode_allow", "message_timeout"):  # fmt: skip
        assert mine[key] == shipped[key], key
    cluster = mine["grpc_service"]["envoy_grpc"]["cluster_name"]
    assert cluster == "outbound|9191||authz.authz.svc.cluster.local"


def test_envoy_gateway_ext_proc_is_envoy_yamls() -> None:
    spec = find(render("overlays/envoy-gateway"), "EnvoyExtensionPolicy", "authz-token-budget")
    proc = spec["spec"]["extProc"][0]
    shipped = _envoy_ext_proc()
    mode = shipped["processing_mode"]
    assert proc["processingMode"]["request"]["body"].upper() == mode["request_body_mode"]
    assert proc["processingMode"]["response"]["body"].upper() == mode["response_body_mode"]
    assert proc["processingMode"]["response"]["attributes"] == shipped["response_attributes"]
    assert proc["processingMode"]["allowModeOverride"] == shipped["allow_mode_override"]
    opts = shipped["metadata_options"]
    assert proc["metadata"]["accessibleNamespaces"] == opts["forwarding_namespaces"]["untyped"]
    assert proc["metadata"]["writableNamespaces"] == opts["receiving_namespaces"]["untyped"]
    assert proc["failOpen"] == shipped["failure_mode_allow"]


def test_istio_admits_only_the_gateway_and_runs_plaintext_behind_the_sidecar() -> None:
    objs = render("overlays/istio")
    peer = find(objs, "PeerAuthentication", "authz")["spec"]
    assert peer["mtls"] == {"mode": "STRICT"}
    allow = find(objs, "AuthorizationPolicy", "authz-gateway-only")["spec"]
    decision = [r for r in allow["rules"] if "9191" in r["to"][0]["operation"]["ports"]]
    assert len(decision) == 1 and decision[0]["from"][0]["source"]["principals"]
    custom = find(objs, "AuthorizationPolicy", "authz-token-budget")["spec"]
    assert custom["action"] == "CUSTOM" and custom["rules"] == [{}]
    container = authz_container(objs)
    env = {e["name"]: e.get("value") for e in container["env"]}
    assert env == {"AUTHZ_INSECURE_PLAINTEXT": "1"}  # no TLS files: the sidecar holds it
    assert container["readinessProbe"] == {"grpc": {"port": 9191}, "periodSeconds": 2,
                                           "failureThreshold": 2}  # fmt: skip
    mesh = yaml.safe_load((ROOT / "k8s" / "overlays" / "istio" / "mesh-config.yaml").read_text())
    provider = mesh["spec"]["meshConfig"]["extensionProviders"][0]
    assert provider["name"] == custom["provider"]["name"]
    assert provider["envoyExtAuthzGrpc"]["failOpen"] is False
