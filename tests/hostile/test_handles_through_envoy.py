"""Issue 9, finding 2, through the real Envoy: the reservation handle reaches ext_proc
and nothing else (not the upstream, not the shipped access log), and the legitimate
path still settles exactly what the upstream reported, with nothing refused.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Iterator
from pathlib import Path

import openai
import pytest

from tests.e2e.spine_env import metric, wait_metric
from tests.support.envoy_proc import EnvoyProcess, render_envoy_config
from tests.support.fake_llm import FakeLLM, FakeLLMThread
from tests.support.service import AuthzService

pytestmark = [pytest.mark.e2e]

KEY = "sk-envoy-handles"
POLICY = f"""
version: 1
timezone: UTC
identity:
  api_keys:
    - {{name: k, sha256: {hashlib.sha256(KEY.encode()).hexdigest()}, claims: {{org_id: hdl, sub: ann}}}}
subject:
  org: {{claim: org_id}}
  leaf: [{{level: user, claim: sub}}]
budgets:
  - {{name: user-day, match: {{user: "*"}}, tokens: 100000, period: day}}
models:
  rules: [{{match: "gpt-*", max_output_tokens: 50}}]
"""
RESERVATION_ID = re.compile(r"[0-9a-f]{32}@")  # what the service's ids look like


@pytest.fixture(scope="module")
def gateway(
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[tuple[EnvoyProcess, AuthzService, FakeLLMThread]]:
    tmp = tmp_path_factory.mktemp("handles")
    (tmp / "policy.yaml").write_text(POLICY)
    with (
        FakeLLM.run_in_thread() as fake,
        AuthzService(tmp / "policy.yaml", workdir=tmp) as svc,
    ):
        config = render_envoy_config(
            listen_port=0, admin_port=0, authz_port=svc.grpc_port, upstream_port=fake.port,
            out_path=tmp / "envoy.yaml",
        )  # fmt: skip
        with EnvoyProcess(config) as envoy:
            yield envoy, svc, fake


@pytest.mark.parametrize("stream", [False, True])
def test_handle_stays_between_envoy_and_the_service(
    gateway: tuple[EnvoyProcess, AuthzService, FakeLLMThread], stream: bool
) -> None:
    envoy, svc, fake = gateway
    fake.reset()
    seen = len(envoy.access_log())
    settled = metric(svc.http_url, "authz_settlements_total", outcome="settled")
    tokens = metric(svc.http_url, "authz_tokens_total", org="hdl", kind="output")
    with openai.OpenAI(base_url=envoy.url + "/v1", api_key=KEY, max_retries=0, timeout=20) as c:
        extra = {"x-fake-words": "7", "x-fake-prompt-tokens": "13"}
        kw = {"model": "gpt-4o", "messages": [{"role": "user", "content": "hi"}]}
        if stream:
            # Read to the end of the body: the SDK's own loop stops at [DONE] and closes,
            # which can reset the stream before Envoy hands ext_proc its end_of_stream;
            # the settlement is then the abort path's (still exact) and the access log
            # has no usage field. That race is not what this test is about.
            raw = c.chat.completions.with_streaming_response.create(  # type: ignore[call-overload]
                **kw, stream=True, extra_headers=extra
            )
            with raw as response:
                response.read()
        else:
            c.chat.completions.create(**kw, extra_headers=extra)  # type: ignore[call-overload]
    [rec] = fake.wait_records(1)
    # Settled exactly what the upstream reported, through the signed handle.
    assert wait_metric(svc.http_url, "authz_settlements_total", settled + 1, outcome="settled") == (
        settled + 1
    )
    assert metric(svc.http_url, "authz_tokens_total", org="hdl", kind="output") == tokens + 7
    assert metric(svc.http_url, "authz_settle_refused_total") == 0
    # The upstream sees the subject, never a reservation id.
    assert rec.headers["x-authz-subject"] == "org:hdl/user:ann"
    assert "x-authz-reservation" not in rec.headers
    assert not any(RESERVATION_ID.search(v) for v in rec.headers.values())
    # The shipped access log: what was decided, without the handle or its MAC.
    [line] = envoy.access_log(at_least=seen + 1)[seen:]
    assert line["authz"]["verdict"] == "allow" and line["authz"]["subject"] == "org:hdl/user:ann"
    assert not RESERVATION_ID.search(str(line)) and "mac" not in line["authz"]
    assert line["usage"]["output"] == 7  # what ext_proc measured still shows


def test_shipped_access_log_names_only_safe_keys() -> None:
    import yaml

    cfg = yaml.safe_load(Path(__file__).parents[2].joinpath("envoy", "envoy.yaml").read_text())
    text = str(cfg)
    assert "%DYNAMIC_METADATA(envoy.filters.http.ext_authz)%" not in text  # the whole namespace
    for key in ("reservation_id", "mac"):
        assert f"envoy.filters.http.ext_authz:{key})" not in text
