"""Every object of every overlay against its API schema, and a security scan.

Core kinds: the Kubernetes OpenAPI schemas that kubernetes-validate ships (1.37,
strict: unknown fields fail, as `kubectl apply --validate=strict` does). Custom
resources: the CRD excerpts in tests/fixtures/k8s/crd-schemas.yaml. The scan is
checkov (its own venv, .venv-checkov, made by scripts/test): every finding fails the
test unless it is accepted below, with its reason.
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

from tests.deploy.render import K8S, OVERLAYS, ROOT, find, render, render_text

pytestmark = pytest.mark.deploy
K8S_VERSION = "1.37.0"
CRDS = ROOT / "tests" / "fixtures" / "k8s" / "crd-schemas.yaml"
CHECKOV = ROOT / ".venv-checkov" / "bin" / "checkov"

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


@cache
def crd_schemas() -> dict[str, Any]:
    return dict(yaml.safe_load(CRDS.read_text()))


def validate_custom(obj: dict[str, Any]) -> None:
    doc = crd_schemas()
    key = f"{obj['apiVersion']}/{obj['kind']}"
    assert key in doc["kinds"], f"no schema for {key}: add its excerpt to {CRDS.name}"
    assert set(obj) <= {"apiVersion", "kind", "metadata", "spec"}, sorted(obj)
    assert isinstance(obj["metadata"].get("name"), str)
    schema = {"$defs": doc["$defs"], **doc["kinds"][key]}
    jsonschema.validate(obj.get("spec", {}), schema, cls=jsonschema.Draft202012Validator)


def validate(obj: dict[str, Any]) -> None:
    try:
        kubernetes_validate.validate(obj, K8S_VERSION, strict=True)
    except kubernetes_validate.SchemaNotFoundError:
        validate_custom(obj)


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_every_object_matches_its_schema(overlay: str) -> None:
    objs = render(overlay)
    assert objs
    for obj in objs:
        validate(obj)


def test_istio_mesh_config_matches_its_schema() -> None:
    validate_custom(yaml.safe_load((K8S / "overlays" / "istio" / "mesh-config.yaml").read_text()))


def test_the_schemas_catch_a_misspelt_field() -> None:
    """The check is strict: a field in the wrong place fails, core kind or CRD."""
    deploy = copy.deepcopy(find(render("base"), "Deployment", "authz"))
    deploy["spec"]["template"]["spec"]["containers"][0]["imagePullPolcy"] = "Always"
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(deploy, K8S_VERSION, strict=True)
    objs = render("overlays/istio")
    policy = copy.deepcopy(find(objs, "AuthorizationPolicy", "authz-token-budget"))
    del policy["spec"]["provider"]  # CUSTOM without its provider
    with pytest.raises(jsonschema.ValidationError):
        validate_custom(policy)
    ext = copy.deepcopy(find(render("overlays/envoy-gateway"), "EnvoyExtensionPolicy", "authz-token-budget"))
    ext["spec"]["extProc"][0]["processingMode"]["response"]["body"] = "STREAMED"
    with pytest.raises(jsonschema.ValidationError):
        validate_custom(ext)


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
