"""OpenTelemetry SDK set-up from the standard ``OTEL_*`` environment variables.

Each signal (traces, logs, metrics) is **off unless configured**: it is on when
``OTEL_<SIGNAL>_EXPORTER`` is ``otlp`` (or ``console``), or when it is unset and an OTLP
endpoint is given (``OTEL_EXPORTER_OTLP_ENDPOINT`` or ``OTEL_EXPORTER_OTLP_<SIGNAL>_ENDPOINT``).
The spec's default exporter is ``otlp``; we deviate on purpose, so a service started
without any telemetry settings never tries to reach a collector that is not there.
``OTEL_SDK_DISABLED=true`` turns everything off.

The transport is ``OTEL_EXPORTER_OTLP_<SIGNAL>_PROTOCOL`` or ``OTEL_EXPORTER_OTLP_PROTOCOL``:
``grpc`` or ``http/protobuf`` (the spec's default). Endpoint, headers, timeout, TLS and
compression are read by the exporters themselves; ``OTEL_TRACES_SAMPLER`` (+ ``_ARG``) by
the tracer provider (default ``parentbased_always_on``: Envoy's sampling decision wins);
``OTEL_SERVICE_NAME`` and ``OTEL_RESOURCE_ATTRIBUTES`` by the resource (service name
defaults to ``authz``); ``OTEL_BSP_*`` / ``OTEL_BLRP_*`` / ``OTEL_METRIC_EXPORT_INTERVAL``
by the batch processors and metric reader.

Only this module and :mod:`authz.telemetry.tracing` import the OpenTelemetry SDK.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

__all__ = ["OtelSetup", "signal_config", "start_otel"]

log = logging.getLogger("authz.telemetry")

Signal = Literal["traces", "logs", "metrics"]
_PROTOCOLS = ("grpc", "http/protobuf")


@dataclass(frozen=True, slots=True)
class SignalConfig:
    exporter: Literal["otlp", "console"]
    protocol: str


def signal_config(signal: Signal, env: Mapping[str, str]) -> SignalConfig | None:
    """How ``signal`` is to be exported, or None when it is off. Raises ValueError on nonsense."""
    if env.get("OTEL_SDK_DISABLED", "").strip().lower() == "true":
        return None
    upper = signal.upper()
    exporter = env.get(f"OTEL_{upper}_EXPORTER", "").strip().lower()
    if not exporter:
        endpoint = env.get(f"OTEL_EXPORTER_OTLP_{upper}_ENDPOINT") or env.get(
            "OTEL_EXPORTER_OTLP_ENDPOINT"
        )
        if not endpoint:
            return None
        exporter = "otlp"
    first = exporter.split(",")[0].strip()
    if first == "none":
        return None
    if first not in ("otlp", "console"):
        raise ValueError(f"OTEL_{upper}_EXPORTER: must be otlp, console or none (got {exporter!r})")
    protocol = (
        env.get(f"OTEL_EXPORTER_OTLP_{upper}_PROTOCOL")
        or env.get("OTEL_EXPORTER_OTLP_PROTOCOL")
        or "http/protobuf"
    ).strip()
    if protocol not in _PROTOCOLS:
        raise ValueError(
            f"OTEL_EXPORTER_OTLP_PROTOCOL: must be grpc or http/protobuf (got {protocol!r})"
        )
    return SignalConfig(exporter=first, protocol=protocol)  # type: ignore[arg-type]


@dataclass
class OtelSetup:
    """The providers that were started; ``shutdown()`` flushes and stops them."""

    tracer_provider: Any = None
    logger_provider: Any = None
    meter_provider: Any = None
    _closers: list[Any] = field(default_factory=list)

    @property
    def tracer(self) -> Any:
        if self.tracer_provider is None:
            return None
        return self.tracer_provider.get_tracer("authz")

    def shutdown(self) -> None:
        for provider in (self.tracer_provider, self.logger_provider, self.meter_provider):
            if provider is not None:
                try:
                    provider.shutdown()
                except Exception:  # a collector gone at exit must not fail the stop
                    log.exception("OpenTelemetry shutdown failed")


def _resource(env: Mapping[str, str]) -> Any:
    from opentelemetry.sdk.resources import Resource

    # Attributes passed to create() win over OTEL_RESOURCE_ATTRIBUTES: only default the
    # service name when the operator named none.
    named = env.get("OTEL_SERVICE_NAME") or "service.name=" in env.get(
        "OTEL_RESOURCE_ATTRIBUTES", ""
    )
    return Resource.create({} if named else {"service.name": "authz"})


def _span_exporter(cfg: SignalConfig) -> Any:
    if cfg.exporter == "console":
        from opentelemetry.sdk.trace.export import ConsoleSpanExporter

        return ConsoleSpanExporter()
    if cfg.protocol == "grpc":
        from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter

        return OTLPSpanExporter()
    from opentelemetry.exporter.otlp.proto.http.trace_exporter import (
        OTLPSpanExporter as HttpSpanExporter,
    )

    return HttpSpanExporter()


def _log_exporter(cfg: SignalConfig) -> Any:
    if cfg.exporter == "console":
        from opentelemetry.sdk._logs.export import ConsoleLogRecordExporter

        return ConsoleLogRecordExporter()
    if cfg.protocol == "grpc":
        from opentelemetry.exporter.otlp.proto.grpc._log_exporter import OTLPLogExporter

        return OTLPLogExporter()
    from opentelemetry.exporter.otlp.proto.http._log_exporter import (
        OTLPLogExporter as HttpLogExporter,
    )

    return HttpLogExporter()


def _metric_exporter(cfg: SignalConfig) -> Any:
    if cfg.exporter == "console":
        from opentelemetry.sdk.metrics.export import ConsoleMetricExporter

        return ConsoleMetricExporter()
    if cfg.protocol == "grpc":
        from opentelemetry.exporter.otlp.proto.grpc.metric_exporter import OTLPMetricExporter

        return OTLPMetricExporter()
    from opentelemetry.exporter.otlp.proto.http.metric_exporter import (
        OTLPMetricExporter as HttpMetricExporter,
    )

    return HttpMetricExporter()


def start_otel(env: Mapping[str, str] | None = None) -> OtelSetup:
    """Start what the environment asks for; nothing at all when no OTEL_* is set.

    ``env`` decides which signals are on (tests pass a dict); the exporters, sampler and
    resource read their own settings from the process environment, as the SDK does.

    The SDK is imported only for a signal that is on, so a service without telemetry
    settings does not even load it.
    """
    env = os.environ if env is None else env
    setup = OtelSetup()
    traces = signal_config("traces", env)
    logs = signal_config("logs", env)
    metrics = signal_config("metrics", env)
    if traces is None and logs is None and metrics is None:
        return setup
    resource = _resource(env)
    if traces is not None:
        from opentelemetry.sdk.trace import TracerProvider
        from opentelemetry.sdk.trace.export import BatchSpanProcessor

        # TracerProvider() reads OTEL_TRACES_SAMPLER / OTEL_TRACES_SAMPLER_ARG itself.
        tp = TracerProvider(resource=resource)
        tp.add_span_processor(BatchSpanProcessor(_span_exporter(traces)))
        setup.tracer_provider = tp
    if logs is not None:
        from opentelemetry.sdk._logs import LoggerProvider
        from opentelemetry.sdk._logs.export import BatchLogRecordProcessor

        lp = LoggerProvider(resource=resource)
        lp.add_log_record_processor(BatchLogRecordProcessor(_log_exporter(logs)))
        setup.logger_provider = lp
    if metrics is not None:
        from opentelemetry.sdk.metrics import MeterProvider
        from opentelemetry.sdk.metrics.export import PeriodicExportingMetricReader

        reader = PeriodicExportingMetricReader(_metric_exporter(metrics))
        setup.meter_provider = MeterProvider(resource=resource, metric_readers=[reader])
    log.info(
        "OpenTelemetry on",
        extra={
            "traces": traces.protocol if traces else None,
            "logs": logs.protocol if logs else None,
            "metrics": metrics.protocol if metrics else None,
        },
    )
    return setup
