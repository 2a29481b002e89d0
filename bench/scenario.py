"""What every configuration shares: the answer, the request, the users, the policy, Envoy.

- The answer is an OpenAI ``chat.completion`` with ``usage``, served by Envoy itself
  (``direct_response``) so the upstream costs nothing; or, where a configuration needs a
  real upstream hop (ext_proc response processing, the peer), by a second Envoy listener
  with the same direct_response: the cheapest upstream there is.
- The request is one POST to /v1/chat/completions per distinct user, each with its own
  RS256 JWT, rotated by wrk (bench/wrk.lua).
- The policy is examples/policy.yaml with every budget and rate made too large to bind
  during a run, and the identity pointed at the bench's own key; everything else (subject
  mapping, budgets, rates, weights, models, ledger breaker) as shipped, so the hot path
  is the real one.
- Envoy is envoy/envoy.yaml as shipped, edited structurally per configuration.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from tests.support.envoy_proc import REPO_ROOT, cluster, http_filters
from tests.support.tokens import jwks_document, make_rsa_key, mint

__all__ = [
    "CHAT_COMPLETION",
    "REQUEST_BODY",
    "EnvoyShape",
    "envoy_mutator",
    "write_policy",
    "write_requests",
]

EXAMPLE_POLICY = REPO_ROOT / "examples" / "policy.yaml"
ISSUER = "https://idp.example.com/"
AUDIENCE = "llm-gateway"
HUGE = 10**15  # tokens per budget: never exhausted in a run

CHAT_COMPLETION: dict[str, Any] = {
    "id": "chatcmpl-bench0001",
    "object": "chat.completion",
    "created": 1735689600,
    "model": "gpt-4o-mini-2024-07-18",
    "choices": [
        {
            "index": 0,
            "message": {
                "role": "assistant",
                "content": "Hello! How can I help you today?",
                "refusal": None,
                "annotations": [],
            },
            "logprobs": None,
            "finish_reason": "stop",
        }
    ],
    "usage": {
        "prompt_tokens": 19,
        "completion_tokens": 9,
        "total_tokens": 28,
        "prompt_tokens_details": {"cached_tokens": 0, "audio_tokens": 0},
        "completion_tokens_details": {
            "reasoning_tokens": 0,
            "audio_tokens": 0,
            "accepted_prediction_tokens": 0,
            "rejected_prediction_tokens": 0,
        },
    },
    "service_tier": "default",
    "system_fingerprint": "fp_bench",
}

REQUEST_BODY: dict[str, Any] = {
    "model": "gpt-4o-mini",
    "max_tokens": 64,
    "messages": [
        {"role": "system", "content": "You are a helpful assistant."},
        {"role": "user", "content": "Say hello in one short sentence."},
    ],
}

# Departments and teams the users are spread over (the example policy maps
# `department` and `groups: [team-*]`), so checks touch many distinct budget nodes.
_DEPARTMENTS = ("research", "finance", "sales", "support")
_TEAMS = ("nlp", "vision", "infra", "data", "web", "ops", "ml", "apps")


def write_policy(workdir: Path) -> Path:
    """examples/policy.yaml with huge budgets and the bench's JWKS; returns its path."""
    policy = yaml.safe_load(EXAMPLE_POLICY.read_text())
    for budget in policy["budgets"]:
        budget["tokens"] = HUGE
    # Rates stay in (they are on the hot path) but never bind: a bench is not a limit test.
    for rate in policy.get("rates", []):
        for key in ("requests_per_minute", "tokens_per_minute", "concurrent"):
            if key in rate:
                rate[key] = HUGE
    (workdir / "jwks.json").write_text(json.dumps(jwks_document(make_rsa_key("bench"))))
    jwt = policy["identity"]["jwt"]
    jwt.update(issuer=ISSUER, audience=AUDIENCE, jwks_file="jwks.json")
    path = workdir / "policy.yaml"
    path.write_text(yaml.safe_dump(policy, sort_keys=False))
    return path


def user_token(i: int, *, ttl_s: int = 6 * 3600) -> str:
    now = int(time.time())
    claims = {
        "iss": ISSUER,
        "aud": AUDIENCE,
        "sub": f"user-{i:05d}",
        "org_id": "acme",
        "department": _DEPARTMENTS[i % len(_DEPARTMENTS)],
        "groups": [f"team-{_TEAMS[i % len(_TEAMS)]}", "everyone"],
        "iat": now,
        "exp": now + ttl_s,
    }
    return mint(make_rsa_key("bench"), claims)


