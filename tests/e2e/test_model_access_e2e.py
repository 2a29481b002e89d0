"""Model allowlists per node (issue 16) through the real Envoy and the real SDKs: a model
outside the caller's lists is refused with a 403 in the API's own error format (OpenAI:
``permission_denied`` / ``model_not_allowed``; Anthropic: ``permission_error``), before
anything is reserved and without reaching the upstream; an allowed model is served.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import anthropic
import openai
import pytest

from tests.support.envoy_proc import EnvoyProcess
from tests.support.fake_llm import FakeLLMThread
from tests.support.service import AuthzService

pytestmark = pytest.mark.e2e

KEY = "sk-demo-alice"
POLICY = """
version: 1
identity:
  api_keys:
    - {name: demo-alice, sha256: 32a642c5fd761670c7f9989b70138c93c56ea519529eb544d46b91a8e59f3075,
       claims: {org_id: acme, department: research, sub: alice}}
subject:
  org: {claim: org_id}
  department: {claim: department}
  leaf: [{level: user, claim: sub}]
budgets:
  - {name: user-daily, match: {user: "*"}, tokens: 20000, period: day, over_reserve: deny}
models:
  rules: [{match: "*", max_output_tokens: 100}]
access:
  - match: {org: acme}
    models: {allow: ["gpt-4o*", "claude-*"]}
  - match: {department: research}
    models: {allow: ["gpt-4o-mini*", "claude-3-5-haiku*", "o3*"]}
ledger: {url: "memory://"}
"""
HI = [{"role": "user", "content": "hi"}]


@pytest.fixture
def service(tmp_path: Path, authz_port: int) -> Iterator[AuthzService]:
    (tmp_path / "policy.yaml").write_text(POLICY)
    with AuthzService(tmp_path / "policy.yaml", grpc_port=authz_port, workdir=tmp_path) as svc:
        yield svc


def _remaining(client: openai.OpenAI) -> int:
    with pytest.raises(openai.RateLimitError) as err:
        client.chat.completions.create(model="gpt-4o-mini", max_tokens=90_000, messages=HI)  # type: ignore[arg-type]
    return int(err.value.response.headers["x-ratelimit-remaining-tokens"])


def test_models_outside_the_lists_get_a_403_in_each_apis_format(
    envoy: EnvoyProcess, service: AuthzService, fake_llm: FakeLLMThread
) -> None:
    with openai.OpenAI(base_url=envoy.url + "/v1", api_key=KEY, max_retries=0,
                       timeout=30) as client:  # fmt: skip
        # Allowed by the org, narrowed away by the department.
        with pytest.raises(openai.PermissionDeniedError) as err:
            client.chat.completions.create(model="gpt-4o", max_tokens=5, messages=HI)  # type: ignore[arg-type]
        body = err.value.body
        assert isinstance(body, dict)
        assert (body["type"], body["code"]) == ("permission_denied", "model_not_allowed")
        assert "org:acme/department:research (access[1].models)" in body["message"]
        # Allowed by the department, never by the org: no widening.
        with pytest.raises(openai.PermissionDeniedError):
            client.chat.completions.create(model="o3-mini", max_tokens=5, messages=HI)  # type: ignore[arg-type]
        claude = anthropic.Anthropic(base_url=envoy.url, api_key=KEY, max_retries=0, timeout=30)
        with claude, pytest.raises(anthropic.PermissionDeniedError) as aerr:
            claude.messages.create(model="claude-3-opus", max_tokens=5, messages=HI)  # type: ignore[arg-type]
        assert aerr.value.body["error"]["type"] == "permission_error"  # type: ignore[index]
        assert fake_llm.records == []  # none reached the upstream
        assert _remaining(client) == 20_000  # and nothing was reserved
        served = client.chat.completions.create(model="gpt-4o-mini", max_tokens=5, messages=HI)  # type: ignore[arg-type]
        assert served.choices[0].message.content
