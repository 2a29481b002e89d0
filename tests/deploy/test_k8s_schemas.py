"""Every object of every overlay against its API schema, and a security scan.

Core kinds: the Kubernetes OpenAPI schemas that kubernetes-validate ships (1.37,
strict: unknown fields fail, as `kubectl apply --validate=strict` does). Custom
resources: their projects' own schemas, from the pinned @kubernetes-models npm packages
(tests/deploy/crd_models.py: JSON-schema validation, and unknown fields found by
TypeScript's excess-property check); IstioOperator's meshConfig, which no CRD
describes, against tests/fixtures/k8s/meshconfig-excerpt.yaml. The scan is checkov
(its own venv, .venv-checkov, made by scripts/test): every finding fails the test
unless it is accepted below, with its reason.
"""

from __future__ import annotations

import copy
import json
import os
import subprocess
from functools import cache
from pathlib import Path
from typing import Any

import jsonschema
import kubernetes_validate
import pytest
import yaml

from tests.deploy.crd_models import OPEN_SPEC, schema_errors, type_errors
from tests.deploy.render import K8S, OVERLAYS, ROOT, find, render, render_text

pytestmark = pytest.mark.deploy
K8S_VERSION = "1.37.0"
MESH_EXCERPT = ROOT / "tests" / "fixtures" / "k8s" / "meshconfig-excerpt.yaml"
CHECKOV = ROOT / ".venv-checkov" / "bin" / "checkov"
MESH_CONFIG = K8S / "overlays" / "istio" / "mesh-config.yaml"

# Findings we accept, and why. Anything else checkov reports fails the test.
ACCEPTED = {
    "CKV_K8S_11": "no CPU limit on purpose: CFS throttling turns 1 ms answers into"
    " hundreds of ms, i.e. 503s from Envoy (issue 10); a CPU request is set",
    "CKV_K8S_15": "imagePullPolicy IfNotPresent: the image is pinned by tag (or digest"
    " with `kustomize edit set image`); Always breaks images loaded into kind/minikube",
    "CKV_K8S_43": "image by tag, not digest: the digest is the deployer's (docs/deploy/"
    "kubernetes.md shows `kustomize edit set image authz=...@sha256:...`)",
    "CKV_K8S_35": "secrets in env: the service takes its ledger URL from AUTHZ_LEDGER_URL"
    " (twelve-factor) and redis-server its password from --requirepass; both only in"
    " overlays/redis, both from a Secret, neither logged",
}


def is_core(obj: dict[str, Any]) -> bool:
    try:
        kubernetes_validate.validate(obj, K8S_VERSION, strict=True)
    except kubernetes_validate.SchemaNotFoundError:
        return False
    return True


def custom_errors(objs: list[dict[str, Any]], workdir: Path) -> list[list[str]]:
    """What the projects' schemas say is wrong with each custom resource ([]: valid)."""
    found = schema_errors(objs)
    typed = [i for i, o in enumerate(objs) if f"{o['apiVersion']}/{o['kind']}" not in OPEN_SPEC]
    for i, errors in zip(typed, type_errors([objs[i] for i in typed], workdir), strict=True):
        found[i] += errors
    for i, obj in enumerate(objs):
        if obj["kind"] == "IstioOperator":
            found[i] += mesh_errors(obj)
    return found


@cache
def _mesh_schema() -> dict[str, Any]:
    return dict(yaml.safe_load(MESH_EXCERPT.read_text()))


def mesh_errors(obj: dict[str, Any]) -> list[str]:
    validator = jsonschema.Draft202012Validator(_mesh_schema())
    return [e.message for e in validator.iter_errors(obj.get("spec", {}))]


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_every_core_object_matches_its_schema(overlay: str) -> None:
    objs = render(overlay)
    assert objs
    core = [o for o in objs if is_core(o)]  # each core kind validated, strictly
    assert core


def _custom_resources() -> list[dict[str, Any]]:
    seen: dict[str, dict[str, Any]] = {}
    for overlay in OVERLAYS:
        for obj in render(overlay):
            if not is_core(obj):
                seen.setdefault(json.dumps(obj, sort_keys=True), obj)
    seen["mesh"] = yaml.safe_load(MESH_CONFIG.read_text())
    return list(seen.values())