def write_requests(path: Path, users: int, *, host: str = "127.0.0.1") -> Path:
    """One pre-formatted HTTP/1.1 POST per user, separated by NUL lines (bench/wrk.lua)."""
    body = json.dumps(REQUEST_BODY, separators=(",", ":"))
    out = []
    for i in range(users):
        out.append(
            "POST /v1/chat/completions HTTP/1.1\r\n"
            f"Host: {host}\r\n"
            f"Authorization: Bearer {user_token(i)}\r\n"
            "Content-Type: application/json\r\n"
            f"Content-Length: {len(body)}\r\n"
            "\r\n"
            f"{body}\0\n"
        )
    path.write_text("".join(out))
    return path


@dataclass(frozen=True)
class EnvoyShape:
    """How one configuration changes the shipped envoy/envoy.yaml."""

    ext_authz: bool = True
    ext_proc: bool = False
    ext_proc_observability: bool = False
    access_log: bool = False  # JSON access log with authz_us (fixed-rate runs read it)
    upstream_port: int | None = None  # serve the answer from a second listener on this port
    authz_max_streams: int | None = None  # > 0: spread checks over several connections


def _direct_response() -> dict[str, Any]:
    return {"status": 200, "body": {"inline_string": json.dumps(CHAT_COMPLETION)}}


def _json_header() -> list[dict[str, Any]]:
    return [
        {
            "header": {"key": "content-type", "value": "application/json"},
            "append_action": "OVERWRITE_IF_EXISTS_OR_ADD",
        }
    ]


def _hcm(cfg: dict[str, Any]) -> dict[str, Any]:
    listener = cfg["static_resources"]["listeners"][0]
    typed: dict[str, Any] = listener["filter_chains"][0]["filters"][0]["typed_config"]
    return typed


def _upstream_listener(port: int) -> dict[str, Any]:
    """A listener that answers every request with the chat completion: the fake LLM."""
    route = {"match": {"prefix": "/"}, "direct_response": _direct_response()}
    hcm = {
        "@type": "type.googleapis.com/envoy.extensions.filters.network."
        "http_connection_manager.v3.HttpConnectionManager",
        "stat_prefix": "fake_llm",
        "route_config": {
            "virtual_hosts": [
                {
                    "name": "fake_llm",
                    "domains": ["*"],
                    "routes": [route],
                    "response_headers_to_add": _json_header(),
                }
            ]
        },
        "http_filters": [
            {
                "name": "envoy.filters.http.router",
                "typed_config": {
                    "@type": "type.googleapis.com/envoy.extensions.filters.http.router.v3.Router"
                },
            }
        ],
    }
    return {
        "name": "fake_llm",
        "address": {"socket_address": {"address": "127.0.0.1", "port_value": port}},
        "filter_chains": [
            {"filters": [{"name": "envoy.filters.network.http_connection_manager",
                          "typed_config": hcm}]}
        ],
    }  # fmt: skip


def envoy_mutator(shape: EnvoyShape) -> Callable[[dict[str, Any]], None]:
    def mutate(cfg: dict[str, Any]) -> None:
        hcm = _hcm(cfg)
        if not shape.access_log:
            hcm.pop("access_log", None)
        chain = http_filters(cfg)
        drop = set()
        if not shape.ext_authz:
            drop.add("envoy.filters.http.ext_authz")
        if not shape.ext_proc:
            drop.add("envoy.filters.http.ext_proc")
        chain[:] = [f for f in chain if f["name"] not in drop]
        if shape.ext_proc and shape.ext_proc_observability:
            ext_proc = next(f for f in chain if f["name"] == "envoy.filters.http.ext_proc")
            # Envoy sends and does not wait: no added latency, but replies are ignored, so
            # only STREAMED/NONE bodies (no include_usage rewrite of the request body).
            typed = ext_proc["typed_config"]
            typed["observability_mode"] = True
            typed["processing_mode"]["request_body_mode"] = "NONE"
        vhost = hcm["route_config"]["virtual_hosts"][0]
        if shape.upstream_port is None:
            route = vhost["routes"][0]
            route.pop("route", None)
            route["direct_response"] = _direct_response()
            vhost["response_headers_to_add"] = _json_header()
        else:
            cfg["static_resources"]["listeners"].append(_upstream_listener(shape.upstream_port))
            for group in cluster(cfg, "llm_upstream")["load_assignment"]["endpoints"]:
                for ep in group["lb_endpoints"]:
                    ep["endpoint"]["address"]["socket_address"] = {
                        "address": "127.0.0.1",
                        "port_value": shape.upstream_port,
                    }
        if shape.authz_max_streams:
            # HTTP/2 opens another connection once one carries this many streams, so the
            # kernel's SO_REUSEPORT can hand connections to different authz workers.
            opts = cluster(cfg, "authz")["typed_extension_protocol_options"][
                "envoy.extensions.upstreams.http.v3.HttpProtocolOptions"
            ]
            opts["explicit_http_config"]["http2_protocol_options"]["max_concurrent_streams"] = (
                shape.authz_max_streams
            )

    return mutate
