"""Observability through the real Envoy: traces, metrics, logs, audit and alerts.

One real Envoy with its own OpenTelemetry tracer, the real service as a subprocess with
OTLP export on, both exporting to a real OTLP/gRPC receiver started here; real JWTs from
a real JWKS endpoint; a real webhook receiver on loopback for the alerts.
"""

from __future__ import annotations

import hmac
import json
import secrets
import signal
import subprocess
import sys
from collections.abc import Iterator
from hashlib import sha256
from pathlib import Path
from typing import Any

import openai
import pytest
from prometheus_client.parser import text_string_to_metric_families

from authz.telemetry.metrics import METRIC_NAMES
from tests.e2e.spine_env import metric, token, wait_metric
from tests.support.clients import closing
from tests.support.envoy_proc import REPO_ROOT, EnvoyProcess, Mutator, cluster
from tests.support.fake_llm import FakeLLMThread
from tests.support.jwks_server import JwksServer
from tests.support.otlp_receiver import OtlpReceiver, Span
from tests.support.procs import wait_until
from tests.support.service import AuthzService
from tests.support.tokens import SigningKey, make_rsa_key
from tests.support.webhook_receiver import WebhookReceiver

pytestmark = pytest.mark.e2e

SECRET = "whsec-" + secrets.token_hex(8)
POLICY = """
version: 1
timezone: UTC
identity:
  jwt:
    issuer: https://idp.test/
    audience: llm-gateway
    algorithms: [RS256]
    jwks_url: {jwks_url}
subject:
  org: {{claim: org_id}}
  department: {{claim: department, missing: skip}}
  leaf: [{{level: user, claim: sub}}]
budgets:
  - {{name: org-default, match: {{org: "*"}}, tokens: {org_tokens}, period: day, over_reserve: deny}}
  - {{name: dept-daily, match: {{department: "*"}}, tokens: 2000, period: day, over_reserve: deny}}
  - {{name: user-daily, match: {{user: "*"}}, tokens: 1000, period: day, over_reserve: deny}}
models:
  rules: [{{match: "gpt-*", max_output_tokens: 50}}]
audit:
  file: audit.jsonl
  denials: true
alerts:
  levels: [department]
  thresholds: [50]
  # A real clock here: only the threshold rule. tests/unit/test_alerts.py drives the
  # predictive and anomaly rules with a fake clock.
  predictive: false
  anomaly: false
  cost_variance: false
  webhooks:
    - {{url: "{hook_url}", secret_env: AUTHZ_TEST_WEBHOOK_SECRET, max_attempts: 3}}
"""


def add_otel_tracing(cfg: dict[str, Any], collector_port: int) -> None:
    """Envoy's own OpenTelemetry tracer, exporting over gRPC to ``collector_port``.

    The same block, commented, is in envoy/envoy.yaml for operators.
    """
    listener = cfg["static_resources"]["listeners"][0]
    hcm = listener["filter_chains"][0]["filters"][0]["typed_config"]
    hcm["tracing"] = {
        "provider": {
            "name": "envoy.tracers.opentelemetry",
            "typed_config": {
                "@type": "type.googleapis.com/envoy.config.trace.v3.OpenTelemetryConfig",
                "grpc_service": {"envoy_grpc": {"cluster_name": "otel_collector"}, "timeout": "1s"},
                "service_name": "envoy",
            },
        },
        "random_sampling": {"value": 100},
    }
    otel = json.loads(json.dumps(cluster(cfg, "authz")))  # an HTTP/2 loopback cluster
    otel["name"] = otel["load_assignment"]["cluster_name"] = "otel_collector"
    otel.pop("circuit_breakers", None)
    endpoint = otel["load_assignment"]["endpoints"][0]["lb_endpoints"][0]["endpoint"]
    endpoint["address"]["socket_address"] = {"address": "127.0.0.1", "port_value": collector_port}
    cfg["static_resources"]["clusters"].append(otel)
    # Envoy batches spans for 5 s by default; the test wants them at once.
    static = cfg["layered_runtime"]["layers"][0]["static_layer"]
    static["tracing.opentelemetry.flush_interval_ms"] = 100
    static["tracing.opentelemetry.min_flush_spans"] = 1


@pytest.fixture(scope="module")
def otlp() -> Iterator[OtlpReceiver]:
    with OtlpReceiver() as receiver:
        yield receiver


@pytest.fixture(scope="module")
def envoy_mutate(otlp: OtlpReceiver) -> Mutator:
    return lambda cfg: add_otel_tracing(cfg, otlp.port)


