"""The Kong plugin's usage-chunk remover (kong/plugins/token-budget/usage_chunk.lua)
against the service's own (authz/mutate/response.py): the same streams, split the
same ways (whole, at every byte, at random points), must give the same bytes.

ext_proc's remover is the reference (tests/unit/test_mutate_response.py proves it
gives what the upstream sends without include_usage); here the Lua port runs under
LuaJIT, as Kong runs it, over that suite's streams and events and over random byte
soups, and every answer is compared byte for byte.
"""

from __future__ import annotations

import random
import subprocess
from pathlib import Path

import pytest

from authz.mutate.response import UsageChunkRemover
from tests.support.kong_nginx import lua_tools
from tests.unit.test_mutate_response import _PIECES, STREAMS

pytestmark = pytest.mark.unit

REPO = Path(__file__).resolve().parents[2]
DRIVER = REPO / "tests" / "support" / "kong_stub" / "usage_chunk_diff.lua"

EVENTS = [
    b'data:{"a":1,"usage":null,"b":2}\n\n',
    b'data: {"usage":null,"a":1}\n\n',
    b'data: {"usage":null}\n\n',
    b'data: { "a": 1 , "usage" : null }\n\n',
    b'data: {"a": 1, "usage": null, "b": 2}\n\n',
    b'data: {"a":1,"usage":null}\r\r',
    b'data: {"a":[1,2,3,4,5,6,7],"usage":null,"b":["]"]}\n\n',
    b': keep\nevent: x\nid: 7\ndata: {"a":1,"usage":null}\n\n',
    b'data: {"a":1,\ndata: "usage":null,\ndata: "b":2}\n\n',
    b'data: {"choices": [ ],\ndata:  "usage": {"total_tokens": 3}}\n\n',
    b"data: [DONE]\n\n",
    b": usage comment\n\n",
    b'data: {"usage":null\n\n',
    b'data: not json, "usage":null\n\n',
    b'data: {"a":{"usage":null}}\n\n',
    b'data: {"a":[{"usage":null}],"b":1}\n\n',
    b'data: {"a":[1,2,3,4,5,6,7],"x":{"usage":null},"b":"}"}\n\n',
    b'data: {"c":"x\\"usage\\":null,\\"y"}\n\n',
    b'data: {"k\\"usage":null}\n\n',
    b'data: {"usage":null,"usage":null}\n\n',
    b'data: {"a":1,"usage"\ndata: :null}\n\n',
    b'data: {"choices":[],"usage":null}\n\n',
    b'data: {"choices":[{"index":0}],"usage":{"total_tokens":3}}\n\n',
    b'data: {"choices":[],"usage":{"total_tokens":3}\n\n',
    b'event: x\ndata: {"choices":[],"usage":7}\n\n',
    b'data: \xff\xfe"usage"\n\n',
    b'data: {"a":1,"usage":null}\r\n\r',
    b'data: {"s":"a\\\\","usage":null}\n\n',  # an escaped backslash ends the string
    b'data: {"s":"{[","usage":null ,\t"t":1}\n\n',
    b'data:{"usage"  :  null  }\n\n',
    b"data\n\n",
    b'data: {"choices":[],"usage":{}}\n\n',
]


def _python(chunks: list[bytes]) -> bytes:
    r = UsageChunkRemover()
    out = [r.feed(c, False) for c in chunks]
    out.append(r.feed(b"", True))
    return b"".join(out)


def _lua(streams: list[list[bytes]]) -> list[bytes]:
    stdin = "".join(",".join(c.hex() for c in chunks) + "\n" for chunks in streams)
    done = subprocess.run(
        [lua_tools()["luajit"], "-e", f"package.path='{REPO}/?.lua;'..package.path",
         str(DRIVER)],
        input=stdin, capture_output=True, text=True, timeout=300, check=False,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    assert len(lines) == len(streams), done.stderr
    return [bytes.fromhex(line) for line in lines]


def _splits(data: bytes, rng: random.Random) -> list[list[bytes]]:
    """Whole, at every byte, every cut in two, and a few random cuts."""
    out = [[data], [data[i : i + 1] for i in range(len(data))]]
    out += [[data[:i], data[i:]] for i in range(1, len(data))]
    for _ in range(5):
        points = sorted(rng.sample(range(len(data) + 1), min(len(data) + 1, 8)))
        out.append([data[a:b] for a, b in zip([0, *points], [*points, len(data)], strict=True)])
    return out


def _compare(streams: list[list[bytes]]) -> None:
    got = _lua(streams)
    for chunks, lua in zip(streams, got, strict=True):
        want = _python(chunks)
        assert lua == want, (b"".join(chunks), chunks)


def test_streams_at_every_split_match_ext_procs_bytes() -> None:
    rng = random.Random(11)
    streams: list[list[bytes]] = []
    for name, (raw, expected) in STREAMS.items():
        assert _python([raw]) == expected, name
        cut = raw[:1500] + raw[-900:]  # each split of the whole is quadratic: a window
        streams += _splits(cut, rng)
        streams.append([raw])
    _compare(streams)


def test_single_events_at_every_split_match() -> None:
    rng = random.Random(12)
    streams = [s for event in EVENTS for s in _splits(event, rng)]
    _compare(streams)


def test_random_byte_soups_match() -> None:
    rng = random.Random(13)
    streams = []
    for _ in range(1500):
        whole = b"".join(rng.choice(_PIECES) for _ in range(rng.randint(0, 60)))
        points = sorted(rng.sample(range(len(whole) + 1), min(len(whole) + 1, rng.randint(0, 6))))
        streams.append([whole[a:b] for a, b in zip([0, *points], [*points, len(whole)],
                                                   strict=True)])  # fmt: skip
        streams.append([whole])
    _compare(streams)


def test_the_usage_chunk_and_null_members_go_the_rest_stays() -> None:
    raw, expected = STREAMS["fake chat"]
    (lua,) = _lua([[raw[i : i + 1] for i in range(len(raw))]])
    assert lua == expected
    assert b'"usage"' not in lua and b'"choices":[]' not in lua
