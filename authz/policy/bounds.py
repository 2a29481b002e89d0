"""The ``bounds`` policy section: how much one request or response may make us do or charge.

Everything the upstream or the client sends is bounded before it costs memory, event-loop
time or budget. Values and their validation together (the section is small); the reader
``r`` is :class:`authz.policy.loader._Reader`, so errors name ``file:path`` and the value.

    bounds:
      request_body_bytes: 1048576       # Check: a bigger body is handled as truncated
      response_decoded_bytes: 16777216  # a response body decoded past this is not read
      grpc_max_message_bytes: 17825792  # read once, at start (a reload does not resize)
      usage:                            # reported usage above these is clamped to them
        input_factor: 16                # input <= input estimate x 16 + slack_tokens
        output_factor: 4                # output <= output reserved x 4 + slack_tokens
        slack_tokens: 8192
        models:                         # or a model's own maxima, when listed here
          - {match: "gpt-4o*", input_tokens: 128000, output_tokens: 16384}

Why these defaults:
- ``request_body_bytes``: Envoy's ext_authz ``max_request_bytes`` in envoy/envoy.yaml.
  Envoy never sends more, so a bigger body came from elsewhere; it is treated as Envoy's
  truncated body is (``requests.bad_body``) and never parsed.
- ``response_decoded_bytes``: the listener's ``per_connection_buffer_limit_bytes``. Envoy
  refuses a plain body past it, so a compressed one may not inflate past it either.
- ``grpc_max_message_bytes``: the biggest message Envoy sends is an ext_proc request or
  response body BUFFERED up to that same 16 MiB limit; 1 MiB more covers the headers,
  the forwarded metadata and the protobuf framing. A Check is at most 1 MiB + headers.
- ``input_factor``: the estimate counts a token per 4 characters. A byte-level tokenizer
  (GPT's, Claude's) emits at most one token per UTF-8 byte, and a character is at most
  4 bytes: 16 is the most honest text can cost. ``slack_tokens`` covers what the
  estimate prices at a fixed guess (images, files) and the provider's own framing.
- ``output_factor``: providers stop at the request's ``max_tokens``; with no limit in the
  body the reservation is the policy's default, which a model may pass (gpt-4o's own
  cap is 16384, 4x the example policy's 4096). List a model under ``models`` to bound
  it by its real maxima instead.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from fnmatch import fnmatchcase
from typing import Any, NoReturn, Protocol

__all__ = ["BoundsSettings", "ModelMaximum", "UsageBounds", "parse_bounds"]

MIB = 1024 * 1024


@dataclass(frozen=True, slots=True)
class ModelMaximum:
    pattern: str  # shell-style, as in models.rules
    input_tokens: int  # the model's context window: no call reads more
    output_tokens: int  # the most one call can generate (all choices)


@dataclass(frozen=True, slots=True)
class UsageBounds:
    input_factor: float = 16.0
    output_factor: float = 4.0
    slack_tokens: int = 8192
    models: tuple[ModelMaximum, ...] = ()
    _memo: dict[str, ModelMaximum | None] = field(
        default_factory=dict, compare=False, hash=False, repr=False
    )

    def maximum_for(self, model: str) -> ModelMaximum | None:
        """The first ``models`` entry matching ``model`` (memoised, bounded)."""
        if not self.models or not model:
            return None
        try:
            return self._memo[model]
        except KeyError:
            pass
        found = next((m for m in self.models if fnmatchcase(model, m.pattern)), None)
        if len(self._memo) >= 4096:  # model strings come from clients
            self._memo.clear()
        self._memo[model] = found
        return found

    def limits(self, model: str, input_estimate: int, output_reserved: int) -> tuple[int, int]:
        """(most input, most output) tokens one settlement of this request may charge."""
        top = self.maximum_for(model)
        if top is not None:
            return top.input_tokens, top.output_tokens
        slack = self.slack_tokens
        return (
            math.ceil(max(input_estimate, 0) * self.input_factor) + slack,
            math.ceil(max(output_reserved, 0) * self.output_factor) + slack,
        )


@dataclass(frozen=True, slots=True)
class BoundsSettings:
    request_body_bytes: int = MIB
    response_decoded_bytes: int = 16 * MIB
    grpc_max_message_bytes: int = 17 * MIB
    usage: UsageBounds = field(default_factory=UsageBounds)


class _Reader(Protocol):
    def fail(self, path: str, message: str, value: Any = ...) -> NoReturn: ...
    def mapping(
        self, value: Any, path: str, allowed: set[str], required: set[str] = ...
    ) -> Any: ...
    def string(self, value: Any, path: str, pattern: str | None = None) -> str: ...
    def integer(self, value: Any, path: str, minimum: int = 0) -> int: ...
    def number(self, value: Any, path: str, minimum: float = 0.0) -> float: ...
    def items(self, value: Any, path: str, each: Any) -> tuple[Any, ...]: ...


def _model(r: _Reader, raw: Any, p: str) -> ModelMaximum:
    keys = {"match", "input_tokens", "output_tokens"}
    m = r.mapping(raw, p, keys, keys)
    return ModelMaximum(
        r.string(m["match"], f"{p}.match"),
        r.integer(m["input_tokens"], f"{p}.input_tokens", 1),
        r.integer(m["output_tokens"], f"{p}.output_tokens", 1),
    )


def _usage(r: _Reader, raw: Any) -> UsageBounds:
    p, d = "bounds.usage", UsageBounds()
    m = r.mapping(raw, p, {"input_factor", "output_factor", "slack_tokens", "models"})
    return UsageBounds(
        input_factor=r.number(m.get("input_factor", d.input_factor), f"{p}.input_factor", 1.0),
        output_factor=r.number(
            m.get("output_factor", d.output_factor), f"{p}.output_factor", 1.0
        ),
        slack_tokens=r.integer(m.get("slack_tokens", d.slack_tokens), f"{p}.slack_tokens", 0),
        models=r.items(m.get("models"), f"{p}.models", lambda v, q: _model(r, v, q)),
    )


def parse_bounds(r: _Reader, raw: Any) -> BoundsSettings:
    p, d = "bounds", BoundsSettings()
    m = r.mapping(raw, p, {f for f in BoundsSettings.__dataclass_fields__})
    return BoundsSettings(
        request_body_bytes=r.integer(
            m.get("request_body_bytes", d.request_body_bytes), f"{p}.request_body_bytes", 1024
        ),
        response_decoded_bytes=r.integer(
            m.get("response_decoded_bytes", d.response_decoded_bytes),
            f"{p}.response_decoded_bytes",
            65536,
        ),
        grpc_max_message_bytes=r.integer(
            m.get("grpc_max_message_bytes", d.grpc_max_message_bytes),
            f"{p}.grpc_max_message_bytes",
            MIB,
        ),
        usage=_usage(r, m.get("usage", {})),
    )
