"""``python -m bench.wire``: protobuf parse and serialise cost per Check and per ext_proc message.

What authz/proto changed on the request path is only which generated classes decode
and encode Envoy's messages; this times exactly that, on messages shaped like the real
ones (the headers envoy.yaml forwards, a chat body, the allow answer with its metadata;
an SSE chunk with the ext_authz metadata Envoy forwards on every ext_proc message).

    python -m bench.wire                 # authz/proto (the service's own protos)
    python -m bench.wire --protos xds    # xds-protos' classes, where it is installed

The two cannot share a process (same protobuf names), so compare two runs. Timed in
CPU time of this process (``time.process_time``), so a busy machine's waits do not count.
"""

from __future__ import annotations

import argparse
import json
import time
import timeit
from typing import Any


def _modules(which: str) -> tuple[Any, Any, Any]:
    if which == "xds":
        from envoy.service.auth.v3 import attribute_context_pb2 as ac
        from envoy.service.auth.v3 import external_auth_pb2 as ea
        from envoy.service.ext_proc.v3 import external_processor_pb2 as ep
    else:
        from authz.proto import attribute_context_pb2 as ac
        from authz.proto import external_auth_pb2 as ea
        from authz.proto import external_processor_pb2 as ep
    return ac, ea, ep


def messages(which: str) -> dict[str, tuple[Any, bytes]]:
    """name -> (message class, serialized message)."""
    ac, ea, ep = _modules(which)
    body = json.dumps(
        {
            "model": "gpt-4o-mini",
            "max_tokens": 256,
            "messages": [{"role": "user", "content": "Say hello. " * 40}],
        }
    ).encode()
    http = ac.AttributeContext.HttpRequest(
        id="4a5c8e9f-1d2b-4c3a-9e8f-7a6b5c4d3e2f",
        method="POST",
        path="/v1/chat/completions",
        host="127.0.0.1:10000",
        scheme="http",
        protocol="HTTP/1.1",
        size=len(body),
        raw_body=body,
        headers={
            ":authority": "127.0.0.1:10000",
            ":method": "POST",
            ":scheme": "http",
            ":path": "/v1/chat/completions",
            "content-type": "application/json",
            "authorization": "Bearer " + "x" * 600,
            "x-request-id": "4a5c8e9f",
        },
    )
    request = ea.CheckRequest(
        attributes=ac.AttributeContext(request=ac.AttributeContext.Request(http=http))
    )
    meta = {
        "verdict": "allow",
        "subject": "org:acme/department:research/team:nlp/user:alice",
        "org": "acme",
        "model": "gpt-4o-mini",
        "api": "openai.chat",
        "reservation_id": "r" * 32,
        "input_estimate": 120,
        "output_reserved": 256,
        "stream": True,
        "mac": "m" * 43,
    }
    allow = ea.CheckResponse()
    allow.status.SetInParent()
    allow.dynamic_metadata.update(meta)
    for k, v in (
        ("x-ratelimit-limit-tokens", "20000"),
        ("x-ratelimit-remaining-tokens", "19000"),
        ("x-ratelimit-reset-tokens", "3600s"),
    ):
        h = allow.ok_response.response_headers_to_add.add()
        h.header.key, h.header.value, h.append_action = k, v, 2
    chunk = (
        b'data: {"id":"c1","object":"chat.completion.chunk",'
        b'"choices":[{"delta":{"content":"Hello"}}]}\n\n'
    )
    proc = ep.ProcessingRequest(response_body=ep.HttpBody(body=chunk * 4, end_of_stream=False))
    proc.metadata_context.filter_metadata["envoy.filters.http.ext_authz"].update(meta)
    cont = ep.ProcessingResponse(response_body=ep.BodyResponse())
    return {
        "CheckRequest": (ea.CheckRequest, request.SerializeToString()),
        "CheckResponse": (ea.CheckResponse, allow.SerializeToString()),
        "ProcessingRequest": (ep.ProcessingRequest, proc.SerializeToString()),
        "ProcessingResponse": (ep.ProcessingResponse, cont.SerializeToString()),
    }


def _best(fn: Any, number: int, repeat: int) -> float:
    """Seconds per call: the best of ``repeat`` runs of ``number`` calls, in CPU time."""
    runs = timeit.repeat(fn, timer=time.process_time, number=number, repeat=repeat)
    return min(runs) / number


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    p.add_argument("--protos", choices=("authz", "xds"), default="authz")
    p.add_argument("--number", type=int, default=20000)
    p.add_argument("--repeat", type=int, default=7)
    a = p.parse_args(argv)
    print(f"protos={a.protos}: best of {a.repeat} x {a.number}, microseconds per message")
    for name, (cls, data) in messages(a.protos).items():
        msg = cls.FromString(data)
        parse = _best(lambda c=cls, d=data: c.FromString(d), a.number, a.repeat)
        dump = _best(msg.SerializeToString, a.number, a.repeat)
        cost = f"parse {parse * 1e6:6.2f}   serialise {dump * 1e6:6.2f}"
        print(f"  {name:<20} {len(data):>5} B   {cost}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