def test_every_custom_resource_matches_its_projects_schema(tmp_path: Path) -> None:
    objs = _custom_resources()
    kinds = {f"{o['apiVersion']}/{o['kind']}" for o in objs}
    assert {"networking.istio.io/v1alpha3/EnvoyFilter", "security.istio.io/v1/AuthorizationPolicy",
            "gateway.envoyproxy.io/v1alpha1/EnvoyExtensionPolicy",
            "gateway.envoyproxy.io/v1alpha1/SecurityPolicy",
            "monitoring.coreos.com/v1/ServiceMonitor"} <= kinds  # fmt: skip
    bad = {f"{o['kind']}/{o['metadata']['name']}": e
           for o, e in zip(objs, custom_errors(objs, tmp_path), strict=True) if e}  # fmt: skip
    assert not bad, json.dumps(bad, indent=1)


def _broken() -> list[tuple[str, dict[str, Any]]]:
    """One mistake each: a misspelt field, a wrong enum, a missing required field."""
    istio, eg = render("overlays/istio"), render("overlays/envoy-gateway")
    out = []
    ext = copy.deepcopy(find(eg, "EnvoyExtensionPolicy", "authz-token-budget"))
    ext["spec"]["extProc"][0]["failopen"] = True
    out.append(("misspelt extProc field", ext))
    ext = copy.deepcopy(find(eg, "EnvoyExtensionPolicy", "authz-token-budget"))
    ext["spec"]["extProc"][0]["processingMode"]["response"]["body"] = "STREAMED"
    out.append(("processing mode enum", ext))
    sec = copy.deepcopy(find(eg, "SecurityPolicy", "authz-token-budget"))
    sec["spec"]["extAuth"]["grpc"]["backendRefs"][0]["prot"] = 9191
    out.append(("misspelt backendRef field", sec))
    flt = copy.deepcopy(find(istio, "EnvoyFilter", "authz-ext-proc"))
    flt["spec"]["configPatches"][0]["patch"]["operation"] = "INSERT_BEFOR"
    out.append(("EnvoyFilter operation enum", flt))
    flt = copy.deepcopy(find(istio, "EnvoyFilter", "authz-ext-proc"))
    flt["spec"]["configPatches"][0]["match"]["listener"]["filterchain"] = {}
    out.append(("EnvoyFilter misspelt match field", flt))
    pol = copy.deepcopy(find(istio, "AuthorizationPolicy", "authz-token-budget"))
    pol["spec"]["action"] = "CUSTOMISED"
    out.append(("AuthorizationPolicy action enum", pol))
    mon = copy.deepcopy(find(render("base"), "ServiceMonitor", "authz"))
    mon["spec"]["endpoints"][0]["intervall"] = "30s"
    out.append(("ServiceMonitor misspelt endpoint field", mon))
    mesh = yaml.safe_load(MESH_CONFIG.read_text())
    mesh["spec"]["meshConfig"]["extensionProviders"][0]["envoyExtAuthzGrpc"]["failopen"] = False
    out.append(("meshConfig misspelt field", mesh))
    return out


def test_the_schemas_catch_a_misspelt_field(tmp_path: Path) -> None:
    """The check is strict: a field in the wrong place fails, core kind or CRD."""
    deploy = copy.deepcopy(find(render("base"), "Deployment", "authz"))
    deploy["spec"]["template"]["spec"]["containers"][0]["imagePullPolcy"] = "Always"
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(deploy, K8S_VERSION, strict=True)
    broken = _broken()
    errors = custom_errors([obj for _, obj in broken], tmp_path)
    missed = [what for (what, _), e in zip(broken, errors, strict=True) if not e]
    assert not missed, missed


def checkov_findings(folder: Path) -> list[dict[str, Any]]:
    assert CHECKOV.exists(), f"{CHECKOV} missing: scripts/test makes it (pip install checkov)"
    env = {**os.environ, "BC_SKIP_MAPPING": "TRUE"}
    done = subprocess.run(
        [str(CHECKOV), "-d", str(folder), "--framework", "kubernetes", "--quiet", "--compact",
         "--skip-download", "-o", "json"],
        capture_output=True, text=True, timeout=300, check=False, env=env,
    )  # fmt: skip
    assert done.returncode in (0, 1), done.stderr[-2000:]
    reports = json.loads(done.stdout)
    reports = reports if isinstance(reports, list) else [reports]
    assert any(r["summary"]["passed"] for r in reports), "checkov checked nothing"
    return [f for r in reports for f in r["results"]["failed_checks"]]


def test_checkov_finds_nothing_we_have_not_accepted(tmp_path: Path) -> None:
    for overlay in OVERLAYS:
        (tmp_path / f"{overlay.replace('/', '-')}.yaml").write_text(render_text(overlay))
    findings = checkov_findings(tmp_path)
    left = sorted(
        {f"{f['check_id']} {f['check_name']} ({f['resource']})" for f in findings
         if f["check_id"] not in ACCEPTED}
    )  # fmt: skip
    assert not left, "\n".join(left)
