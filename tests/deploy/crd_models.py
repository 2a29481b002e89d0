"""The custom resources of k8s/ against their projects' own schemas, not hand-written ones.

The schemas come from the ``@kubernetes-models`` npm packages, pinned in
``tests/deploy/crd/package.json`` (and its lock) and installed by ``scripts/crd-models``
(``scripts/test`` runs it): Istio's from its CRD files (Istio 1.29), Envoy Gateway's,
Gateway API's, cert-manager's and prometheus-operator's from their Go API types (what
their CRDs are generated from). Each package has, for every kind,

- a JSON-schema validator (types, enums, patterns, required fields, bounds), run by
  ``crd/validate.mjs`` under node;
- a TypeScript interface of the same schema. A CRD's OpenAPI schema does not close its
  objects (the API server prunes unknown fields, or refuses them with
  ``kubectl apply --validate=strict``), so unknown fields are found the way TypeScript
  finds them: each object, as an object literal typed with its kind's interface, must
  pass ``tsc --noEmit`` (an excess property at any depth is an error).

Missing node, npm packages or tsc is a failure with the command to run, never a skip.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

__all__ = ["CRD_DIR", "OPEN_SPEC", "schema_errors", "type_errors"]

CRD_DIR = Path(__file__).resolve().parent / "crd"
_MODULES = CRD_DIR / "node_modules"
_PACKAGES = {
    "networking.istio.io": "@kubernetes-models/istio",
    "security.istio.io": "@kubernetes-models/istio",
    "install.istio.io": "@kubernetes-models/istio",
    "gateway.envoyproxy.io": "@kubernetes-models/envoy-gateway",
    "gateway.networking.k8s.io": "@kubernetes-models/gateway-api",
    "monitoring.coreos.com": "@kubernetes-models/prometheus-operator",
    "cert-manager.io": "@kubernetes-models/cert-manager",
}
# Kinds whose CRD keeps the whole spec as it is (x-kubernetes-preserve-unknown-fields):
# no schema to hold it to (IstioOperator: its meshConfig is istio.io/api's MeshConfig).
OPEN_SPEC = frozenset({"install.istio.io/v1alpha1/IstioOperator"})


def _node() -> str:
    node = shutil.which("node")
    assert node, "node is missing: scripts/apt-deps installs nodejs and npm (as root)"
    missing = [p for p in set(_PACKAGES.values()) if not (_MODULES / p / "package.json").exists()]
    assert not missing, f"{', '.join(sorted(missing))} not installed: run scripts/crd-models"
    return node


def schema_errors(objs: list[dict[str, Any]]) -> list[list[str]]:
    """For each object, what its kind's JSON schema says is wrong with it ([]: valid)."""
    done = subprocess.run(
        [_node(), str(CRD_DIR / "validate.mjs")], input=json.dumps(objs), cwd=CRD_DIR,
        capture_output=True, text=True, timeout=300, check=False,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    out = []
    for obj, res in zip(objs, json.loads(done.stdout), strict=True):
        if "missing" in res:
            out.append([f"no schema for {obj['apiVersion']}/{obj['kind']}: {res['missing']}"])
        else:
            out.append([] if res["ok"] else list(res["errors"]))
    return out


def type_errors(objs: list[dict[str, Any]], workdir: Path) -> list[list[str]]:
    """For each object, the fields its kind's type does not have (or has otherwise)."""
    tsc = _MODULES / "typescript" / "bin" / "tsc"
    assert tsc.exists(), "typescript not installed: run scripts/crd-models"
    lines = []
    for i, obj in enumerate(objs):
        group, version = obj["apiVersion"].split("/")
        module = f"{_PACKAGES[group]}/{group}/{version}/{obj['kind']}"
        lines.append(f'import type {{ I{obj["kind"]} as T{i} }} from "{module}";')
    first = len(lines) + 1
    lines += [f"export const o{i}: T{i} = {json.dumps(obj)};" for i, obj in enumerate(objs)]
    (workdir / "objects.ts").write_text("\n".join(lines) + "\n")
    link = workdir / "node_modules"
    if not link.exists():
        os.symlink(_MODULES, link)
    done = subprocess.run(
        [_node(), str(tsc), "--noEmit", "--strict", "--skipLibCheck", "--module", "nodenext",
         "--moduleResolution", "nodenext", "--target", "es2022", "--pretty", "false",
         "objects.ts"],
        cwd=workdir, capture_output=True, text=True, timeout=600, check=False,
    )  # fmt: skip
    out: list[list[str]] = [[] for _ in objs]
    for m in re.finditer(r"^objects\.ts\((\d+),\d+\): error (.*)$", done.stdout, re.M):
        row = int(m.group(1)) - first
        assert 0 <= row < len(objs), done.stdout[-3000:]  # an import that did not resolve
        out[row].append(m.group(2))
    assert done.returncode == 0 or any(out), done.stdout[-3000:] + done.stderr[-2000:]
    return out
