"""Admission control through the real Envoy: a rate-limited team queues, most important
first, and a check that waits past max_wait gets a 429 with retry-after."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator

import openai
import pytest

from tests.e2e.spine_env import token, wait_metric
from tests.support.clients import closing
from tests.support.envoy_proc import EnvoyProcess, Mutator, http_filter
from tests.support.fake_llm import FakeLLMThread
from tests.support.jwks_server import JwksServer
from tests.support.service import AuthzService
from tests.support.tokens import SigningKey, make_rsa_key

pytestmark = pytest.mark.e2e

POLICY = """
version: 1
identity:
  jwt: {{issuer: https://idp.test/, audience: llm-gateway, jwks_url: {jwks}}}
subject:
  org: {{claim: org_id}}
  team: {{claim: team}}
  leaf: [{{level: user, claim: sub}}]
budgets:
  - {{name: org-day, match: {{org: "*"}}, tokens: 10000000, period: day}}
rates:
  - {{name: team-tpm, match: {{team: nlp}}, tokens_per_minute: 300}}
  - {{name: solo-conc, match: {{team: solo}}, concurrent: 1}}
queue:
  max_wait_s: 3
  priority: {{claim: priority, default: 0}}
models:
  rules: [{{match: "gpt-*", max_output_tokens: 100}}]
"""


@pytest.fixture(scope="module")
def envoy_mutate() -> Mutator:
    def mutate(cfg: dict) -> None:  # type: ignore[type-arg]
        # The queue holds a Check up to max_wait: Envoy must wait longer than that.
        http_filter(cfg, "envoy.filters.http.ext_authz")["grpc_service"]["timeout"] = "10s"

    return mutate


@pytest.fixture(scope="module")
def rsa() -> SigningKey:
    return make_rsa_key("adm-rsa")


@pytest.fixture(scope="module")
def service(
    tmp_path_factory: pytest.TempPathFactory, rsa: SigningKey, authz_port: int
) -> Iterator[AuthzService]:
    workdir = tmp_path_factory.mktemp("authz-adm")
    with JwksServer(rsa) as jwks:
        (workdir / "policy.yaml").write_text(POLICY.format(jwks=jwks.url))
        with AuthzService(workdir / "policy.yaml", grpc_port=authz_port, workdir=workdir) as svc:
            yield svc


def client(envoy: EnvoyProcess, tok: str, **headers: str) -> openai.OpenAI:
    return closing(
        openai.OpenAI(
            base_url=envoy.url + "/v1", api_key=tok, max_retries=0, timeout=30,
            default_headers=headers,
        )
    )  # fmt: skip


def stream_call(c: openai.OpenAI, label: str, done: list[str]) -> None:
    try:
        stream = c.chat.completions.create(
            model="gpt-4o", max_tokens=100, stream=True,
            messages=[{"role": "user", "content": label}],
        )  # fmt: skip
        for _ in stream:
            pass
    except openai.APIError as exc:  # recorded, so the test names what failed
        done.append(f"{label}:{type(exc).__name__}")
        return
    done.append(label)


def test_tpm_burst_queues_and_completes_high_priority_first(
    envoy: EnvoyProcess, service: AuthzService, rsa: SigningKey, fake_llm: FakeLLMThread
) -> None:
    # Each request reserves ~105 tokens and settles ~15 (10 in + 5 out) after a slow
    # stream: two fit in the 300 TPM at once; each settlement lets the next one in.
    slow = {"x-fake-chunk-delay-ms": "50"}
    # The holders stream until the test releases them, once the queue has formed: on a
    # busy machine a fixed ~1 s hold could end before the last waiter even arrived.
    hold = {"x-fake-chunk-delay-ms": "50", "x-fake-words": "5", "x-fake-hold": "tpm"}
    done: list[str] = []
    holders = [
        threading.Thread(
            target=stream_call,
            args=(client(envoy, token(rsa, f"h{i}", "acme", team="nlp"), **hold), f"hold{i}", done),
        )
        for i in range(2)
    ]
    for t in holders:
        t.start()
    fake_llm.wait_in_flight(2)  # both holders are streaming: the team's TPM is full
    waiters = []
    for i in range(3):
        for prio in (0, 5):
            tok = token(rsa, f"u{prio}-{i}", "acme", team="nlp", priority=prio)
            waiters.append(
                threading.Thread(
                    target=stream_call, args=(client(envoy, tok, **slow), f"p{prio}-{i}", done)
                )
            )
    for t in waiters:
        t.start()
        time.sleep(0.02)  # low and high priority interleaved, low first each time
    depth = wait_metric(service.http_url, "authz_queue_depth", 6, timeout=20)
    assert depth == 6, f"all six waiters queue behind the holders ({depth})"
    fake_llm.release("tpm")
    for t in holders + waiters:
        t.join(30)
    # Every one served: a waiter kept past max_wait_s would be recorded with its 429.
    assert sorted(done) == sorted([f"hold{i}" for i in range(2)] + [f"p{p}-{i}" for i in range(3) for p in (0, 5)]), done
    # Records are in the order answers ended. Two slots free at once when the holders
    # end, so the queue's first two (p5-0, p5-1) are admitted together and may end in
    # either order; the next settlement admits p5-2 and the one after it p0-0, which can
    # again end either way round. A FIFO queue would have served p0-0 first.
    finished = [r.body["messages"][0]["content"] for r in fake_llm.wait_records(8)]
    queued = [a for a in finished if a.startswith("p")]
    assert set(queued[:2]) == {"p5-0", "p5-1"}, finished
    assert "p5-2" in queued[:4] and all(a.startswith("p0") for a in queued[4:]), finished


def test_past_max_wait_gets_429_with_retry_after(
    envoy: EnvoyProcess, service: AuthzService, rsa: SigningKey, fake_llm: FakeLLMThread
) -> None:
    done: list[str] = []
    holder = threading.Thread(
        target=stream_call,
        args=(
            client(
                envoy,
                token(rsa, "solo-1", "acme", team="solo"),
                **{"x-fake-chunk-delay-ms": "1000", "x-fake-words": "5"},
            ),
            "hold",
            done,
        ),
    )
    holder.start()
    fake_llm.wait_in_flight(1)  # the holder streams: the team's one slot is taken
    started = time.monotonic()
    with pytest.raises(openai.RateLimitError) as err:
        client(envoy, token(rsa, "solo-2", "acme", team="solo")).chat.completions.create(
            model="gpt-4o", max_tokens=5, messages=[{"role": "user", "content": "hi"}]
        )
    waited = time.monotonic() - started
    assert 2.5 < waited < 4.5, waited
    assert err.value.response.headers["retry-after"] == "1"
    assert err.value.response.headers["x-should-retry"] == "true"
    assert err.value.body["type"] == "rate_limit_exceeded"  # type: ignore[index]
    holder.join(10)
