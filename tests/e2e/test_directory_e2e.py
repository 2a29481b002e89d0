"""The directory as the org chart, through the real Envoy with the openai SDK.

The JWTs carry only ``sub`` (and iss/aud/exp): the department and team come from a
real OpenLDAP slapd (``memberOf``). A team's budget denies once spent; a user moved to
another team in LDAP is charged to the new team once the cache's TTL has passed; with
the directory stopped, a known user is still placed (``on_down: last_known``), an
unknown one gets a 503, and ``/readyz`` says degraded without failing.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from typing import Any

import openai
import pytest

from tests.e2e.spine_env import metric
from tests.support.clients import closing
from tests.support.envoy_proc import EnvoyProcess
from tests.support.fake_llm import FakeLLMThread
from tests.support.jwks_server import JwksServer
from tests.support.procs import wait_until
from tests.support.service import AuthzService
from tests.support.slapd import BASE, READER_DN, READER_PASSWORD, Slapd, group_ldif, person_ldif
from tests.support.tokens import SigningKey, make_ec_key, make_rsa_key, mint

pytestmark = pytest.mark.e2e

POLICY = """
version: 1
timezone: UTC
identity:
  jwt: {{issuer: https://idp.test/, audience: llm-gateway, algorithms: [RS256],
        jwks_url: {jwks_url}, leeway_s: 5}}
subject:
  org: {{claim: org_id, missing: {{fallback: acme}}}}
  leaf: [{{level: user, claim: sub}}]
directory:
  url: {ldap_url}
  bind_dn: "{bind_dn}"
  password_file: ldap.pw
  base_dn: "ou=people,{base}"
  user_filter: "(&(objectClass=inetOrgPerson)(uid={{subject}}))"
  groups: {{attribute: memberOf}}
  levels:
    department: {{attribute: departmentNumber}}
    team: {{group: "^cn=team-(?P<name>[^,]+),ou=groups,", missing: skip}}
  cache_s: 2
  negative_cache_s: 1
  retry_s: 0.5
  timeout_s: 2
  on_down: last_known
budgets:
  - {{name: team-nlp, match: {{team: nlp}}, tokens: 400, period: day}}
  - {{name: team-full, match: {{team: full}}, tokens: 1, period: day}}
  - {{name: team-open, match: {{team: open}}, tokens: 50000, period: day}}
  - {{name: department, match: {{department: "*"}}, tokens: 1000000, period: day}}
models:
  rules: [{{match: "gpt-*", max_output_tokens: 50}}]
  unknown: deny