@pytest.fixture(scope="module")
def hooks() -> Iterator[WebhookReceiver]:
    with WebhookReceiver(fail_first=1) as receiver:
        yield receiver


@pytest.fixture(scope="module")
def rsa() -> SigningKey:
    return make_rsa_key("obs-rsa")


@pytest.fixture(scope="module")
def jwks(rsa: SigningKey) -> Iterator[JwksServer]:
    with JwksServer(rsa) as server:
        yield server


@pytest.fixture(scope="module")
def workdir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("obs")


def _write_policy(workdir: Path, jwks: JwksServer, hooks: WebhookReceiver, org: int) -> Path:
    path = workdir / "policy.yaml"
    path.write_text(POLICY.format(jwks_url=jwks.url, hook_url=hooks.url, org_tokens=org))
    return path


@pytest.fixture(scope="module")
def service(
    workdir: Path, jwks: JwksServer, hooks: WebhookReceiver, otlp: OtlpReceiver, authz_port: int
) -> Iterator[AuthzService]:
    policy = _write_policy(workdir, jwks, hooks, 1_000_000)
    env = {
        "OTEL_TRACES_EXPORTER": "otlp",
        "OTEL_LOGS_EXPORTER": "otlp",
        "OTEL_EXPORTER_OTLP_ENDPOINT": otlp.endpoint,
        "OTEL_EXPORTER_OTLP_PROTOCOL": "grpc",
        "OTEL_BSP_SCHEDULE_DELAY": "100",
        "OTEL_BLRP_SCHEDULE_DELAY": "100",
        "OTEL_METRIC_EXPORT_INTERVAL": "300",
        "AUTHZ_TEST_WEBHOOK_SECRET": SECRET,
        "AUTHZ_ALERT_INTERVAL_S": "0.2",
        "AUTHZ_DECISION_LOG": "all",
    }
    with AuthzService(policy, grpc_port=authz_port, workdir=workdir, env=env) as svc:
        yield svc


@pytest.fixture
def gw(envoy: EnvoyProcess, service: AuthzService, fake_llm: FakeLLMThread) -> EnvoyProcess:
    return envoy


TOKENS: list[str] = []  # every bearer token sent: none may ever show up in the logs


def client(gw: EnvoyProcess, tok: str, **headers: str) -> openai.OpenAI:
    TOKENS.append(tok)
    return closing(openai.OpenAI(
        base_url=gw.url + "/v1", api_key=tok, max_retries=0, timeout=20,
        default_headers=headers or None,
    ))  # fmt: skip


def chat(c: openai.OpenAI, max_tokens: int = 50) -> Any:
    return c.chat.completions.create(
        model="gpt-4o", messages=[{"role": "user", "content": "hi"}], max_tokens=max_tokens
    )


def test_authz_spans_sit_inside_envoys_trace(
    gw: EnvoyProcess, rsa: SigningKey, otlp: OtlpReceiver, service: AuthzService
) -> None:
    trace_id, client_span = secrets.token_hex(16), secrets.token_hex(8)
    c = client(gw, token(rsa, "tracy", "traceorg", department="eng"),
               traceparent=f"00-{trace_id}-{client_span}-01")  # fmt: skip
    resp = chat(c)

    def span(name: str) -> Span:
        return otlp.wait_span(lambda s: s.trace_id == trace_id and s.name == name, timeout=15)

    envoy_check = span("async envoy.service.auth.v3.Authorization.Check egress")
    envoy_proc = span("async envoy.service.ext_proc.v3.ExternalProcessor.Process egress")
    ingress = span("ingress")
    assert ingress.service == "envoy" and ingress.parent_span_id == client_span

    check = span("authz.check")
    assert check.service == "authz"
    assert check.parent_span_id == envoy_check.span_id, "parented on Envoy's span for the Check"
    a = check.attributes
    assert a["authz.verdict"] == "allow"
    assert a["authz.subject"] == "org:traceorg/department:eng/user:tracy"
    assert a["gen_ai.request.model"] == "gpt-4o"
    assert a["authz.budget"] == "user-daily"  # the tightest budget on the path
    assert a["authz.budget.node"] == "org:traceorg/department:eng/user:tracy"
    assert a["authz.reserved.output_tokens"] == 50

    settle = span("authz.settle")
    assert settle.parent_span_id == envoy_proc.span_id, "parented on Envoy's ext_proc span"
    assert settle.attributes["gen_ai.usage.input_tokens"] == resp.usage.prompt_tokens
    assert settle.attributes["gen_ai.usage.output_tokens"] == resp.usage.completion_tokens
    assert settle.attributes["authz.settle.outcome"] == "settled"

    assert span("authz.ledger.reserve").parent_span_id == check.span_id
    assert span("authz.ledger.settle").parent_span_id == settle.span_id

    # The decision's log line names the same trace and span.
    def line() -> dict[str, Any] | None:
        for raw in service.stderr_text().splitlines():
            rec = json.loads(raw)
            if rec.get("msg") == "decision" and rec.get("trace_id") == trace_id:
                return dict(rec)
        return None

    rec = wait_until(line, timeout=5, what="the decision log line")
    assert rec["span_id"] == check.span_id and rec["subject"] == a["authz.subject"]


