"""The shipped Dockerfile, built and run for real (podman, as Docker would run it).

The image is built from the working tree on a local stand-in for ``python:3.11-slim``
(tests/support/podman.py) and run with the example policy mounted, as
docs/deploy/docker.md tells users to: the admin port answers ``/healthz``, the image's
HEALTHCHECK passes, gRPC health says SERVING, a Check with a real JWT (signed with
examples/dev's demo key) is allowed and one without is denied, the service runs as uid
10001, and ``podman stop`` (SIGTERM) drains and exits 0.

Needs root, podman, runc and debootstrap (scripts/test installs them as root through
scripts/apt-deps). Without them these tests FAIL saying the container test could not
run: a green run must mean the image was really built and run.
"""

from __future__ import annotations

import json
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Iterator
from pathlib import Path

import grpc
import jwt
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from authz.proto import attribute_context_pb2, external_auth_pb2, external_auth_pb2_grpc
from tests.support.envoy_proc import EnvoyProcess, render_envoy_config
from tests.support.podman import Podman, missing_requirements
from tests.support.ports import free_port
from tests.support.procs import wait_until

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(1800)]

REPO = Path(__file__).resolve().parents[2]
EXAMPLES = REPO / "examples"
TAG = "localhost/authz:test"
_OPENER = urllib.request.build_opener(urllib.request.ProxyHandler({}))


class Container:
    def __init__(self, podman: Podman) -> None:
        self.podman = podman
        self.name = f"authz-test-{uuid.uuid4().hex[:8]}"
        self.volume = f"{self.name}-state"
        self.grpc_port, self.http_port = free_port(), free_port()

    def start(self) -> Container:
        self.podman(
            "run", "-d", "--name", self.name,
            "-p", f"127.0.0.1:{self.grpc_port}:9191", "-p", f"127.0.0.1:{self.http_port}:9192",
            "-v", f"{EXAMPLES}:/etc/authz:ro",
            "-v", f"{self.volume}:/var/lib/authz/authz-state",  # the docs' state volume
            # Port 9191 listens on 0.0.0.0 in the container: plaintext only when told so.
            "-e", "AUTHZ_INSECURE_PLAINTEXT=1",
            TAG,
        )  # fmt: skip
        wait_until(lambda: self.healthz() == 200 or self.exited(), timeout=120,
                   what="the container's /healthz")  # fmt: skip
        assert not self.exited(), f"the container exited:\n{self.logs()}"
        return self

    def healthz(self) -> int | None:
        try:
            with _OPENER.open(f"http://127.0.0.1:{self.http_port}/healthz", timeout=2) as r:
                return int(r.status)
        except (OSError, urllib.error.URLError):
            return None

    def inspect(self, fmt: str) -> str:
        return self.podman("inspect", "--format", fmt, self.name).stdout.strip()

    def exited(self) -> bool:
        return self.inspect("{{.State.Status}}") in ("exited", "stopped")

    def logs(self) -> str:
        r = self.podman("logs", self.name, check=False)
        return r.stdout + r.stderr

    def remove(self) -> None:
        self.podman("rm", "-f", "-t", "0", self.name, check=False)
        self.podman("volume", "rm", "-f", self.volume, check=False)


@pytest.fixture(scope="module")
def podman() -> Podman:
    why = missing_requirements()
    if why is not None:
        pytest.fail(why, pytrace=False)
    podman = Podman()
    podman.build(TAG, REPO)
    return podman


@pytest.fixture(scope="module")
def container(podman: Podman) -> Iterator[Container]:
    c = Container(podman)
    try:
        yield c.start()
    finally:
        c.remove()


def token(**claims: object) -> str:
    now = int(time.time())
    body = {"iss": "https://idp.example.com/", "aud": "llm-gateway", "iat": now,
            "exp": now + 600, "sub": "alice", "org_id": "acme", "department": "research",
            "groups": ["team-nlp"], **claims}  # fmt: skip
    key = (EXAMPLES / "dev" / "signing-key.pem").read_bytes()
    return jwt.encode(body, key, algorithm="RS256", headers={"kid": "dev-1"})


def check(c: Container, authorization: str | None) -> external_auth_pb2.CheckResponse:
    headers = {"content-type": "application/json"}
    if authorization is not None:
        headers["authorization"] = authorization
    body = json.dumps({"model": "gpt-4o-mini", "max_tokens": 16,
                       "messages": [{"role": "user", "content": "hi"}]})  # fmt: skip
    http = attribute_context_pb2.AttributeContext.HttpRequest(
        method="POST", path="/v1/chat/completions", headers=headers, body=body
    )
    request = external_auth_pb2.CheckRequest(
        attributes=attribute_context_pb2.AttributeContext(
            request=attribute_context_pb2.AttributeContext.Request(http=http)
        )
    )
    with grpc.insecure_channel(f"127.0.0.1:{c.grpc_port}") as channel:
        stub = external_auth_pb2_grpc.AuthorizationStub(channel)
        response: external_auth_pb2.CheckResponse = stub.Check(request, timeout=30)
        return response


