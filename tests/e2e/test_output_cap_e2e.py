"""Admit what fits, through the shipped Envoy config and the real SDKs (issue 10, #2).

The issue's user: the shipped example policy (output counted 4x, 4,096 output tokens
reserved when a request names no max_tokens), 15,960 of 20,000 units left. The worst
case needs 16,389: that used to be a 429 for the rest of the day. Now the request is
served with its output capped to the 3,988 tokens that fit: the upstream receives the
lowered limit, the client reads it in ``x-authz-max-tokens``, the model stops there
(``finish_reason: length``) and the budget is charged what the upstream reported.
"""

from __future__ import annotations

import re
import shutil
from collections.abc import Iterator
from pathlib import Path

import anthropic
import openai
import pytest

from tests.support.envoy_proc import EnvoyProcess
from tests.support.fake_llm import FakeLLMThread
from tests.support.procs import wait_until
from tests.support.service import AuthzService

pytestmark = pytest.mark.e2e
EXAMPLES = Path(__file__).resolve().parents[2] / "examples"
KEY = "sk-demo-alice"  # examples/policy.yaml: org acme, user alice (user-daily: 20,000)
HI = [{"role": "user", "content": "hi"}]  # input estimate 5 tokens
CAP = (15_960 - 5) // 4  # 3,988: what fits of 15,960 units with output at 4x


def _start(workdir: Path, authz_port: int, policy: str) -> AuthzService:
    (workdir / "dev").mkdir()
    shutil.copy(EXAMPLES / "dev" / "jwks.json", workdir / "dev" / "jwks.json")
    (workdir / "policy.yaml").write_text(policy)
    return AuthzService(workdir / "policy.yaml", grpc_port=authz_port, workdir=workdir,
                        extra_args=["--state-dir", str(workdir)])  # fmt: skip


@pytest.fixture
def service(tmp_path: Path, authz_port: int) -> Iterator[AuthzService]:
    """The shipped example policy, as it is (a fresh ledger per test)."""
    with _start(tmp_path, authz_port, (EXAMPLES / "policy.yaml").read_text()) as svc:
        yield svc


@pytest.fixture
def deny_service(tmp_path: Path, authz_port: int) -> Iterator[AuthzService]:
    """The example policy with ``over_reserve: deny`` on the user's budget."""
    policy = (EXAMPLES / "policy.yaml").read_text()
    assert "over_reserve: cap," in policy
    with _start(tmp_path, authz_port, policy.replace("over_reserve: cap,", "over_reserve: deny,")
                ) as svc:  # fmt: skip
        yield svc


def _settled(svc: AuthzService, n: int) -> None:
    def done() -> bool:
        m = re.search(r'^authz_settlements_total\{outcome="settled"\} (\S+)$',
                      svc.metrics_text(), re.M)  # fmt: skip
        return m is not None and float(m.group(1)) >= n

    wait_until(done, timeout=15, what=f"{n} settlements")


@pytest.fixture
def client(envoy: EnvoyProcess) -> Iterator[openai.OpenAI]:
    with openai.OpenAI(base_url=envoy.url + "/v1", api_key=KEY, max_retries=0,
                       timeout=30) as c:  # fmt: skip
        yield c


def _spend_4040(client: openai.OpenAI, svc: AuthzService) -> None:
    """Use 4,040 units: 40 input + 1,000 output x 4; 15,960 left."""
    client.chat.completions.create(
        model="gpt-4o", max_tokens=1000, messages=HI,  # type: ignore[arg-type]
        extra_headers={"x-fake-prompt-tokens": "40", "x-fake-words": "1000"},
    )  # fmt: skip
    _settled(svc, 1)


def _remaining(client: openai.OpenAI) -> int:
    """The user's budget left, as a 429's x-ratelimit-remaining-tokens says."""
    with pytest.raises(openai.RateLimitError) as err:
        client.chat.completions.create(model="gpt-4o", messages=HI)  # type: ignore[arg-type]
    return int(err.value.response.headers["x-ratelimit-remaining-tokens"])


