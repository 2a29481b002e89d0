"""The management API bounds request bodies before anything reads them, credential or not.

FastAPI reads a route's whole JSON body before the route's dependencies check the
caller: before the bound (authz/manage/body_limit.py), anyone who could reach the port,
with no credential, could make the service hold a body of any size. Against the real
service's uvicorn listener: a declared and a chunked (undeclared) body over 64 KiB are
413 without a credential; a small one still reaches the credential check (401)."""

from __future__ import annotations

from collections.abc import Iterator

import httpx
import pytest

from authz.manage.body_limit import MAX_BODY_BYTES
from tests.support.manage_env import write_policy
from tests.support.service import AuthzService
from tests.support.tokens import make_rsa_key

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def service(tmp_path_factory: pytest.TempPathFactory) -> Iterator[AuthzService]:
    workdir = tmp_path_factory.mktemp("manage-bound")
    with AuthzService(write_policy(workdir, make_rsa_key("manage-bound")), workdir=workdir) as svc:
        yield svc


def big_json() -> bytes:
    return b'{"reason": "' + b"x" * (4 * MAX_BODY_BYTES) + b'"}'


def test_a_declared_large_body_is_413_without_reading_it(service: AuthzService) -> None:
    with httpx.Client(base_url=service.manage_url, trust_env=False, timeout=30) as client:
        resp = client.post("/v1/allocations", content=big_json(),
                           headers={"content-type": "application/json"})  # fmt: skip
    assert resp.status_code == 413, resp.text
    assert str(MAX_BODY_BYTES) in resp.json()["detail"]


def test_a_chunked_large_body_is_413(service: AuthzService) -> None:
    def chunks() -> Iterator[bytes]:
        data = big_json()
        for i in range(0, len(data), 8192):
            yield data[i : i + 8192]

    with httpx.Client(base_url=service.manage_url, trust_env=False, timeout=30) as client:
        resp = client.post("/v1/requests", content=chunks(),
                           headers={"content-type": "application/json"})  # fmt: skip
    assert resp.status_code == 413, resp.text


def test_a_small_body_still_meets_the_credential_check(service: AuthzService) -> None:
    with httpx.Client(base_url=service.manage_url, trust_env=False, timeout=30) as client:
        resp = client.post("/v1/allocations", json={"node": "org:acme", "tokens": 1})
    assert resp.status_code == 401, resp.text
