"""Through the real Envoy, a streamed answer is what the upstream would have sent the
client (issue 10, finding 1), and still settles exactly what the upstream reported.

The service adds ``stream_options.include_usage`` to OpenAI streams to settle them
exactly; the upstream then adds ``"usage": null`` to every chunk and a last chunk with
``"choices": []``, on which the loop everyone writes (``chunk.choices[0]``) raised
IndexError. Byte-for-byte references come from the fake upstream itself, asked
directly (no Envoy) with the same request and the same response id and timestamp.
The fake writes in small pieces (``x-fake-split-bytes``) so Envoy's chunks cut across
events, as a real upstream's may.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import anthropic
import httpx
import openai
import pytest

from tests.e2e.spine_env import metric, token, wait_metric, write_policy
from tests.support.envoy_proc import EnvoyProcess
from tests.support.fake_llm import FakeLLMThread
from tests.support.jwks_server import JwksServer
from tests.support.service import AuthzService
from tests.support.tokens import SigningKey, make_ec_key, make_rsa_key

pytestmark = pytest.mark.e2e

PROMPT, WORDS = 23, 7
WORDS_TEXT = "alpha bravo charlie delta echo foxtrot golf"
FAKE = {
    "x-fake-prompt-tokens": str(PROMPT),
    "x-fake-words": str(WORDS),
    "x-fake-created": "1754829101",
    "x-fake-split-bytes": "37",
}
MESSAGES = [{"role": "user", "content": "hi"}]


@pytest.fixture(scope="module")
def rsa() -> SigningKey:
    return make_rsa_key("fidelity-rsa")


@pytest.fixture(scope="module")
def jwks(rsa: SigningKey) -> Iterator[JwksServer]:
    with JwksServer(rsa, make_ec_key("fidelity-ec")) as server:
        yield server


@pytest.fixture(scope="module")
def service(
    tmp_path_factory: pytest.TempPathFactory, jwks: JwksServer, authz_port: int
) -> Iterator[AuthzService]:
    workdir = tmp_path_factory.mktemp("authz")
    policy = write_policy(workdir / "policy.yaml", jwks.url, burst_tokens=1000)
    with AuthzService(policy, grpc_port=authz_port, workdir=workdir) as svc:
        yield svc


@pytest.fixture
def gw(envoy: EnvoyProcess, service: AuthzService, fake_llm: FakeLLMThread) -> EnvoyProcess:
    return envoy


def _oai(gw: EnvoyProcess, tok: str, **headers: str) -> openai.OpenAI:
    return openai.OpenAI(
        base_url=gw.url + "/v1", api_key=tok, max_retries=0, timeout=20,
        default_headers={**FAKE, **headers},
    )  # fmt: skip


def _settled(service: AuthzService, org: str, model: str = "gpt-*") -> tuple[float, float]:
    """(input, output) tokens the service settled for ``org``, once both arrived."""
    labels = {"org": org, "model": model}
    out = wait_metric(service.http_url, "authz_tokens_total", WORDS, kind="output", **labels)
    return metric(service.http_url, "authz_tokens_total", kind="input", **labels), out


def _raw(url: str, path: str, body: dict[str, Any], headers: dict[str, str]) -> bytes:
    with httpx.Client(timeout=20) as client:
        resp = client.post(url + path, json=body, headers={**FAKE, **headers})
        assert resp.status_code == 200, resp.text
        assert resp.headers["content-type"].startswith("text/event-stream")
        return resp.content


def _through_and_direct(
    gw: EnvoyProcess, fake: FakeLLMThread, tok: str, path: str, body: dict[str, Any], rid: str
) -> tuple[bytes, bytes]:
    """(what the client got through Envoy, what the upstream sends this request as is)."""
    ids = {"x-fake-id": rid}
    seen = _raw(gw.url, path, body, {"authorization": f"Bearer {tok}", **ids})
    fake.wait_records(1)
    direct = _raw(fake.url, path, body, ids)
    fake.wait_records(2)
    return seen, direct


@pytest.mark.parametrize(
    ("path", "model", "extra"),
    [
        ("/v1/chat/completions", "gpt-4o", {"messages": MESSAGES}),
        ("/v1/completions", "gpt-3.5-turbo-instruct", {"prompt": "hi"}),
    ],
)
def test_raw_sse_bytes_are_what_the_upstream_sends_without_include_usage(
    gw: EnvoyProcess,
    rsa: SigningKey,
    service: AuthzService,
    fake_llm: FakeLLMThread,
    path: str,
    model: str,
    extra: dict[str, Any],
) -> None:
    org = "raw-" + model
    body = {"model": model, "max_tokens": 50, "stream": True, **extra}
    seen, direct = _through_and_direct(
        gw, fake_llm, token(rsa, "raw", org), path, body, "cmpl-raw1"
    )
    upstream = fake_llm.records[0]
    assert upstream.include_usage and upstream.usage_reported  # the service asked for it
    assert not fake_llm.records[1].include_usage
    assert b'"usage"' not in seen and b"[DONE]" in seen
    assert seen == direct
    assert _settled(service, org) == (PROMPT, WORDS)  # exact, from the upstream's bytes


def test_unfinished_last_event_reaches_the_client_at_end_of_stream(
    gw: EnvoyProcess, rsa: SigningKey, fake_llm: FakeLLMThread
) -> None:
    """Held back for want of its blank line, the upstream's last bytes still arrive:
    the service sends them in Envoy's end_of_stream message."""
    body = {"model": "gpt-4o", "messages": MESSAGES, "max_tokens": 50, "stream": True}
    end = {"x-fake-unterminated": "1"}
    tok = token(rsa, "cut", "unterminated")
    seen = _raw(gw.url, "/v1/chat/completions", body, {"authorization": f"Bearer {tok}",
                "x-fake-id": "c-cut", **end})  # fmt: skip
    fake_llm.wait_records(1)
    direct = _raw(fake_llm.url, "/v1/chat/completions", body, {"x-fake-id": "c-cut", **end})
    assert seen == direct and seen.endswith(b"\n\ndata: [DONE]")