def test_the_locked_out_user_is_served_with_a_cap(
    client: openai.OpenAI, service: AuthzService, fake_llm: FakeLLMThread
) -> None:
    _spend_4040(client, service)
    # No max_tokens, as most SDK calls: the worst case (16,389 units) does not fit.
    # The model would write 5,000 tokens; the upstream reports 3 prompt tokens.
    raw = client.chat.completions.with_raw_response.create(
        model="gpt-4o", messages=HI,  # type: ignore[arg-type]
        extra_headers={"x-fake-prompt-tokens": "3", "x-fake-words": "5000"},
    )  # fmt: skip
    assert raw.headers["x-authz-max-tokens"] == str(CAP)
    answer = raw.parse()
    assert answer.choices[0].finish_reason == "length"
    assert answer.usage is not None and answer.usage.completion_tokens == CAP
    sent = fake_llm.wait_records(2)[-1].body
    assert sent is not None and sent["max_completion_tokens"] == CAP and "max_tokens" not in sent
    _settled(service, 2)
    # Charged what the upstream reported (3 + 3,988 x 4), not the reservation (5 + ...).
    assert _remaining(client) == 20_000 - 4040 - (3 + CAP * 4)


def test_a_capped_stream_has_the_cap_and_usage_in_one_rewrite(
    client: openai.OpenAI, service: AuthzService, fake_llm: FakeLLMThread
) -> None:
    _spend_4040(client, service)
    with client.chat.completions.with_streaming_response.create(
        model="gpt-4o", messages=HI, max_tokens=8000, stream=True,  # type: ignore[arg-type]
        extra_headers={"x-fake-words": "5000", "x-fake-prompt-tokens": "5"},
    ) as resp:  # fmt: skip
        assert resp.headers["x-authz-max-tokens"] == str(CAP)
        finish = [c.choices[0].finish_reason for c in resp.parse() if c.choices]
    assert finish[-1] == "length"
    sent = fake_llm.wait_records(2)[-1].body
    assert sent is not None and sent["max_tokens"] == CAP  # the field the client used
    assert sent["stream_options"] == {"include_usage": True}
    _settled(service, 2)
    assert _remaining(client) == 20_000 - 4040 - (5 + CAP * 4)


def test_anthropic_messages_are_capped(
    envoy: EnvoyProcess, client: openai.OpenAI, service: AuthzService, fake_llm: FakeLLMThread
) -> None:
    _spend_4040(client, service)
    claude = anthropic.Anthropic(base_url=envoy.url, api_key=KEY, max_retries=0, timeout=30)
    with claude:
        _anthropic_capped(claude, fake_llm)


def _anthropic_capped(client: anthropic.Anthropic, fake_llm: FakeLLMThread) -> None:
    raw = client.messages.with_raw_response.create(
        model="claude-test", max_tokens=4096, messages=HI,  # type: ignore[arg-type]
        extra_headers={"x-fake-words": "5000", "x-fake-prompt-tokens": "5"},
    )  # fmt: skip
    assert raw.headers["x-authz-max-tokens"] == str(CAP)
    message = raw.parse()
    assert message.stop_reason == "max_tokens" and message.usage.output_tokens == CAP
    sent = fake_llm.wait_records(2)[-1].body
    assert sent is not None and sent["max_tokens"] == CAP
    # 5 units are left now: too few for min_output_tokens, a 429 in Anthropic's format.
    with pytest.raises(anthropic.RateLimitError) as err:
        client.messages.create(model="claude-test", max_tokens=4096, messages=HI)  # type: ignore[arg-type]
    assert err.value.body["error"]["type"] == "rate_limit_error"  # type: ignore[index]


def test_over_reserve_deny_keeps_the_429(
    client: openai.OpenAI, deny_service: AuthzService, fake_llm: FakeLLMThread
) -> None:
    _spend_4040(client, deny_service)
    with pytest.raises(openai.RateLimitError) as err:
        client.chat.completions.create(model="gpt-4o", messages=HI)  # type: ignore[arg-type]
    assert "needs 16389" in str(err.value)
    assert err.value.response.headers["x-should-retry"] == "false"
    assert "x-authz-max-tokens" not in err.value.response.headers
    assert len(fake_llm.wait_records(1)) == 1  # only the first request went upstream
