"""``pip install -e .``, as the README offers to developers, into a fresh venv: the
OTLP exporters import, ``authz --version`` answers, and the service exports spans.

The editable install is the one issue 11 found broken (xds-protos overwrote
opentelemetry-proto's modules, and only scripts/test and the Dockerfile repaired it).
Like test_clean_install.py nothing is repaired here: a new venv, a copy of the project
as an sdist holds it (so the editable finder points at the copy, not this tree), and
every command runs in isolated mode (``-I``: no PYTHONPATH, no working directory).
"""

from __future__ import annotations

import importlib.metadata
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.integration.test_clean_install import _CLASHES, InstalledAuthz, check, serve
from tests.support.otlp_receiver import OtlpReceiver

pytestmark = [pytest.mark.integration, pytest.mark.timeout(900)]

REPO = Path(__file__).resolve().parents[2]
_EXPORTERS = """
from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter as G
from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter as H
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2
from google.rpc import status_pb2
import authz.telemetry.tracing, authz.proto.external_auth_pb2
G(endpoint="http://127.0.0.1:1", insecure=True).shutdown()
H(endpoint="http://127.0.0.1:1/v1/traces").shutdown()
print(trace_service_pb2.ExportTraceServiceRequest.DESCRIPTOR.full_name, status_pb2.__name__)
"""


@pytest.fixture(scope="module")
def editable(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """(venv, the source tree it was installed from in editable mode)."""
    root = tmp_path_factory.mktemp("editable-install")
    src = root / "src"
    shutil.copytree(REPO / "authz", src / "authz", ignore=shutil.ignore_patterns("__pycache__"))
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(REPO / name, src / name)
    v = root / "v"
    subprocess.run([sys.executable, "-m", "venv", str(v)], check=True, timeout=300)
    pip = subprocess.run(
        [str(v / "bin" / "pip"), "install", "--quiet", "--no-compile",
         "--disable-pip-version-check", "-e", str(src)],
        capture_output=True, text=True, timeout=850, check=False,
    )  # fmt: skip
    assert pip.returncode == 0, pip.stdout[-2000:] + pip.stderr[-4000:]
    return v, src


def _run(venv: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([str(venv / "bin" / "python"), "-I", *args],
                          capture_output=True, text=True, timeout=120, check=False)  # fmt: skip


def test_the_package_is_the_source_tree(editable: tuple[Path, Path]) -> None:
    venv, src = editable
    where = _run(venv, "-c", "import authz; print(authz.__file__)")
    assert where.returncode == 0, where.stderr
    assert where.stdout.strip() == str(src / "authz" / "__init__.py")


def test_otlp_exporters_import_and_no_file_is_written_twice(editable: tuple[Path, Path]) -> None:
    venv, _ = editable
    done = _run(venv, "-c", _EXPORTERS)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "opentelemetry.proto.collector.trace.v1.ExportTraceServiceRequest" in done.stdout
    clashes = _run(venv, "-c", _CLASHES)
    assert clashes.returncode == 0, clashes.stderr
    assert json.loads(clashes.stdout) == {}


def test_authz_version(editable: tuple[Path, Path]) -> None:
    venv, _ = editable
    done = _run(venv, str(venv / "bin" / "authz"), "--version")
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == f"authz {importlib.metadata.version('authz')}"


def test_serve_exports_spans(editable: tuple[Path, Path], tmp_path: Path) -> None:
    venv, _ = editable
    with OtlpReceiver() as otlp:
        env = {"OTEL_EXPORTER_OTLP_ENDPOINT": otlp.endpoint, "OTEL_EXPORTER_OTLP_PROTOCOL": "grpc"}
        svc: InstalledAuthz
        with serve(venv, tmp_path, env) as svc:
            assert check(svc).status.code == 0
            span = otlp.wait_span(lambda s: s.name == "authz.check", timeout=30)
            assert span.attributes.get("authz.verdict") == "allow", span
        assert "Traceback" not in svc.stderr_tail(200), svc.stderr_tail(200)
