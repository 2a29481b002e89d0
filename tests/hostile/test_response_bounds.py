"""A hostile upstream's response: bombs, codings we do not read, absurd usage (issue 9, 3-4).

Unit tier: the ResponseTracker and the decoder without Envoy; the same attacks through
the real Envoy are in test_upstream_attacks_e2e.py.
"""

from __future__ import annotations

import asyncio
import functools
import gzip
import hashlib
import json
import time
import tracemalloc
import zlib
from pathlib import Path

import pytest

from authz.apis import Api
from authz.audit import AuditTrail
from authz.clock import FakeClock
from authz.decode import MAX_RATIO, SLICE, DecodeRefused, decoder_for
from authz.enforcer import Enforcer
from authz.errors import PolicyError
from authz.ledger import MemoryLedger
from authz.observer import Observers
from authz.policy.bounds import BoundsSettings, ModelMaximum, UsageBounds, parse_bounds
from authz.policy.loader import _Reader
from authz.policy.store import PolicyStore
from authz.settle import BodyMode, ReservationInfo, ResponseTracker
from authz.telemetry.metrics import Metrics
from authz.usage.anthropic import message_usage
from authz.usage.bounds import LEDGER_MAX_TOKENS, bound_usage, ledger_usage
from authz.usage.openai import chat_usage
from authz.usage.types import TokenUsage

pytestmark = [pytest.mark.unit]

INFO = ReservationInfo("r1@acme", Api.OPENAI_CHAT, 40, 500, org="acme", model="gpt-4o")
RESERVED = TokenUsage(40, 0, 500, exact=False)
MIB = 1024 * 1024


