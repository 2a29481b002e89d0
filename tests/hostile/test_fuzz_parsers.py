"""Fuzzing what crosses the trust boundary: request bodies in, response bodies and usage out.

Properties (hypothesis, the bounded ``hostile`` profile; each test well under 10 s):
- the body estimate raises nothing but BodyError, and never reserves less than a plain
  reading of the body would (whichever of duplicate keys an upstream takes);
- the usage parsers, fed JSON, SSE split anywhere, gzip/deflate split anywhere, or a
  bomb, never raise, never charge below zero or above the bounds, and stay within a
  memory ceiling; how a body is split never changes what it settles.
"""

from __future__ import annotations

import contextlib
import functools
import json
import math
import tracemalloc
import zlib
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from authz.apis import Api
from authz.errors import BodyError
from authz.estimate import estimate_request
from authz.policy.bounds import BoundsSettings
from authz.settle import Outcome, ReservationInfo, ResponseTracker
from authz.usage.bounds import LEDGER_MAX_TOKENS

pytestmark = [pytest.mark.unit]
MIB = 1024 * 1024
APIS = list(Api)

# -- the request body -------------------------------------------------------------------

json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**70), 2**70) | st.floats() | st.text(max_size=20),
    lambda kids: st.lists(kids, max_size=4) | st.dictionaries(st.text(max_size=8), kids, max_size=4),
    max_leaves=20,
)
request_keys = st.sampled_from(
    ["model", "messages", "input", "prompt", "system", "tools", "instructions", "stream",
     "stream_options", "max_tokens", "max_completion_tokens", "max_output_tokens", "n",
     "best_of", "content", "role", "type", "text"]
)  # fmt: skip


@given(st.sampled_from(APIS), st.binary(max_size=300))
def test_estimate_of_any_bytes_raises_only_body_error(api: Api, raw: bytes) -> None:
    with contextlib.suppress(BodyError):
        estimate_request(api, raw)


@given(st.sampled_from(APIS), st.dictionaries(request_keys, json_values, max_size=8))
def test_estimate_of_any_object_raises_only_body_error(api: Api, obj: dict[str, Any]) -> None:
    try:
        raw = json.dumps(obj).encode()
    except ValueError:  # NaN and friends: json.dumps writes them, fine either way
        return
    try:
        est = estimate_request(api, raw)
    except BodyError:
        return
    assert est.input_tokens >= 0 and (est.max_output_tokens or 0) >= 0


def _encode(pairs: list[tuple[str, Any]]) -> str:
    """A JSON object from pairs, keeping duplicate keys (json.dumps cannot)."""
    return "{" + ",".join(f"{json.dumps(k)}:{v}" for k, v in pairs) + "}"


