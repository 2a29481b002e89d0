"""Budgets shared by a group (issue 16) through the real Envoy, the real openai SDK and a
real Redis Cluster (edge leases on): two users in different departments who
both work on project apollo share one counter; a third, not on the project, does not.
The group's counter and each member's own sit in one cluster slot (the org's), so they
are reserved in one atomic step.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path

import openai
import pytest

from tests.support.envoy_proc import EnvoyProcess
from tests.support.fake_llm import FakeLLMThread
from tests.support.procs import wait_until
from tests.support.redis_proc import RedisClusterProcs
from tests.support.service import AuthzService

pytestmark = pytest.mark.e2e

# sk-demo-alice, sk-demo-bob, sk-demo-batch (examples/policy.yaml), other claims here.
POLICY = """
version: 1
identity:
  api_keys:
    - {{name: a, sha256: 32a642c5fd761670c7f9989b70138c93c56ea519529eb544d46b91a8e59f3075,
       claims: {{org_id: acme, department: research, sub: alice, projects: [apollo]}}}}
    - {{name: b, sha256: ca5de30b0acbd9ce4fd5d1721830a77e6b4b8cbd3123e335f0bb46786758ff35,
       claims: {{org_id: acme, department: sales, sub: bob, projects: [apollo, zeus]}}}}
    - {{name: c, sha256: 2c62df960948208dea5fc49f2adaab5188e82b2a373145607967cef63301b76c,
       claims: {{org_id: acme, department: sales, sub: cy, projects: [zeus]}}}}
subject:
  org: {{claim: org_id}}
  department: {{claim: department}}
  leaf: [{{level: user, claim: sub}}]
budgets:
  - {{name: user-daily, match: {{user: "*"}}, tokens: 20000, period: day, over_reserve: deny}}
  - {{name: apollo-daily, match: {{org: "*"}}, group: {{projects: apollo}}, tokens: 3000,
     period: day, over_reserve: deny}}
models:
  rules: [{{match: "gpt-*", max_output_tokens: 100}}]
ledger: {{url: "{url}"}}
"""
HI = [{"role": "user", "content": "hi"}]


@pytest.fixture
def service(tmp_path: Path, authz_port: int, redis_cluster: RedisClusterProcs
            ) -> Iterator[AuthzService]:  # fmt: skip
    (tmp_path / "policy.yaml").write_text(POLICY.format(url=redis_cluster.url + "?lease=on&lease_flush_ms=10"))
    with AuthzService(tmp_path / "policy.yaml", grpc_port=authz_port, workdir=tmp_path,
                      extra_args=["--state-dir", str(tmp_path)]) as svc:  # fmt: skip
        yield svc


def _client(envoy: EnvoyProcess, key: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=envoy.url + "/v1", api_key=key, max_retries=0, timeout=30)


def _settled(svc: AuthzService, n: int) -> None:
    def done() -> bool:
        m = re.search(r'^authz_settlements_total\{outcome="settled"\} (\S+)$',
                      svc.metrics_text(), re.M)  # fmt: skip
        return m is not None and float(m.group(1)) >= n

    wait_until(done, timeout=15, what=f"{n} settlements")


def test_project_members_across_departments_share_one_budget(
    envoy: EnvoyProcess, service: AuthzService, fake_llm: FakeLLMThread
) -> None:
    with (_client(envoy, "sk-demo-alice") as alice, _client(envoy, "sk-demo-bob") as bob,
          _client(envoy, "sk-demo-batch") as cy):  # fmt: skip
        raw = alice.chat.completions.with_raw_response.create(
            model="gpt-4o", max_tokens=2000, messages=HI,  # type: ignore[arg-type]
            extra_headers={"x-fake-prompt-tokens": "40", "x-fake-words": "2000"},
        )  # fmt: skip
        # The tightest budget on alice's path is now the group's.
        assert int(raw.headers["x-ratelimit-limit-tokens"]) == 3000
        _settled(service, 1)  # apollo: 2,040 of 3,000 spent
        with pytest.raises(openai.RateLimitError) as err:  # bob, in sales: 960 left
            bob.chat.completions.create(model="gpt-4o", max_tokens=1000, messages=HI)  # type: ignore[arg-type]
        assert "'apollo-daily' for org:acme/group:apollo-daily" in str(err.value)
        assert int(err.value.response.headers["x-ratelimit-remaining-tokens"]) == 960
        served = bob.chat.completions.create(model="gpt-4o", max_tokens=900, messages=HI)  # type: ignore[arg-type]
        assert served.choices[0].message.content
        # cy is not on the project: only his own budget applies.
        assert cy.chat.completions.create(model="gpt-4o", max_tokens=5000, messages=HI)  # type: ignore[arg-type]
