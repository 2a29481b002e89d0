"""A plain ``pip install .`` into a fresh venv gives a working service, OTLP included.

    python -m venv v && v/bin/pip install . && OTEL_EXPORTER_OTLP_ENDPOINT=... v/bin/authz serve

Until authz/proto replaced xds-protos, this left the OTLP exporters broken: xds-protos
writes its own copies of opentelemetry-proto's and googleapis-common-protos' modules
into the same folders, and whichever wheel pip unpacked last won (scripts/test and the
Dockerfile reinstalled opentelemetry-proto to repair it). Here nothing is repaired: the
venv is new, the project is copied as an sdist holds it, and the service runs from the
venv in isolated mode (``-I``: no PYTHONPATH, not the working tree).

The venv is built once per run (pip's download and wheel cache make it ~1 min).
"""

from __future__ import annotations

import hashlib
import json
import shutil
import subprocess
import sys
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import grpc
import pytest
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2

from authz.proto import attribute_context_pb2, external_auth_pb2, external_auth_pb2_grpc
from tests.support.otlp_receiver import OtlpReceiver
from tests.support.procs import wait_until
from tests.support.service import AuthzService

pytestmark = [pytest.mark.integration, pytest.mark.timeout(900)]

REPO = Path(__file__).resolve().parents[2]
KEY = "sk-clean-install"
POLICY = f"""
version: 1
timezone: UTC
identity:
  api_keys:
    - {{name: ci, sha256: {hashlib.sha256(KEY.encode()).hexdigest()}, claims: {{org_id: acme, sub: ann}}}}
subject:
  org: {{claim: org_id}}
  leaf: [{{level: user, claim: sub}}]
budgets:
  - {{name: user-day, match: {{user: "*"}}, tokens: 100000, period: day}}
models:
  rules: [{{match: "gpt-*", max_output_tokens: 10}}]
"""
# Which files each installed distribution wrote, and every path two of them wrote.
_CLASHES = """
import collections, importlib.metadata as md, json
owners = collections.defaultdict(set)
for dist in md.distributions():
    for f in dist.files or ():
        if "__pycache__" in f.parts or ".dist-info" in str(f) or f.suffix == ".pyc":
            continue
        owners[str(f)].add(dist.metadata["Name"])
print(json.dumps({p: sorted(o) for p, o in owners.items() if len(o) > 1}))
"""


@pytest.fixture(scope="module")
def venv(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("clean-install")
    src = root / "src"
    shutil.copytree(REPO / "authz", src / "authz", ignore=shutil.ignore_patterns("__pycache__"))
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(REPO / name, src / name)
    v = root / "v"
    subprocess.run([sys.executable, "-m", "venv", str(v)], check=True, timeout=300)
    pip = subprocess.run(
        # --no-compile: the same install, without byte-compiling every module (minutes here).
        [str(v / "bin" / "pip"), "install", "--quiet", "--no-compile", "--disable-pip-version-check", str(src)],
        capture_output=True, text=True, timeout=850, check=False,
    )  # fmt: skip
    assert pip.returncode == 0, pip.stdout[-2000:] + pip.stderr[-4000:]
    where = subprocess.run([str(v / "bin" / "python"), "-I", "-c", "import authz; print(authz.__file__)"],
                           capture_output=True, text=True, check=True, timeout=120)  # fmt: skip
    assert where.stdout.startswith(str(v)), where.stdout  # the installed copy, not the tree
    return v


class InstalledAuthz(AuthzService):
    """The venv's ``authz`` entry point, isolated from the working tree."""

    def __init__(self, venv: Path, config: Path, env: dict[str, str]) -> None:
        super().__init__(config, workdir=config.parent, env=env)
        self.venv = venv

    def command(self) -> list[str]:
        return [
            str(self.venv / "bin" / "python"), "-I", str(self.venv / "bin" / "authz"), "serve",
            "--config", str(self.config),
            "--grpc-address", self.grpc_address,
            "--http-address", f"127.0.0.1:{self.http_port}",
        ]  # fmt: skip


class HttpTraces:
    """An OTLP/HTTP (protobuf) trace receiver on loopback: the span names it got."""

    def __init__(self) -> None:
        self.names: list[str] = []
        names = self.names

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers["content-length"]))
                if self.path == "/v1/traces":  # metrics and logs come here too
                    req = trace_service_pb2.ExportTraceServiceRequest.FromString(body)
                    names.extend(s.name for rs in req.resource_spans for ss in rs.scope_spans
                                 for s in ss.spans)  # fmt: skip
                self.send_response(200)
                self.send_header("content-length", "0")
                self.end_headers()

            def log_message(self, *args: object) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.endpoint = f"http://127.0.0.1:{self.server.server_address[1]}"


