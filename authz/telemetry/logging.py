"""Structured JSON logs, one object per line. Never log tokens, keys or prompt text.

A line written inside a span (a Check, a settlement) carries that span's ``trace_id``
and ``span_id``, so logs and traces find each other. With tracing off, the decision
lines carry the ``trace_id`` of the trace Envoy (or the client) started, from the
``traceparent`` it sent (see :func:`trace_ids`).
"""

from __future__ import annotations

import json
import logging
import sys
import time
from collections.abc import Iterable, Mapping
from typing import Any

from opentelemetry import trace

__all__ = ["JsonFormatter", "setup_logging", "trace_ids"]

# Attributes every LogRecord has; anything else was passed in `extra=` and is a field.
_STANDARD = set(vars(logging.LogRecord("", 0, "", 0, "", None, None))) | {"message", "asctime"}
_HEX = frozenset("0123456789abcdef")


def _parse_traceparent(value: str) -> tuple[str, str] | None:
    # version-traceid-parentid-flags, lowercase hex (W3C Trace Context)
    parts = value.strip().split("-")
    if len(parts) < 4 or len(parts[1]) != 32 or len(parts[2]) != 16:
        return None
    trace_id, span_id = parts[1], parts[2]
    if not (set(trace_id) <= _HEX and set(span_id) <= _HEX) or trace_id == "0" * 32:
        return None
    return trace_id, span_id


def trace_ids(
    metadata: Iterable[tuple[str, Any]] | None, headers: Mapping[str, str] | None = None
) -> tuple[str, str] | None:
    """(trace_id, parent span id) from gRPC metadata, else from the HTTP headers."""
    for key, value in metadata or ():
        if key == "traceparent" and isinstance(value, str):
            found = _parse_traceparent(value)
            if found is not None:
                return found
    if headers and headers.get("traceparent"):
        return _parse_traceparent(headers["traceparent"])
    return None


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        out: dict[str, Any] = {
            "ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
            + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
        }
        ctx = trace.get_current_span().get_span_context()
        if ctx.is_valid:
            out["trace_id"] = format(ctx.trace_id, "032x")
            out["span_id"] = format(ctx.span_id, "016x")
        for key, value in vars(record).items():
            if key not in _STANDARD and not key.startswith("_"):
                out[key] = value
        if record.exc_info:
            out["exc"] = self.formatException(record.exc_info)
        return json.dumps(out, default=str)


def setup_logging(level: str = "info") -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