@functools.cache
def bomb(decoded: int, wbits: int = 31) -> bytes:
    """``decoded`` bytes of zeros compressed (gzip by default): about 1000:1."""
    z = zlib.compressobj(9, zlib.DEFLATED, wbits)
    block = bytes(MIB)
    return b"".join(z.compress(block) for _ in range(decoded // MIB)) + z.flush()


def chat_body(prompt: int, completion: int) -> bytes:
    usage = {"prompt_tokens": prompt, "completion_tokens": completion}
    return json.dumps({"id": "x", "choices": [], "usage": usage}).encode()


# -- decoding ---------------------------------------------------------------------------


def test_bomb_stops_at_the_ceiling_in_bounded_slices() -> None:
    data = bomb(64 * MIB)
    dec = decoder_for("gzip", 512 * 1024)
    assert dec is not None
    seen = 0
    with pytest.raises(DecodeRefused) as err:
        for piece in dec.decode(data):
            assert len(piece) <= SLICE
            seen += len(piece)
    assert err.value.reason == "decoded_too_large" and seen <= 512 * 1024


def test_ratio_stops_a_bomb_long_before_the_ceiling() -> None:
    data = bomb(64 * MIB)
    dec = decoder_for("gzip", 64 * MIB)
    assert dec is not None
    seen = 0
    with pytest.raises(DecodeRefused):
        for piece in dec.decode(data):
            seen += len(piece)
    assert seen <= MAX_RATIO * len(data) < 8 * MIB


def test_a_big_honest_compressed_body_is_read() -> None:
    rows = [{"embedding": [i * 0.123456789 + j for j in range(64)]} for i in range(5000)]
    raw = json.dumps({"data": rows, "usage": {"prompt_tokens": 9, "total_tokens": 9}}).encode()
    assert len(raw) > 4 * MIB
    t = ResponseTracker(INFO)
    t.on_headers(200, "application/json", "gzip")
    out = t.on_body(gzip.compress(raw), True)
    assert out is not None and out.kind == "settled" and out.usage == TokenUsage(9, 0, 0)


@pytest.mark.parametrize("wbits", [15, -15], ids=["zlib", "raw"])
def test_deflate_zlib_wrapped_and_raw(wbits: int) -> None:
    raw = chat_body(12, 3)
    z = zlib.compressobj(6, zlib.DEFLATED, wbits)
    data = z.compress(raw) + z.flush()
    t = ResponseTracker(INFO)
    t.on_headers(200, "application/json", "deflate")
    t.on_body(data[:1], False)  # one byte: not enough to tell zlib from raw yet
    out = t.on_body(data[1:], True)
    assert out is not None and out.kind == "settled" and out.bound is None
    assert out.usage == TokenUsage(12, 0, 3)


def test_gzip_members_are_all_read() -> None:
    raw = chat_body(12, 3)
    data = gzip.compress(raw[:20]) + gzip.compress(raw[20:])
    t = ResponseTracker(INFO)
    t.on_headers(200, "application/json", "x-gzip")
    out = t.on_body(data, True)
    assert out is not None and out.usage == TokenUsage(12, 0, 3)


def test_corrupt_gzip_settles_from_what_was_read() -> None:
    t = ResponseTracker(INFO)
    t.on_headers(200, "application/json", "gzip")
    out = t.on_body(b"\x1f\x8b\x08\x00garbage", True)
    assert out is not None and out.kind == "estimated" and out.usage == RESERVED


@pytest.mark.parametrize("ctype", ["application/json", "text/event-stream"])
def test_json_bomb_charges_the_reservation(ctype: str) -> None:
    t = ResponseTracker(INFO, BoundsSettings(response_decoded_bytes=2 * MIB))
    t.on_headers(200, ctype, "gzip")
    data = bomb(64 * MIB)
    start = time.thread_time()  # CPU time: a loaded machine stretches wall time
    tracemalloc.start()
    out = t.on_body(data, True)
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    assert time.thread_time() - start < 2.0
    assert peak < 8 * MIB
    assert out is not None and out.usage == RESERVED and out.usage.total > 0
    assert out.bound is not None and out.bound.reason == "decoded_too_large"


@pytest.mark.parametrize("coding", ["br", "zstd", "compress", "gzip, br", "snappy"])
def test_unknown_coding_is_charged_the_reservation_and_not_read(coding: str) -> None:
    t = ResponseTracker(INFO)
    assert t.on_headers(200, "application/json", coding) is BodyMode.NONE
    assert t.outcome is not None and t.outcome.usage == RESERVED
    assert t.outcome.bound is not None and t.outcome.bound.reason == "encoding_unsupported"


async def test_feed_gives_the_loop_back_between_slices() -> None:
    """A 1 MB bomb in one message: other tasks run while it is decoded."""
    t = ResponseTracker(INFO, BoundsSettings(response_decoded_bytes=64 * MIB))
    t.on_headers(200, "text/event-stream", "gzip")
    ticks = 0
    stop = False

    async def ticker() -> None:
        nonlocal ticks
        while not stop:
            ticks += 1
            await asyncio.sleep(0)

    task = asyncio.create_task(ticker())
    out = await t.feed(bomb(64 * MIB), True)
    stop = True
    await task
    assert out is not None and out.bound is not None
    # Stopped at 64x the ~64 KB sent (authz.decode.MAX_RATIO): ~16 slices, the ticker
    # ran between them.
    assert ticks >= 8


# -- usage bounds -----------------------------------------------------------------------


@pytest.mark.parametrize("prompt", [10**18, 2**53 + 1, 2**63, 10**6])
def test_absurd_input_is_clamped_to_the_bound(prompt: int) -> None:
    t = ResponseTracker(INFO)
    t.on_headers(200, "application/json", "")
    out = t.on_body(chat_body(prompt, 7), True)
    most_in, _ = UsageBounds().limits("gpt-4o", 40, 500)
    assert most_in == 40 * 16 + 8192
    assert out is not None and out.usage == TokenUsage(most_in, 0, 7, exact=False)
    assert out.bound is not None and out.bound.reason == "usage_above_bound"
    assert out.bound.reported is not None and out.bound.reported.input_tokens == prompt


def test_absurd_streamed_output_is_clamped() -> None:
    t = ResponseTracker(INFO)
    t.on_headers(200, "text/event-stream", "")
    usage = {"prompt_tokens": 30, "completion_tokens": 10**18}
    t.on_body(b"data: " + json.dumps({"choices": [], "usage": usage}).encode() + b"\n\n", False)
    out = t.on_body(b"data: [DONE]\n\n", True)
    assert out is not None and out.usage == TokenUsage(30, 0, 500 * 4 + 8192, exact=False)


def test_honest_usage_passes_untouched() -> None:
    t = ResponseTracker(INFO)
    t.on_headers(200, "application/json", "")
    out = t.on_body(chat_body(160, 500), True)  # 4x the estimate, all the reserved output
    assert out is not None and out.bound is None and out.usage == TokenUsage(160, 0, 500)


def test_model_maximum_replaces_the_factor() -> None:
    bounds = UsageBounds(models=(ModelMaximum("gpt-4o*", 128_000, 16_384),))
    usage = TokenUsage(100_000, 0, 20_000)
    charged, limits = bound_usage(usage, bounds, "gpt-4o-mini", 40, 500)
    assert limits == (128_000, 16_384) and charged == TokenUsage(100_000, 0, 16_384, exact=False)
    assert bound_usage(usage, bounds, "claude-x", 40, 500)[1] == (40 * 16 + 8192, 2000 + 8192)


def test_clamp_keeps_full_price_input_first() -> None:
    charged, _ = bound_usage(TokenUsage(900, 900, 0), UsageBounds(slack_tokens=0), "m", 10, 0)
    assert charged == TokenUsage(160, 0, 0, exact=False)


def test_invalid_counts_make_the_usage_unreadable() -> None:
    assert chat_usage({"prompt_tokens": 10, "completion_tokens": -5}) is None
    assert chat_usage({"prompt_tokens": 10, "completion_tokens": 1.5}) is None
    assert chat_usage({"prompt_tokens": 10}) == TokenUsage(10, 0, 0)  # embeddings
    assert message_usage({"input_tokens": 1, "output_tokens": 2,
                          "cache_creation_input_tokens": -1}) is None  # fmt: skip


def test_ledger_usage_clamps_every_count() -> None:
    assert ledger_usage(TokenUsage(10**18, -3, 2**63, 2**64)) == TokenUsage(
        LEDGER_MAX_TOKENS, 0, LEDGER_MAX_TOKENS, LEDGER_MAX_TOKENS, exact=False
    )
    fine = TokenUsage(1, 2, 3)
    assert ledger_usage(fine) is fine


@pytest.mark.parametrize(
    ("raw", "where"),
    [
        ({"usage": {"input_factor": 0.5}}, "bounds.usage.input_factor"),
        ({"usage": {"models": [{"match": "x", "input_tokens": 1}]}}, "bounds.usage.models[0]"),
        ({"response_decoded_bytes": 10}, "bounds.response_decoded_bytes"),
        ({"nope": 1}, "bounds.nope"),
    ],
)
def test_bad_bounds_name_file_and_path(raw: dict[str, object], where: str) -> None:
    with pytest.raises(PolicyError) as err:
        parse_bounds(_Reader("p.yaml"), raw)
    assert str(err.value).startswith(f"p.yaml:{where}")


async def test_a_bound_reaches_the_log_and_the_audit_chain(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """The ext_proc servicer hands every Outcome.bound to Enforcer.bounded."""
    digest = hashlib.sha256(b"k").hexdigest()
    policy = tmp_path / "policy.yaml"
    policy.write_text(f"""
version: 1
identity:
  api_keys: [{{name: a, sha256: {digest}, claims: {{org_id: acme, sub: ann}}}}]
subject:
  org: {{claim: org_id}}
  leaf: [{{level: user, claim: sub}}]
budgets: [{{name: d, match: {{user: "*"}}, tokens: 1000, period: day}}]
audit: {{file: audit.jsonl}}
""")
    clock = FakeClock()
    store = PolicyStore(policy)
    trail = AuditTrail(store.current, "memory://", clock, Metrics())
    enforcer = Enforcer(store, MemoryLedger(clock), clock, observer=Observers([trail]))
    t = ResponseTracker(INFO)
    t.on_headers(200, "application/json", "")
    out = t.on_body(chat_body(10**18, 7), True)
    assert out is not None and out.bound is not None
    enforcer.bounded(out.bound)
    await trail.close()
    assert "settlement bounded: usage_above_bound" in caplog.text
    entries = [json.loads(line) for line in (tmp_path / "audit.jsonl").read_text().splitlines()]
    assert [e["kind"] for e in entries] == ["settlement_bounded"]
    data = entries[0]["data"]
    assert data["reason"] == "usage_above_bound" and data["reservation"] == "r1@acme"
    assert data["reported"]["input"] == 10**18 and data["charged"]["input"] == data["max_input"]


async def test_a_big_json_body_is_parsed_after_envoy_got_its_reply() -> None:
    """Envoy waits at most message_timeout (envoy.yaml) for the body's reply; a big body is
    parsed off the loop afterwards, and the settlement waits for it instead."""
    usage = {"prompt_tokens": 33, "completion_tokens": 4}
    raw = json.dumps({"choices": [{"message": {"content": "x" * MIB}}], "usage": usage})
    t = ResponseTracker(INFO)
    t.on_headers(200, "application/json", "")
    placeholder = await t.feed(raw.encode(), True)
    assert placeholder is not None and placeholder.later is not None
    final = await placeholder.resolved()
    assert final.kind == "settled" and final.usage == TokenUsage(33, 0, 4)
    small = ResponseTracker(INFO)
    small.on_headers(200, "application/json", "")
    out = await small.feed(chat_body(33, 4), True)
    assert out is not None and out.later is None and await out.resolved() is out