def _first_wins(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in pairs:
        out.setdefault(k, v)
    return out


contents = st.text(max_size=40)
limit_keys = st.sampled_from(["max_tokens", "max_completion_tokens", "max_output_tokens"])


@st.composite
def chat_bodies(draw: st.DrawFn) -> str:
    messages = []
    for _ in range(draw(st.integers(0, 4))):
        pairs = [("role", '"user"')]
        for _ in range(draw(st.integers(1, 2))):  # 2: a duplicate "content"
            pairs.append(("content", json.dumps(draw(contents))))
        messages.append(_encode(draw(st.permutations(pairs))))
    top = [("model", '"gpt-4o"'), ("messages", "[" + ",".join(messages) + "]")]
    for _ in range(draw(st.integers(0, 3))):
        top.append((draw(limit_keys), str(draw(st.integers(0, 10**6)))))
    if draw(st.booleans()):
        top.append(("n", str(draw(st.integers(1, 4)))))
    return _encode(draw(st.permutations(top)))


@given(chat_bodies())
def test_estimate_never_below_a_plain_reading(raw: str) -> None:
    try:
        est = estimate_request(Api.OPENAI_CHAT, raw.encode())
    except BodyError as exc:
        assert "duplicate key" in str(exc)  # the only refusal these bodies can earn
        return
    for reading in (json.loads(raw), json.loads(raw, object_pairs_hook=_first_wins)):
        chars = sum(len(m["content"]) for m in reading["messages"])
        assert est.input_tokens >= math.ceil(chars / 4)
        limits = [reading[k] for k in ("max_tokens", "max_completion_tokens",
                                       "max_output_tokens") if k in reading]  # fmt: skip
        if limits:
            assert est.max_output_tokens is not None
            assert est.max_output_tokens >= max(limits) * reading.get("n", 1)


# -- the response body ------------------------------------------------------------------

INFO = ReservationInfo("r@acme", Api.OPENAI_CHAT, 40, 500, org="acme", model="gpt-4o")
BOUNDS = BoundsSettings(response_decoded_bytes=4 * MIB)
MAX_IN, MAX_OUT = BOUNDS.usage.limits("gpt-4o", 40, 500)
counts = st.one_of(
    st.integers(-(2**64), 2**64),
    st.sampled_from([10**18, 2**53 + 1, 2**63, -1, 0]),
    st.floats(allow_nan=False),
    st.text(max_size=4),
    st.none(),
)
usage_objects = st.fixed_dictionaries(
    {},
    optional={
        "prompt_tokens": counts,
        "completion_tokens": counts,
        "prompt_tokens_details": st.fixed_dictionaries({}, optional={"cached_tokens": counts}),
        "completion_tokens_details": st.fixed_dictionaries(
            {}, optional={"reasoning_tokens": counts}
        ),
    },
)


def _check(out: Outcome | None) -> Outcome:
    assert out is not None
    u = out.usage
    for n in (u.input_tokens, u.cached_input_tokens, u.output_tokens, u.reasoning_tokens):
        assert 0 <= n <= LEDGER_MAX_TOKENS
    assert u.total_input <= MAX_IN and u.output_tokens <= MAX_OUT
    return out


def _sse(usages: list[dict[str, Any]]) -> bytes:
    events = [b'data: {"choices":[{"delta":{"content":"hello"}}]}\n\n']
    events += [b"data: " + json.dumps({"choices": [], "usage": u}).encode() + b"\n\n"
               for u in usages]  # fmt: skip
    return b"".join(events) + b"data: [DONE]\n\n"


def _split(data: bytes, cuts: list[int]) -> list[bytes]:
    points = sorted({c % (len(data) + 1) for c in cuts})
    return [data[a:b] for a, b in zip([0, *points], [*points, len(data)], strict=True)]


def _run(ctype: str, coding: str, pieces: list[bytes]) -> Outcome:
    t = ResponseTracker(INFO, BOUNDS)
    t.on_headers(200, ctype, coding)
    for piece in pieces:
        t.on_body(piece, False)
    return _check(t.on_body(b"", True))


def _compress(data: bytes, coding: str) -> bytes:
    wbits = {"gzip": 31, "deflate": 15, "raw": -15}[coding]
    z = zlib.compressobj(6, zlib.DEFLATED, wbits)
    return z.compress(data) + z.flush()


@given(usage_objects)
def test_json_usage_never_raises_and_stays_bounded(usage: dict[str, Any]) -> None:
    _run("application/json", "", [json.dumps({"choices": [], "usage": usage}).encode()])


@given(st.lists(usage_objects, max_size=3), st.lists(st.integers(0, 10**6), max_size=12))
def test_sse_split_anywhere_settles_alike(usages: list[dict[str, Any]], cuts: list[int]) -> None:
    data = _sse(usages)
    assert _run("text/event-stream", "", _split(data, cuts)) == _run(
        "text/event-stream", "", [data]
    )


@given(
    st.lists(usage_objects, max_size=2),
    st.sampled_from(["gzip", "deflate", "raw"]),
    st.booleans(),
    st.lists(st.integers(0, 10**6), max_size=12),
)
def test_compressed_split_anywhere_settles_like_plain(
    usages: list[dict[str, Any]], coding: str, sse: bool, cuts: list[int]
) -> None:
    ctype = "text/event-stream" if sse else "application/json"
    plain = _sse(usages) if sse else json.dumps({"usage": usages[0] if usages else {}}).encode()
    header = "deflate" if coding == "raw" else coding
    zipped = _split(_compress(plain, coding), cuts)
    assert _run(ctype, header, zipped) == _run(ctype, "", [plain])


@functools.cache
def _bomb(coding: str, unit: bytes) -> bytes:
    """8 MiB of ``unit`` repeated, compressed: about 1000:1."""
    z = zlib.compressobj(9, zlib.DEFLATED, {"gzip": 31, "deflate": 15, "raw": -15}[coding])
    block = unit * (MIB // len(unit))
    return b"".join(z.compress(block) for _ in range(8)) + z.flush()


@settings(max_examples=8)
@given(
    st.sampled_from(["gzip", "deflate", "raw"]),
    st.sampled_from(["application/json", "text/event-stream"]),
    st.sampled_from([b"\0", b"\n", b"data: x\n\n", b"{"]),
    st.lists(st.integers(0, 10**5), max_size=6),
)
def test_bombs_stay_within_the_memory_ceiling(
    coding: str, ctype: str, unit: bytes, cuts: list[int]
) -> None:
    data = _bomb(coding, unit)
    tracemalloc.start()
    try:
        out = _run(ctype, "deflate" if coding == "raw" else coding, _split(data, cuts))
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert out.bound is not None and out.bound.reason == "decoded_too_large"
    assert out.usage.total == 40 + 500
    assert peak < 3 * BOUNDS.response_decoded_bytes  # the ceiling, plus its copies


@given(
    st.lists(usage_objects, min_size=1, max_size=3),
    st.lists(st.lists(st.sampled_from([b"\n", b"\r\n", b"\r"]), min_size=1, max_size=6),
             min_size=4, max_size=4),
    st.lists(st.integers(0, 10**6), max_size=8),
)  # fmt: skip
def test_runs_of_line_ends_read_like_one_blank_line(
    usages: list[dict[str, Any]], runs: list[list[bytes]], cuts: list[int]
) -> None:
    """Blank lines are collapsed in C (authz.usage.sse): the events read the same."""
    plain = _sse(usages)
    events = plain.split(b"\n\n")
    noisy = b"".join(e + b"\n" + b"".join(runs[i % 4]) for i, e in enumerate(events) if e)
    assert _run("text/event-stream", "", _split(noisy, cuts)) == _run(
        "text/event-stream", "", [plain]
    )