@pytest.fixture
def http_traces() -> Iterator[HttpTraces]:
    h = HttpTraces()
    h.thread.start()
    yield h
    h.server.shutdown()
    h.server.server_close()


def check(svc: AuthzService) -> external_auth_pb2.CheckResponse:
    body = json.dumps({"model": "gpt-4o", "max_tokens": 5, "messages": [{"role": "user", "content": "hi"}]})
    http = attribute_context_pb2.AttributeContext.HttpRequest(
        method="POST", path="/v1/chat/completions", body=body,
        headers={"authorization": f"Bearer {KEY}", "content-type": "application/json"},
    )  # fmt: skip
    req = external_auth_pb2.CheckRequest(
        attributes=attribute_context_pb2.AttributeContext(
            request=attribute_context_pb2.AttributeContext.Request(http=http)
        )
    )
    with grpc.insecure_channel(svc.grpc_address) as channel:
        answer: external_auth_pb2.CheckResponse = external_auth_pb2_grpc.AuthorizationStub(
            channel
        ).Check(req, timeout=30)
        return answer


def serve(venv: Path, tmp_path: Path, env: dict[str, str]) -> InstalledAuthz:
    (tmp_path / "policy.yaml").write_text(POLICY)
    env = {"OTEL_BSP_SCHEDULE_DELAY": "100", "OTEL_SERVICE_NAME": "authz", **env}
    return InstalledAuthz(venv, tmp_path / "policy.yaml", env)


def test_no_two_installed_packages_write_the_same_file(venv: Path) -> None:
    out = subprocess.run([str(venv / "bin" / "python"), "-I", "-c", _CLASHES],
                         capture_output=True, text=True, check=True, timeout=120)  # fmt: skip
    assert json.loads(out.stdout) == {}


def test_serve_exports_spans_over_otlp_grpc(venv: Path, tmp_path: Path) -> None:
    with OtlpReceiver() as otlp:
        env = {"OTEL_EXPORTER_OTLP_ENDPOINT": otlp.endpoint, "OTEL_EXPORTER_OTLP_PROTOCOL": "grpc"}
        with serve(venv, tmp_path, env) as svc:
            assert check(svc).status.code == 0
            span = otlp.wait_span(lambda s: s.name == "authz.check", timeout=30)
            assert span.attributes.get("authz.verdict") == "allow", span
        assert "Traceback" not in svc.stderr_tail(200), svc.stderr_tail(200)


def test_serve_exports_spans_over_otlp_http(
    venv: Path, tmp_path: Path, http_traces: HttpTraces
) -> None:
    # Only the endpoint: OTLP over HTTP/protobuf is the default transport.
    with serve(venv, tmp_path, {"OTEL_EXPORTER_OTLP_ENDPOINT": http_traces.endpoint}) as svc:
        assert check(svc).status.code == 0
        wait_until(lambda: "authz.check" in http_traces.names, timeout=30,
                   what="an authz.check span over OTLP/HTTP")  # fmt: skip
    assert "Traceback" not in svc.stderr_tail(200), svc.stderr_tail(200)
