"""Tests generated from the management API's own OpenAPI document (schemathesis),
against the real service: whatever a caller sends, the answer is never a 5xx.

Run twice over: as an admin key (every route's logic is reached: bodies that pass the
schema reach the policy validation, ids reach the store) and as a department manager
(the role and subtree checks). The service runs on the embedded SQLite ledger, so the
allocation store is a real file, and stops at the end (a leak fails the suite)."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import requests
import schemathesis
from hypothesis import HealthCheck, given, settings
from schemathesis.checks import not_a_server_error

from tests.support.manage_env import ADMIN_KEY, bearer, token, write_policy
from tests.support.service import AuthzService
from tests.support.tokens import make_rsa_key

pytestmark = pytest.mark.integration
KEY = make_rsa_key("manage-fuzz")


@pytest.fixture(scope="module")
def service(tmp_path_factory: pytest.TempPathFactory) -> Iterator[AuthzService]:
    workdir = tmp_path_factory.mktemp("manage-fuzz")
    policy = write_policy(workdir, KEY)
    with AuthzService(policy, workdir=workdir,
                      extra_args=["--ledger", "sqlite:///ledger.db"]) as svc:  # fmt: skip
        yield svc
    assert svc.returncode == 0, svc.stderr_tail()


@pytest.fixture(scope="module")
def session() -> Iterator[requests.Session]:
    with requests.Session() as s:
        s.trust_env = False
        yield s


_SETTINGS = settings(max_examples=40, deadline=None, derandomize=True, database=None,
                     suppress_health_check=list(HealthCheck))  # fmt: skip


def _fuzz(service: AuthzService, session: requests.Session, credential: str) -> int:
    """Every operation of the document, ``max_examples`` cases each; how many operations.

    Driven from inside the test (operation strategies under ``given``) rather than by
    ``schemathesis.pytest.from_fixture``, whose lazy loading fails on pytest 9."""
    api = schemathesis.openapi.from_url(service.manage_url + "/v1/openapi.json")
    operations = [result.ok() for result in api.get_all_operations()]
    for operation in operations:

        @given(case=operation.as_strategy())
        @_SETTINGS
        def one(case: schemathesis.Case) -> None:
            headers = {**(case.headers or {}), **bearer(credential)}
            case.call_and_validate(session=session, headers=headers,
                                   checks=[not_a_server_error], timeout=30)  # fmt: skip

        one()
    return len(operations)


def test_no_input_makes_a_server_error_as_admin(service: AuthzService,
                                                session: requests.Session) -> None:  # fmt: skip
    assert _fuzz(service, session, ADMIN_KEY) == 12


def test_no_input_makes_a_server_error_as_manager(service: AuthzService,
                                                  session: requests.Session) -> None:  # fmt: skip
    assert _fuzz(service, session, token(KEY, "rhead", "research", ["dept-head"])) == 12
