"""Metered means metered: no spelling of a metered path is cheaper than the plain one.

Hypothesis writes each metered path (behind gateway prefixes too) the ways an attacker
would: any character percent-encoded once, twice or three times (hex in either case),
letters in any case, dot segments, repeated slashes, backslashes, a trailing slash,
``;params``, a query, a fragment, an escaped query. The service must still see the API.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml
from hypothesis import given
from hypothesis import strategies as st

from authz.apis import METERED_PATHS, Api, apis_for_path, route
from authz.paths import readings
from authz.policy.model import RequestPolicy

pytestmark = [pytest.mark.unit]

DEFAULT = RequestPolicy().unmetered
PLAIN = {api: tuple(path.strip("/").split("/")) for api, path in METERED_PATHS.items()}
PREFIXES: tuple[tuple[str, ...], ...] = (
    (),
    ("openai",),
    ("anthropic",),
    ("openai", "deployments", "gpt4o"),
)
ROOT = Path(__file__).resolve().parents[2]

apis = st.sampled_from(sorted(PLAIN))
words = st.text("abcxyz019=-_", min_size=0, max_size=6)


def _escape(ch: str, depth: int, lower_hex: bool) -> str:
    if depth == 0:
        return ch
    code = f"{ord(ch):02x}" if lower_hex else f"{ord(ch):02X}"
    return "%" + "25" * (depth - 1) + code


@st.composite
def _segment(draw: st.DrawFn, seg: str) -> str:
    out = []
    for ch in seg:
        if ch.isalpha() and draw(st.booleans()):
            ch = ch.upper()
        depth = draw(st.sampled_from((0, 0, 0, 1, 2, 3)))
        out.append(_escape(ch, depth, draw(st.booleans())))
    return "".join(out)


@st.composite
def spelling(draw: st.DrawFn, api: Api, hostile: bool) -> str:
    """One spelling of ``api``'s path. ``hostile`` adds what can make readings disagree:
    backslashes, escaped separators and dots, and ;params inside the path (not only at
    its end): ``/v1\\chat/completions`` is chat to one upstream, ``completions`` to another."""
    segments = [*draw(st.sampled_from(PREFIXES)), *PLAIN[api]]
    separators = ["/", "//", "/./", "/zz/../", "///./"]
    if hostile:
        separators += ["\\", "/\\", "%2F", "%2f", "%5C", "/%2E/", "/zz/%2E%2E/", "/zz/%2e./"]
    parts = []
    for i, seg in enumerate(segments):
        text = draw(_segment(seg))
        last = i == len(segments) - 1
        if (last or hostile) and draw(st.integers(0, 3)) == 0:
            text += ";" + draw(words)
        parts.append(draw(st.sampled_from(separators)) + text)
    path = "".join(parts)
    path += draw(st.sampled_from(("", "", "/", "//", "/.", "/;x")))
    path += draw(st.sampled_from(("", "?", "?a=/v1/models", "#", "#/x", "%3Fa=1", "%23x")))
    if not path.startswith(("/", "\\")):
        path = "/" + path
    return path


@given(
    api=apis,
    data=st.data(),
    hostile=st.booleans(),
    method=st.sampled_from(("POST", "post", "Post")),
)
def test_every_spelling_is_metered_as_the_same_api(
    api: Api, data: st.DataObject, hostile: bool, method: str
) -> None:
    path = data.draw(spelling(api, hostile))
    # Other readings may be nothing, or a less specific API: /v1/cha%74/completions
    # ends in ``completions`` as sent. The most specific reading decides.
    assert api in apis_for_path(path), path
    where = route(method, path, DEFAULT)
    assert where.api is api and not where.unmetered, (path, where)


@given(api=apis, data=st.data(), method=st.sampled_from(("GET", "HEAD", "PUT", "DELETE", "get")))
def test_no_other_method_on_a_metered_path_is_free(
    api: Api, data: st.DataObject, method: str
) -> None:
    path = data.draw(spelling(api, hostile=data.draw(st.booleans())))
    where = route(method, path, DEFAULT)
    assert not where.unmetered and where.api is None and where.status in (400, 403), path


@given(st.text(st.sampled_from("/.%;?#\\v1modelschatcompletions2F5CeE"), max_size=60))
def test_free_paths_are_free_in_every_reading(path: str) -> None:
    """Whatever the characters, a GET passes free only if every reading is /v1/models[/x]."""
    where = route("GET", path, DEFAULT)
    if where.unmetered:
        for segments in readings(path):
            assert segments[:2] == ("v1", "models") and len(segments) in (2, 3), path


def test_the_shipped_envoy_normalises_paths() -> None:
    cfg = yaml.safe_load((ROOT / "envoy" / "envoy.yaml").read_text())
    hcm = cfg["static_resources"]["listeners"][0]["filter_chains"][0]["filters"][0]["typed_config"]
    assert hcm["normalize_path"] is True
    assert hcm["merge_slashes"] is True
    assert hcm["path_with_escaped_slashes_action"] == "REJECT_REQUEST"