def test_healthz_and_the_image_healthcheck(container: Container) -> None:
    assert container.healthz() == 200
    assert container.inspect("{{.Config.Healthcheck}}") != "<nil>", "HEALTHCHECK was dropped"
    result = container.podman("healthcheck", "run", container.name, check=False)
    assert result.returncode == 0, result.stdout + result.stderr


def test_grpc_health_serving(container: Container) -> None:
    with grpc.insecure_channel(f"127.0.0.1:{container.grpc_port}") as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        for service in ("", "envoy.service.auth.v3.Authorization",
                        "envoy.service.ext_proc.v3.ExternalProcessor"):  # fmt: skip
            answer = stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=30)
            assert answer.status == health_pb2.HealthCheckResponse.SERVING, service


def test_a_check_with_a_real_jwt_is_allowed_and_one_without_is_denied(
    container: Container,
) -> None:
    allowed = check(container, f"Bearer {token()}")
    assert allowed.status.code == 0 and allowed.HasField("ok_response"), allowed
    assert allowed.dynamic_metadata.fields["verdict"].string_value == "allow"
    denied = check(container, None)
    assert denied.status.code == 7 and denied.denied_response.status.code == 401, denied
    forged = check(container, f"Bearer {token()[:-4]}AAAA")
    assert forged.denied_response.status.code == 401, forged


def test_a_request_through_envoy_is_denied_by_the_container(
    container: Container, tmp_path: Path
) -> None:
    """docs/deploy/docker.md's path: the shipped envoy.yaml in front, authz in the image."""
    config = render_envoy_config(
        listen_port=0, admin_port=0, authz_port=container.grpc_port,
        upstream_port=free_port(), out_path=tmp_path / "envoy.yaml",
    )  # fmt: skip
    body = json.dumps({"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "hi"}]})
    with EnvoyProcess(config) as envoy:
        request = urllib.request.Request(
            f"http://127.0.0.1:{envoy.port}/v1/chat/completions", data=body.encode(),
            headers={"content-type": "application/json"}, method="POST",
        )  # fmt: skip
        with pytest.raises(urllib.error.HTTPError) as denied:
            _OPENER.open(request, timeout=30).close()
        with denied.value as answer:
            assert answer.code == 401, answer.read()
            assert answer.headers["x-authz-reason"] == "unauthenticated"
            assert json.loads(answer.read())["error"]["code"] == "invalid_api_key"


def test_runs_as_a_non_root_user(container: Container) -> None:
    status = container.podman("exec", container.name, "cat", "/proc/1/status").stdout
    uids = next(line for line in status.splitlines() if line.startswith("Uid:")).split()[1:]
    assert uids == ["10001"] * 4, status
    # The embedded ledger is written to the state volume, by that user.
    owner = container.podman("exec", container.name, "stat", "-c", "%u",
                             "/var/lib/authz/authz-state/ledger.db").stdout.strip()  # fmt: skip
    assert owner == "10001"


def test_sigterm_drains_and_exits_zero(podman: Podman) -> None:
    c = Container(podman)
    try:
        c.start()
        assert check(c, f"Bearer {token()}").status.code == 0
        podman("stop", "-t", "60", c.name, timeout=120)  # SIGTERM (the image's STOPSIGNAL)
        assert c.inspect("{{.State.ExitCode}}") == "0", c.logs()
        logs = c.logs()
        assert "stopping: no new checks" in logs, logs
        assert "stopped" in logs.split("stopping: no new checks", 1)[1], logs
    finally:
        c.remove()


def test_without_root_it_fails_saying_it_could_not_run(monkeypatch: pytest.MonkeyPatch) -> None:
    """What a rootless local run gets instead of a build: a failure that says so."""
    monkeypatch.setattr("os.geteuid", lambda: 1000)
    why = missing_requirements()
    assert why is not None and "could not run" in why and "root" in why
    monkeypatch.setattr("os.geteuid", lambda: 0)
    monkeypatch.setattr("shutil.which", lambda tool: None if tool == "debootstrap" else tool)
    why = missing_requirements()
    assert why is not None and "debootstrap not installed" in why and "apt-deps" in why
