"""The usage chunk the service caused, taken out again (authz.mutate.response).

The reference for "what the upstream would have sent" is the same stream without
``include_usage``: the recorded OpenAI stream with the member and the last chunk cut
out by hand, and the fake upstream's two streams (tests/support/fake_llm.py), which
follow OpenAI's format with and without the option.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from authz.apis import Api
from authz.clock import FakeClock
from authz.enforcer import Enforcer
from authz.envoy.extproc import ExternalProcessorServicer
from authz.ledger import MemoryLedger
from authz.mutate.request import RequestChanges
from authz.mutate.response import UsageChunkRemover, usage_remover
from authz.policy.store import PolicyStore
from authz.proto import external_processor_pb2 as pb
from authz.telemetry.metrics import Metrics
from authz.usage.sse import DEFAULT_MAX_EVENT_BYTES
from tests.support.fake_llm import _chat_events, _completion_events, _Turn
from tests.unit import test_settle_extproc as extproc_harness

pytestmark = pytest.mark.unit
BODIES = Path(__file__).parent.parent / "fixtures" / "bodies"
RECORDED = (BODIES / "openai_chat_stream.sse").read_bytes()


def _without_usage(raw: bytes) -> bytes:
    """The recorded stream as OpenAI sends it without include_usage, cut by hand."""
    events = raw.split(b"\n\n")
    kept = [e for e in events if b'"choices":[]' not in e]
    return b"\n\n".join(kept).replace(b',"usage":null', b"")


def _fake(api: str, include_usage: bool, words: int = 6) -> bytes:
    turn = _Turn(api, "chatcmpl-fake000001", "gpt-4o", ["w"] * words, False, 10, 0, 0, 0,
                 include_usage, created=1754829101)  # fmt: skip
    events = _chat_events if api == "chat" else _completion_events
    return b"".join(data for _, data in events(turn))


def _run(chunks: list[bytes]) -> bytes:
    r = UsageChunkRemover()
    out = [r.feed(c, False) for c in chunks]
    out.append(r.feed(b"", True))  # Envoy's last, empty chunk with end_of_stream
    return b"".join(out)


def _split(data: bytes, cuts: list[int]) -> list[bytes]:
    points = sorted({c % (len(data) + 1) for c in cuts})
    return [data[a:b] for a, b in zip([0, *points], [*points, len(data)], strict=True)]


STREAMS = {
    "recorded": (RECORDED, _without_usage(RECORDED)),
    "fake chat": (_fake("chat", True), _fake("chat", False)),
    "fake completions": (_fake("completions", True), _fake("completions", False)),
    "recorded CRLF": (
        RECORDED.replace(b"\n", b"\r\n"),
        _without_usage(RECORDED).replace(b"\n", b"\r\n"),
    ),
}


@pytest.mark.parametrize("name", list(STREAMS))
def test_stream_becomes_what_the_upstream_sends_without_include_usage(name: str) -> None:
    raw, expected = STREAMS[name]
    assert b'"usage":null' in raw and expected != raw
    assert _run([raw]) == expected
    assert b'"choices":[]' not in expected and b'"usage"' not in expected


@settings(max_examples=300, deadline=None)
@given(
    name=st.sampled_from(list(STREAMS)),
    cuts=st.lists(st.integers(min_value=0, max_value=10_000), max_size=40),
)
def test_any_split_gives_the_unsplit_result(name: str, cuts: list[int]) -> None:
    raw, expected = STREAMS[name]
    assert _run(_split(raw, cuts)) == expected


@settings(max_examples=200, deadline=None)
@given(data=st.data())
def test_mixed_line_ends_and_spacing_any_split(data: st.DataObject) -> None:
    """Each event with its own line ends (LF, CRLF, CR) and ``data:`` spacing."""
    raw_events = [e for e in RECORDED.split(b"\n\n") if e]
    raw, expected = [], []
    for event in raw_events:
        end = data.draw(st.sampled_from([b"\n", b"\r\n", b"\r"]))
        if data.draw(st.booleans()):
            event = event.replace(b"data: ", b"data:")
        text = event + end + end
        raw.append(text)
        if b'"choices":[]' not in event:
            expected.append(text.replace(b',"usage":null', b""))
    whole = b"".join(raw)
    cuts = data.draw(st.lists(st.integers(0, len(whole)), max_size=60))
    assert _run(_split(whole, cuts)) == b"".join(expected)


_PIECES = [b"data:", b"data: ", b"\n", b"\r", b"\r\n", b": c", b"{", b"}", b"[", b"]", b",",
           b'"usage"', b":", b"null", b'"choices"', b"[]", b'{"total_tokens":1}', b'"x"',
           b"\\", b" ", b"[DONE]", b"\xff"]  # fmt: skip


@settings(max_examples=300, deadline=None)
@given(
    parts=st.lists(st.sampled_from(_PIECES), max_size=80),
    cuts=st.lists(st.integers(0, 2000), max_size=20),
)
def test_any_bytes_any_split_same_result_never_an_error(
    parts: list[bytes], cuts: list[int]
) -> None:
    whole = b"".join(parts)
    assert _run(_split(whole, cuts)) == _run([whole])


def test_byte_by_byte() -> None:
    raw, expected = STREAMS["recorded CRLF"]
    assert _run([raw[i : i + 1] for i in range(len(raw))]) == expected


def test_unchanged_chunk_is_returned_as_is() -> None:
    r = UsageChunkRemover()
    chunk = b'data: {"choices":[{"delta":{"content":"hi"}}]}\n\n'
    assert r.feed(chunk, False) is chunk
    done = b"data: [DONE]\n\n"
    assert r.feed(done, False) is done


def test_incomplete_event_is_held_back_then_sent_whole() -> None:
    r = UsageChunkRemover()
    assert r.feed(b'data: {"choices":[{"delta":{}}],', False) == b""
    assert r.feed(b'"usage":null}\n', False) == b""
    assert r.feed(b"\ndata: [DO", False) == b'data: {"choices":[{"delta":{}}]}\n\n'
    assert r.feed(b"NE]\n\n", True) == b"data: [DONE]\n\n"


def test_incomplete_event_at_end_of_stream_passes_unchanged() -> None:
    r = UsageChunkRemover()
    assert r.feed(b'data: {"a":1,"usage":null}', False) == b""
    assert r.feed(b"", True) == b'data: {"a":1,"usage":null}'


def test_trailing_cr_waits_for_its_lf() -> None:
    r = UsageChunkRemover()
    assert r.feed(b'data: {"a":1,"usage":null}\r\n\r', False) == b""
    assert r.feed(b"\ndata: [DONE]\r\n\r\n", False) == b'data: {"a":1}\r\n\r\ndata: [DONE]\r\n\r\n'


def test_usage_only_chunk_alone_becomes_empty() -> None:
    r = UsageChunkRemover()
    usage = b'data: {"id":"x","choices":[],"usage":{"prompt_tokens":1,"completion_tokens":2}}\n\n'
    assert r.feed(usage, False) == b""


@pytest.mark.parametrize(
    ("event", "expected"),
    [
        (b'data:{"a":1,"usage":null,"b":2}\n\n', b'data:{"a":1,"b":2}\n\n'),  # no space
        (b'data: {"usage":null,"a":1}\n\n', b'data: {"a":1}\n\n'),  # first member
        (b'data: {"usage":null}\n\n', b"data: {}\n\n"),  # the only member
        (b'data: { "a": 1 , "usage" : null }\n\n', b'data: { "a": 1 }\n\n'),
        (b'data: {"a": 1, "usage": null, "b": 2}\n\n', b'data: {"a": 1, "b": 2}\n\n'),
        (b'data: {"a":1,"usage":null}\r\r', b'data: {"a":1}\r\r'),  # lone CRs
        # depth counted after the member, strings with brackets in them skipped
        (
            b'data: {"a":[1,2,3,4,5,6,7],"usage":null,"b":["]"]}\n\n',
            b'data: {"a":[1,2,3,4,5,6,7],"b":["]"]}\n\n',
        ),
        # comments and other fields are kept, byte for byte
        (
            b': keep\nevent: x\nid: 7\ndata: {"a":1,"usage":null}\n\n',
            b': keep\nevent: x\nid: 7\ndata: {"a":1}\n\n',
        ),
        # multi-line data: the member is taken out of the line it is on
        (
            b'data: {"a":1,\ndata: "usage":null,\ndata: "b":2}\n\n',
            b'data: {"a":1,\ndata: \ndata: "b":2}\n\n',
        ),
        (b'data: {"choices": [ ],\ndata:  "usage": {"total_tokens": 3}}\n\n', b""),
    ],
)
def test_member_text_only_is_removed(event: bytes, expected: bytes) -> None:
    assert _run([event]) == expected


@pytest.mark.parametrize(
    "event",
    [
        b"data: [DONE]\n\n",
        b": usage comment\n\n",
        b'data: {"usage":null\n\n',  # not a JSON object
        b'data: not json, "usage":null\n\n',
        b'data: {"a":{"usage":null}}\n\n',  # nested: not what include_usage adds
        b'data: {"a":[{"usage":null}],"b":1}\n\n',
        b'data: {"a":[1,2,3,4,5,6,7],"x":{"usage":null},"b":"}"}\n\n',
        b'data: {"c":"x\\"usage\\":null,\\"y"}\n\n',  # inside a string
        b'data: {"k\\"usage":null}\n\n',  # a key that ends in usage
        b'data: {"usage":null,"usage":null}\n\n',  # two: neither is removed
        b'data: {"a":1,"usage"\ndata: :null}\n\n',  # the member across two data lines
        b'data: {"choices":[],"usage":null}\n\n',  # no usage in it: not the usage chunk
        b'data: {"choices":[{"index":0}],"usage":{"total_tokens":3}}\n\n',  # has choices
        b'data: {"choices":[],"usage":{"total_tokens":3}\n\n',  # does not parse
        b'event: x\ndata: {"choices":[],"usage":7}\n\n',  # usage not an object
        b'data: \xff\xfe"usage"\n\n',
    ],
)
def test_what_it_cannot_read_passes_unchanged(event: bytes) -> None:
    if event == b'data: {"choices":[],"usage":null}\n\n':
        assert _run([event]) == b'data: {"choices":[]}\n\n'  # the null member still goes
        return
    assert _run([event]) == event


def test_an_event_too_big_to_hold_passes_and_the_rest_unchanged() -> None:
    r = UsageChunkRemover()
    big = b"data: " + b"x" * (DEFAULT_MAX_EVENT_BYTES + 1)
    assert r.feed(big, False) == big
    tail = b'\n\ndata: {"a":1,"usage":null}\n\n'
    assert r.feed(tail, False) is tail
    assert r.feed(b"", True) == b""


@pytest.mark.parametrize(
    ("api", "added", "encoding", "used"),
    [
        (Api.OPENAI_CHAT, True, "", True),
        (Api.OPENAI_COMPLETIONS, True, "identity", True),
        (Api.OPENAI_CHAT, False, "", False),  # the client asked for usage itself
        (Api.OPENAI_CHAT, True, "gzip", False),  # compressed: passed as it is
        (Api.ANTHROPIC_MESSAGES, True, "", False),
        (Api.OPENAI_RESPONSES, True, "", False),
    ],
)
def test_only_streams_the_service_changed(api: Api, added: bool, encoding: str, used: bool) -> None:
    changes = RequestChanges(added_include_usage=added)
    assert (usage_remover(api, changes, encoding) is not None) is used


async def test_extproc_sends_rewritten_bytes_and_settles_from_the_upstreams(
    tmp_path: Path,
) -> None:
    """The servicer: body mutations only where the service added include_usage; the
    usage settled is the one in the upstream's bytes that the client never sees."""
    clock = FakeClock()
    ledger = MemoryLedger(clock)
    enf = Enforcer(PolicyStore(extproc_harness._policy(tmp_path)), ledger, clock)
    servicer = ExternalProcessorServicer(enf, Metrics(), handles=extproc_harness.KEYS)
    raw, expected = STREAMS["recorded"]
    for asked in (False, True):
        options = ',"stream_options":{"include_usage":true}' if asked else ""
        body = ('{"model":"gpt-4o","stream":true,"messages":[]' + options + "}").encode()
        rid = await extproc_harness._reserve(enf, body)
        cut = raw.index(b'"choices":[]') - 40  # mid-event: held back, sent next time
        msgs = [
            pb.ProcessingRequest(request_body=pb.HttpBody(body=body, end_of_stream=True)),
            extproc_harness._headers(200, "text/event-stream"),
            pb.ProcessingRequest(response_body=pb.HttpBody(body=raw[:cut])),
            pb.ProcessingRequest(response_body=pb.HttpBody(body=raw[cut:])),
            pb.ProcessingRequest(response_body=pb.HttpBody(end_of_stream=True)),
        ]
        out = await extproc_harness._run(servicer, msgs, rid)
        sent = b""
        for chunk, resp in zip(msgs[2:], out[2:], strict=True):
            mutation = resp.response_body.response.body_mutation
            if mutation.WhichOneof("mutation") is None:
                sent += chunk.response_body.body
            else:
                assert not asked, "a client that asked for usage gets the stream unchanged"
                sent += mutation.body
        assert sent == (raw if asked else expected)
        usage = out[-1].dynamic_metadata.fields["authz.usage"].struct_value.fields
        assert usage["output"].number_value == 12 and usage["cached_input"].number_value == 1152
        assert ledger.open_reservations == 0
