"""Refusals after admission give the hold back (issue 16): the tracker's rules."""

from __future__ import annotations

import pytest
from google.protobuf import struct_pb2

from authz.apis import Api
from authz.envoy.stream_metadata import from_upstream
from authz.proto import external_processor_pb2 as pb
from authz.settle import BodyMode, ReservationInfo, ResponseTracker
from authz.usage.types import TokenUsage

pytestmark = pytest.mark.unit

INFO = ReservationInfo("r1", Api.OPENAI_CHAT, input_estimate=30, output_reserved=50)


def headers_message(details: str | None) -> pb.ProcessingRequest:
    req = pb.ProcessingRequest(response_headers=pb.HttpHeaders())
    if details is not None:
        attrs = struct_pb2.Struct()
        attrs.update({"response.code": 200, "response.code_details": details})
        req.attributes["envoy.filters.http.ext_proc"].CopyFrom(attrs)
    return req


@pytest.mark.parametrize(
    ("details", "upstream"),
    [
        ("via_upstream", True),
        (None, True),  # a config that does not ask for the attribute: as before
        ("direct_response", False),
        ("lua_response", False),
        ("upstream_reset_before_response_started{connection_refused}", False),
    ],
)
def test_from_upstream_reads_the_code_details(details: str | None, upstream: bool) -> None:
    assert from_upstream(headers_message(details)) is upstream


def test_a_local_200_is_released_not_charged_as_the_estimate() -> None:
    tracker = ResponseTracker(INFO)
    mode = tracker.on_headers(200, "application/json", "", upstream=False)
    assert mode is BodyMode.NONE
    assert tracker.outcome is not None and tracker.outcome.kind == "released"
    assert tracker.outcome.usage == TokenUsage(0, 0, 0)


def test_an_upstream_200_is_still_read() -> None:
    tracker = ResponseTracker(INFO)
    assert tracker.on_headers(200, "application/json", "") is BodyMode.BUFFERED
    assert tracker.outcome is None


def test_a_stream_left_before_its_first_header_is_charged_the_prompt_only() -> None:
    outcome = ResponseTracker(
        ReservationInfo("r2", Api.OPENAI_CHAT, 30, 50, stream=True)
    ).on_abort()
    assert outcome.kind == "aborted"
    assert (outcome.usage.input_tokens, outcome.usage.output_tokens) == (30, 0)


def test_a_json_request_left_before_its_answer_keeps_the_reservation() -> None:
    # The model may finish a non-streamed answer that nobody reads: charged as before.
    outcome = ResponseTracker(INFO).on_abort()
    assert (outcome.usage.input_tokens, outcome.usage.output_tokens) == (30, 50)
