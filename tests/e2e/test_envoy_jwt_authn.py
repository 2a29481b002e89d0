"""identity.source: envoy_jwt_authn — Envoy's jwt_authn verifies, the service trusts its payload."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator

import openai
import pytest

from tests.support.clients import closing
from tests.support.envoy_proc import EnvoyProcess, Mutator, add_jwt_authn
from tests.support.fake_llm import FakeLLMThread
from tests.support.service import AuthzService
from tests.support.tokens import SigningKey, jwks_document, make_ec_key, mint

pytestmark = pytest.mark.e2e

KEY = make_ec_key("jwt-authn-ec")
POLICY = """
version: 1
identity:
  source: envoy_jwt_authn
  trust_network: true  # plaintext loopback here; mTLS: tests/hostile/test_grpc_mtls.py
subject:
  org: {claim: org_id}
  team: {claim: groups, pattern: "^team-(.+)$", missing: skip}
  leaf: [{level: user, claim: sub}]
budgets:
  - {name: team-day, match: {team: "*"}, tokens: 100, period: day}
models:
  rules: [{match: "gpt-*", max_output_tokens: 10}]
"""


@pytest.fixture(scope="module")
def envoy_mutate() -> Mutator:
    def mutate(cfg: dict) -> None:  # type: ignore[type-arg]
        add_jwt_authn(
            cfg,
            issuer="https://idp.test/",
            audiences=["llm-gateway"],
            local_jwks=json.dumps(jwks_document(KEY)),
        )

    return mutate


@pytest.fixture(scope="module")
def service(tmp_path_factory: pytest.TempPathFactory, authz_port: int) -> Iterator[AuthzService]:
    workdir = tmp_path_factory.mktemp("authz-jwt-authn")
    (workdir / "policy.yaml").write_text(POLICY)
    with AuthzService(workdir / "policy.yaml", grpc_port=authz_port, workdir=workdir) as svc:
        yield svc


def tok(key: SigningKey, sub: str, **extra: object) -> str:
    now = int(time.time())
    return mint(
        key,
        {
            "iss": "https://idp.test/",
            "aud": "llm-gateway",
            "sub": sub,
            "org_id": "acme",
            "groups": ["team-ml"],
            "iat": now,
            "exp": now + 600,
            **extra,
        },
    )


def call(envoy: EnvoyProcess, token: str) -> object:
    client = closing(
        openai.OpenAI(base_url=envoy.url + "/v1", api_key=token, max_retries=0, timeout=10)
    )
    return client.chat.completions.create(
        model="gpt-4o", max_tokens=10, messages=[{"role": "user", "content": "hi"}]
    )


def test_subject_comes_from_envoy_verified_payload(
    envoy: EnvoyProcess, service: AuthzService, fake_llm: FakeLLMThread
) -> None:
    call(envoy, tok(KEY, "ivy"))
    rec = fake_llm.wait_records(1)[0]
    assert rec.headers["x-authz-subject"] == "org:acme/team:ml/user:ivy"


def test_team_budget_shared_by_its_users(envoy: EnvoyProcess, service: AuthzService) -> None:
    with pytest.raises(openai.RateLimitError) as err:
        for i in range(10):  # 100 tokens; each call settles 15 and needs ~15 free
            call(envoy, tok(KEY, f"member-{i}"))
    assert "team-day" in str(err.value)


def test_envoy_rejects_bad_tokens_before_the_service(
    envoy: EnvoyProcess, service: AuthzService
) -> None:
    other = make_ec_key("not-in-jwks")
    with pytest.raises(openai.AuthenticationError):
        call(envoy, tok(other, "mallory"))