def test_denial_span_names_reason_and_budget(
    gw: EnvoyProcess, rsa: SigningKey, otlp: OtlpReceiver
) -> None:
    trace_id = secrets.token_hex(16)
    c = client(gw, token(rsa, "greedy", "traceorg"),
               traceparent=f"00-{trace_id}-{secrets.token_hex(8)}-01")  # fmt: skip
    with pytest.raises(openai.RateLimitError):
        chat(c, max_tokens=5000)
    check = otlp.wait_span(lambda s: s.trace_id == trace_id and s.name == "authz.check")
    a = check.attributes
    assert (a["authz.verdict"], a["authz.reason"]) == ("deny", "budget_exhausted")
    assert a["authz.budget"] == "user-daily" and a["http.response.status_code"] == 429
    assert a["authz.budget.node"] == "org:traceorg/user:greedy"


def _families(text: str) -> dict[str, Any]:
    return {f.name: f for f in text_string_to_metric_families(text)}


def test_metrics_count_real_traffic_with_bounded_labels(
    gw: EnvoyProcess, rsa: SigningKey, service: AuthzService, otlp: OtlpReceiver
) -> None:
    users = ["mia", "noah", "olga"]
    for user in users:
        chat(client(gw, token(rsa, user, "metricsorg", department="eng"),
                    **{"x-fake-prompt-tokens": "20", "x-fake-words": "7"}))  # fmt: skip
    with pytest.raises(openai.RateLimitError):
        chat(client(gw, token(rsa, "mia", "metricsorg", department="eng")), max_tokens=5000)
    with pytest.raises(openai.AuthenticationError):
        chat(client(gw, "not-a-jwt"))
    url = service.http_url
    org = {"org": "metricsorg", "department": "eng", "model": "gpt-*"}
    assert wait_metric(url, "authz_tokens_total", 21, kind="output", **org) == 21
    assert metric(url, "authz_tokens_total", kind="input", **org) == 60
    assert metric(url, "authz_decisions_total", verdict="allow", reason="", **org) == 3
    denied = {"verdict": "deny", "reason": "budget_exhausted", "org": "metricsorg"}
    assert metric(url, "authz_decisions_total", **denied) == 1
    assert metric(url, "authz_decisions_total", verdict="deny", reason="unauthenticated") >= 1
    assert metric(url, "authz_settlements_total", outcome="settled") >= 3
    assert metric(url, "authz_check_seconds_count") >= 5
    assert metric(url, "authz_settle_seconds_count") >= 3
    node = "org:metricsorg/department:eng"
    ratio = wait_until(
        lambda: metric(url, "authz_budget_used_ratio", budget="dept-daily", node=node),
        timeout=5, what="the department's budget gauge",
    )  # fmt: skip
    assert 0 < ratio < 1
    assert wait_metric(url, "authz_audit_entries_total", 1, kind="denied") >= 1

    # The same counters reach the OTLP receiver through OTel metrics.
    def exported() -> float:
        points = [p for p in otlp.metrics if p.name == "authz_decisions" and p.service == "authz"
                  and p.attributes.get("org") == "metricsorg" and p.attributes["verdict"] == "allow"]
        return points[-1].value if points else 0.0  # cumulative: the last export counts

    assert wait_until(lambda: exported() == 3, timeout=10, what="authz_decisions over OTLP")

    families = _families(service.metrics_text())
    for name in METRIC_NAMES:
        family = name.removesuffix("_total")
        assert family in families, f"{name} is not exposed"
    for family in families.values():
        for sample in family.samples:
            for value in sample.labels.values():
                assert not any(u in value for u in users), f"a user id in {sample}"
                assert "user:" not in value, f"a user node in {sample}"