"""


@pytest.fixture(scope="module")
def rsa() -> SigningKey:
    return make_rsa_key("dir-rsa")


@pytest.fixture(scope="module")
def slapd(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Slapd]:
    with Slapd(tmp_path_factory.mktemp("slapd")) as server:
        server.add(
            person_ldif("alice", "research")
            + person_ldif("bob", "research")
            + person_ldif("dave", "ops")
            + person_ldif("frank", "ops")
            + group_ldif("team-nlp", ["alice"])
            + group_ldif("team-deals", ["bob"])
            + group_ldif("team-full", ["dave"])
            + group_ldif("team-open", ["frank"])
        )
        yield server


@pytest.fixture(scope="module")
def service(
    tmp_path_factory: pytest.TempPathFactory, rsa: SigningKey, slapd: Slapd, authz_port: int
) -> Iterator[AuthzService]:
    with JwksServer(rsa, make_ec_key("dir-ec")) as jwks:
        workdir = tmp_path_factory.mktemp("directory")
        (workdir / "ldap.pw").write_text(READER_PASSWORD + "\n")
        policy = workdir / "policy.yaml"
        policy.write_text(POLICY.format(jwks_url=jwks.url, ldap_url=slapd.url,
                                        bind_dn=READER_DN, base=BASE))  # fmt: skip
        with AuthzService(policy, grpc_port=authz_port, workdir=workdir) as svc:
            yield svc


@pytest.fixture
def gw(envoy: EnvoyProcess, service: AuthzService, fake_llm: FakeLLMThread) -> EnvoyProcess:
    return envoy


def only_sub(key: SigningKey, sub: str) -> str:
    now = int(time.time())
    claims = {"iss": "https://idp.test/", "aud": "llm-gateway", "sub": sub, "iat": now,
              "exp": now + 600}  # fmt: skip
    return mint(key, claims)


def client(gw: EnvoyProcess, key: SigningKey, sub: str, **headers: str) -> openai.OpenAI:
    return closing(openai.OpenAI(base_url=gw.url + "/v1", api_key=only_sub(key, sub),
                                 max_retries=0, timeout=20, default_headers=headers or None))  # fmt: skip


def chat(c: openai.OpenAI) -> Any:
    return c.chat.completions.with_raw_response.create(
        model="gpt-4o", messages=[{"role": "user", "content": "hi"}], max_tokens=50
    )


def test_a_token_with_only_sub_is_charged_to_the_directory_team(
    gw: EnvoyProcess, rsa: SigningKey, fake_llm: FakeLLMThread
) -> None:
    alice = client(gw, rsa, "alice", **{"x-fake-prompt-tokens": "100"})
    allowed = 0
    with pytest.raises(openai.RateLimitError) as err:
        for _ in range(20):
            raw = chat(alice)
            assert raw.headers["x-ratelimit-limit-tokens"] == "400"  # team-nlp is the tightest
            allowed += 1
    assert 2 <= allowed <= 4
    body = err.value.body
    assert isinstance(body, dict)
    assert "team-nlp" in body["message"] and "team:nlp" in body["message"], body
    assert "department:research" in body["message"]
    fake_llm.wait_records(allowed)
    # bob: the same department, another team: his team has no budget of its own
    assert chat(client(gw, rsa, "bob")).headers["x-ratelimit-limit-tokens"] == "1000000"


def test_a_user_moved_in_ldap_is_charged_to_the_new_team_after_the_ttl(
    gw: EnvoyProcess, rsa: SigningKey, slapd: Slapd
) -> None:
    dave = client(gw, rsa, "dave")
    with pytest.raises(openai.RateLimitError) as err:
        chat(dave)
    assert "team:full" in err.value.body["message"]  # type: ignore[index]
    slapd.modify(
        f"dn: cn=team-full,ou=groups,{BASE}\nchangetype: modify\n"
        f"delete: member\nmember: uid=dave,ou=people,{BASE}\n\n"
        f"dn: cn=team-open,ou=groups,{BASE}\nchangetype: modify\n"
        f"add: member\nmember: uid=dave,ou=people,{BASE}\n\n"
    )

    def served() -> Any:
        try:
            return chat(dave)
        except openai.RateLimitError:
            return None

    raw = wait_until(served, timeout=30, what="dave charged to team-open", interval=0.2)
    assert raw.headers["x-ratelimit-limit-tokens"] == "50000"  # team-open's budget
    assert json.loads(raw.text)["usage"]["total_tokens"] > 0


def test_directory_down_last_known_and_readiness(
    gw: EnvoyProcess, rsa: SigningKey, slapd: Slapd, service: AuthzService
) -> None:
    frank = client(gw, rsa, "frank")
    assert chat(frank).headers["x-ratelimit-limit-tokens"] == "50000"
    slapd.stop()
    try:
        stranger = client(gw, rsa, "erin")  # never looked up: nothing last known

        def refused() -> openai.InternalServerError | None:
            try:
                chat(stranger)
            except openai.InternalServerError as exc:
                return exc
            return None

        exc = wait_until(refused, timeout=20, what="503 for a user never seen", interval=0.2)
        assert exc.status_code == 503
        assert exc.body["code"] == "directory_unavailable"  # type: ignore[index]
        status, text = service.http_get("/readyz")
        body = json.loads(text)
        assert status == 200 and body["status"] == "degraded", body
        assert body["directory"]["up"] is False and body["directory"]["on_down"] == "last_known"

        def served_from_last_known() -> bool:
            # every request is served, on team-open's budget, before and after his
            # entry expires (cache_s 2) and is answered from last_known
            assert chat(frank).headers["x-ratelimit-limit-tokens"] == "50000"
            return metric(service.http_url, "authz_directory_cache_total", result="last_known") > 0

        wait_until(served_from_last_known, timeout=20, what="frank served from last_known",
                   interval=0.2)  # fmt: skip
    finally:
        slapd.start()
    # no traffic needed: the service probes a directory it saw down
    wait_until(lambda: json.loads(service.http_get("/readyz")[1])["status"] == "ready",
               timeout=30, what="ready again once the directory answers")  # fmt: skip