def test_stream_with_content_length_is_rewritten_whole(
    gw: EnvoyProcess, rsa: SigningKey, service: AuthzService, fake_llm: FakeLLMThread
) -> None:
    """An upstream (or a proxy before it) that sends a stream with Content-Length: the
    body gets shorter. Envoy 1.40 drops the header itself for a body ext_proc streams
    (checked: the client gets it chunked), so the service need not."""
    body = {"model": "gpt-4o", "messages": MESSAGES, "max_tokens": 50, "stream": True}
    whole = {"x-fake-content-length": "1", "x-fake-id": "c-len"}
    tok = token(rsa, "len", "content-length")
    seen = _raw(gw.url, "/v1/chat/completions", body, {"authorization": f"Bearer {tok}", **whole})
    assert fake_llm.wait_records(1)[0].usage_reported
    direct = _raw(fake_llm.url, "/v1/chat/completions", body, whole)
    assert seen == direct
    assert _settled(service, "content-length") == (PROMPT, WORDS)


def test_client_that_asked_for_usage_gets_the_stream_unchanged(
    gw: EnvoyProcess, rsa: SigningKey, service: AuthzService, fake_llm: FakeLLMThread
) -> None:
    body = {
        "model": "gpt-4o", "messages": MESSAGES, "max_tokens": 50, "stream": True,
        "stream_options": {"include_usage": True},
    }  # fmt: skip
    seen, direct = _through_and_direct(
        gw, fake_llm, token(rsa, "asker", "asker"), "/v1/chat/completions", body, "c-ask"
    )
    assert seen == direct and b'"choices":[]' in seen and seen.count(b'"usage":null') == WORDS + 2
    assert _settled(service, "asker") == (PROMPT, WORDS)

    with _oai(gw, token(rsa, "asker-sdk", "asker-sdk")) as client:
        chunks = list(
            client.chat.completions.create(
                model="gpt-4o", messages=MESSAGES, max_tokens=50, stream=True,  # type: ignore[arg-type]
                stream_options={"include_usage": True},
            )
        )  # fmt: skip
    assert chunks[-1].choices == [] and chunks[-1].usage is not None
    assert chunks[-1].usage.prompt_tokens == PROMPT
    assert chunks[-1].usage.completion_tokens == WORDS


def test_openai_sdk_sync_loop(
    gw: EnvoyProcess, rsa: SigningKey, service: AuthzService, fake_llm: FakeLLMThread
) -> None:
    with _oai(gw, token(rsa, "loop", "sdk-sync")) as client:
        stream = client.chat.completions.create(
            model="gpt-4o", messages=MESSAGES, max_tokens=50, stream=True  # type: ignore[arg-type]
        )  # fmt: skip
        text = ""
        for chunk in stream:  # the loop everyone writes: IndexError on the usage chunk
            text += chunk.choices[0].delta.content or ""
            assert chunk.usage is None
    assert text == WORDS_TEXT
    assert fake_llm.wait_records(1)[0].include_usage
    assert _settled(service, "sdk-sync") == (PROMPT, WORDS)