def test_alert_webhook_signed_once_after_a_failed_attempt(
    gw: EnvoyProcess, rsa: SigningKey, service: AuthzService, hooks: WebhookReceiver,
    otlp: OtlpReceiver,
) -> None:  # fmt: skip
    # dept-daily is 2000; four requests of ~300 tokens cross 50% (each user stays < 1000).
    for i in range(4):
        c = client(gw, token(rsa, f"seller{i}", "alertorg", department="sales"),
                   **{"x-fake-prompt-tokens": "300", "x-fake-words": "5"})  # fmt: skip
        chat(c)
    node = "org:alertorg/department:sales"

    def mine() -> list[Any]:
        return [r for r in hooks.delivered if r.json["node"] == node]

    body = wait_until(mine, timeout=15, what="the department's alert")[0].json
    assert body["kind"] == "threshold" and body["threshold"] == 50
    assert body["budget"] == "dept-daily" and body["org"] == "alertorg"
    attempts = [r for r in hooks.requests if r.headers["x-authz-delivery"] == body["id"]]
    assert [r.status for r in attempts] == [500, 200], "retried once after the 500"
    assert [r.headers["x-authz-attempt"] for r in attempts] == ["1", "2"]
    for r in attempts:
        expected = hmac.new(
            SECRET.encode(), r.headers["x-authz-timestamp"].encode() + b"." + r.body, sha256
        ).hexdigest()
        assert hmac.compare_digest(r.headers["x-authz-signature"], "sha256=" + expected)

    # More usage after the alert: the engine sees it (the gauge moves) but does not re-fire.
    url = service.http_url
    before = metric(url, "authz_budget_used_ratio", budget="dept-daily", node=node)
    chat(client(gw, token(rsa, "seller9", "alertorg", department="sales")))
    wait_until(
        lambda: metric(url, "authz_budget_used_ratio", budget="dept-daily", node=node) > before,
        timeout=5, what="the gauge to take the new usage",
    )  # fmt: skip
    assert metric(url, "authz_alerts_total", kind="threshold") == 1
    assert len([r for r in hooks.delivered if r.json["id"] == body["id"]]) == 1

    # The same alert as an OpenTelemetry log event.
    def event() -> bool:
        return any(
            rec.attributes.get("authz.alert.id") == body["id"] and rec.service == "authz"
            for rec in otlp.logs
        )

    wait_until(event, timeout=10, what="the alert's OTel log event")


def test_audit_chain_records_reloads_and_denials_and_verifies(
    gw: EnvoyProcess, rsa: SigningKey, service: AuthzService, workdir: Path,
    jwks: JwksServer, hooks: WebhookReceiver,
) -> None:  # fmt: skip
    with pytest.raises(openai.RateLimitError):
        chat(client(gw, token(rsa, "auditee", "auditorg")), max_tokens=5000)
    _write_policy(workdir, jwks, hooks, 1_000_001)  # the org budget changes
    service.send_signal(signal.SIGHUP)
    audit = workdir / "audit.jsonl"

    def kinds() -> list[str]:
        return [json.loads(line)["kind"] for line in audit.read_text().splitlines()]

    wait_until(lambda: "budget_changed" in kinds(), timeout=10, what="the reload's audit entry")
    entries = [json.loads(line) for line in audit.read_text().splitlines()]
    assert entries[0]["kind"] == "service_started"
    assert any(e["kind"] == "denied" and e["data"].get("subject") == "org:auditorg/user:auditee"
               for e in entries)  # fmt: skip
    change = next(e for e in entries if e["kind"] == "budget_changed")["data"]
    assert change["budget"] == "org-default" and change["change"] == "changed"
    assert (change["before"]["tokens"], change["after"]["tokens"]) == (1_000_000, 1_000_001)
    out = subprocess.run(
        [sys.executable, "-m", "authz", "audit", "verify", "--file", str(audit)],
        capture_output=True, text=True, timeout=60, cwd=REPO_ROOT,
    )  # fmt: skip
    assert out.returncode == 0, out.stdout + out.stderr
    assert out.stdout.startswith(f"ok: {len(entries)} entries") or out.stdout.startswith("ok: ")


def test_logs_never_contain_a_bearer_token(service: AuthzService) -> None:
    # Runs last in this module: every token the tests above sent is in TOKENS.
    text = service.stderr_text()
    assert TOKENS and text
    for tok in TOKENS:
        assert tok not in text
        assert tok.rsplit(".", 1)[-1] not in text, "a JWT signature leaked"
    for line in text.splitlines():
        json.loads(line)  # every line is one JSON object