async def test_openai_sdk_async_loop(
    gw: EnvoyProcess, rsa: SigningKey, service: AuthzService, fake_llm: FakeLLMThread
) -> None:
    async with openai.AsyncOpenAI(
        base_url=gw.url + "/v1", api_key=token(rsa, "aloop", "sdk-async"), max_retries=0,
        timeout=20, default_headers=FAKE,
    ) as client:  # fmt: skip
        stream = await client.chat.completions.create(
            model="gpt-4o",
            messages=MESSAGES,
            max_tokens=50,
            stream=True,  # type: ignore[arg-type]
        )
        text = ""
        async for chunk in stream:
            text += chunk.choices[0].delta.content or ""
    assert text == WORDS_TEXT
    assert _settled(service, "sdk-async") == (PROMPT, WORDS)


def test_openai_sdk_with_streaming_response(
    gw: EnvoyProcess, rsa: SigningKey, service: AuthzService, fake_llm: FakeLLMThread
) -> None:
    with (
        _oai(gw, token(rsa, "wsr", "sdk-wsr")) as client,
        client.chat.completions.with_streaming_response.create(
            model="gpt-4o", messages=MESSAGES, max_tokens=50, stream=True  # type: ignore[arg-type]
        ) as response,
    ):  # fmt: skip
        assert response.headers["content-type"].startswith("text/event-stream")
        text = "".join(chunk.choices[0].delta.content or "" for chunk in response.parse())
    assert text == WORDS_TEXT
    assert _settled(service, "sdk-wsr") == (PROMPT, WORDS)


def test_openai_sdk_legacy_completions_stream(
    gw: EnvoyProcess, rsa: SigningKey, service: AuthzService, fake_llm: FakeLLMThread
) -> None:
    with _oai(gw, token(rsa, "legacy", "sdk-legacy")) as client:
        stream = client.completions.create(
            model="gpt-3.5-turbo-instruct", prompt="hi", max_tokens=50, stream=True
        )
        text = "".join(chunk.choices[0].text for chunk in stream)
    assert text == WORDS_TEXT
    assert fake_llm.wait_records(1)[0].include_usage
    assert _settled(service, "sdk-legacy") == (PROMPT, WORDS)


def test_anthropic_stream_helpers_unchanged(
    gw: EnvoyProcess, rsa: SigningKey, service: AuthzService, fake_llm: FakeLLMThread
) -> None:
    tok = token(rsa, "claude", "anthro-fidelity")
    body = {"model": "claude-sonnet-4", "max_tokens": 50, "messages": MESSAGES, "stream": True}
    seen, direct = _through_and_direct(gw, fake_llm, tok, "/v1/messages", body, "msg_fid")
    assert seen == direct and b"message_delta" in seen
    fake_llm.reset()
    with (
        anthropic.Anthropic(
            base_url=gw.url, api_key=tok, max_retries=0, timeout=20, default_headers=FAKE
        ) as client,
        client.messages.stream(model="claude-sonnet-4", max_tokens=50, messages=MESSAGES) as s,
    ):
        text = "".join(s.text_stream)
        final = s.get_final_message()
    assert text == WORDS_TEXT
    assert final.usage.output_tokens == WORDS and final.usage.input_tokens == PROMPT
    assert "stream_options" not in fake_llm.wait_records(1)[0].body
    labels = {"org": "anthro-fidelity", "model": "claude-*"}
    out = wait_metric(service.http_url, "authz_tokens_total", 2 * WORDS, kind="output", **labels)
    assert out == 2 * WORDS
    assert metric(service.http_url, "authz_tokens_total", kind="input", **labels) == 2 * PROMPT


def test_responses_api_stream_unchanged(
    gw: EnvoyProcess, rsa: SigningKey, service: AuthzService, fake_llm: FakeLLMThread
) -> None:
    body = {"model": "gpt-4o", "input": "hi", "max_output_tokens": 50, "stream": True}
    seen, direct = _through_and_direct(
        gw, fake_llm, token(rsa, "resp", "responses"), "/v1/responses", body, "resp_fid"
    )
    assert seen == direct and b"response.completed" in seen
    completed = [line for line in seen.split(b"\n") if b'"response.completed"' in line][-1]
    assert json.loads(completed[len(b"data: ") :])["response"]["usage"]["output_tokens"] == WORDS
    assert _settled(service, "responses") == (PROMPT, WORDS)
