"""Path readings, path rules, routing and ``requests.unmetered`` (authz.paths, authz.apis)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import yaml

from authz.apis import Api, api_for_path, route
from authz.errors import PolicyError
from authz.paths import MAX_PATH, PathRule, UnreadablePath, parse_path_rule, readings
from authz.policy.loader import parse_policy
from authz.policy.model import RequestPolicy

pytestmark = pytest.mark.unit

FIXTURES = Path(__file__).parent.parent / "fixtures" / "policies"
SOURCE = str(FIXTURES / "p.yaml")  # beside good.yaml, whose jwks_file is relative
DEFAULT = RequestPolicy().unmetered
CHAT = ("v1", "chat", "completions")


def rule(text: str) -> PathRule:
    parsed = parse_path_rule(text)
    assert isinstance(parsed, PathRule), parsed
    return parsed


# -- readings -------------------------------------------------------------------------
def test_a_plain_path_has_one_reading() -> None:
    assert readings("/v1/chat/completions") == {CHAT}
    assert readings("/v1/chat/completions?x=%2F#f") == {CHAT}


@pytest.mark.parametrize(
    "path",
    [
        "/v1/chat/%63ompletions",  # an escaped unreserved character
        "/v1/cha%74/completions",  # ...which, as sent, ends in completions: chat wins
        "/v1/chat/x/%2E%2E/completions",  # escaped dot segments
        "/v1/chat/%2563ompletions",  # double-encoded
        "/v1/chat/%252563ompletions",  # triple
        "/v1//chat///completions",  # repeated slashes
        "/v1/chat/completions/",  # trailing slash
        "/v1/./chat/x/../completions",  # dot segments
        "/v1/chat/completions;jsessionid=1",  # ;params
        "/v1/x/..;/chat/completions",  # Tomcat's ..;/
        "/v1/chat%2Fcompletions",  # escaped slash
        "/v1/chat%5Ccompletions",  # escaped backslash
        "/v1/chat\\completions",  # backslash
        "/V1/Chat/COMPLETIONS",  # case
        "/v1/chat/completions%3Fstream=1",  # an escaped query
        "/v1/chat/completions%23frag",  # an escaped fragment
    ],
)
def test_alias_spellings_read_as_the_plain_path(path: str) -> None:
    assert CHAT in readings(path)
    assert api_for_path(path) is Api.OPENAI_CHAT


def test_dot_dot_stops_at_the_root() -> None:
    assert CHAT in readings("/../../v1/chat/completions")


def test_a_path_that_keeps_decoding_is_ambiguous() -> None:
    assert ("v1", "chat", "c") in readings("/v1/chat/%25252563")  # four decodes: fine
    with pytest.raises(UnreadablePath) as err:
        readings("/v1/chat/%2525252563")  # five
    assert err.value.code == "ambiguous_path"
    assert api_for_path("/v1/chat/%2525252563ompletions") is None


def test_readings_keep_what_upstreams_that_do_not_decode_see() -> None:
    found = readings("/v1/models/ft%3Agpt-4o%2Fx")
    assert ("v1", "models", "ft%3agpt-4o%2fx") in found  # as sent
    assert ("v1", "models", "ft:gpt-4o%2fx") in found  # %2F kept as a character
    assert ("v1", "models", "ft:gpt-4o", "x") in found  # %2F read as a separator


# -- rules ----------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("text", "method", "path", "hit"),
    [
        ("GET /v1/models", "GET", "/v1/models", True),
        ("get /V1/Models", "GET", "/v1/models", True),
        ("GET /v1/models", "HEAD", "/v1/models", False),
        ("GET /v1/models/*", "GET", "/v1/models/gpt-4o", True),
        ("GET /v1/models/*", "GET", "/v1/models", False),
        ("GET /v1/models/*", "GET", "/v1/models/a/b", False),
        ("GET /v1/files/**", "GET", "/v1/files", True),
        ("GET /v1/files/**", "GET", "/v1/files/a/content", True),
        ("* /v1/files/*/content", "DELETE", "/v1/files/f1/content", True),
        ("GET /", "GET", "/", True),
    ],
)
def test_rule_matches(text: str, method: str, path: str, hit: bool) -> None:
    (segments,) = readings(path)
    assert rule(text).matches(method, segments) is hit


@pytest.mark.parametrize(
    ("text", "why"),
    [
        ("GET", 'must be "METHOD /path"'),
        ("GET v1/models", 'must be "METHOD /path"'),
        ("GET /v1/models extra", 'must be "METHOD /path"'),
        ("G3T /v1/models", 'must be "METHOD /path"'),
        ("GET /v1/%6dodels", "must be plain"),
        ("GET /v1/models?x", "must be plain"),
        ("GET /v1/models;x", "must be plain"),
        ("GET /v1//models", "must be normalised"),
        ("GET /v1/models/", "must be normalised"),
        ("GET /v1/../models", "must be normalised"),
        ("GET /v1/mo*", "whole segment"),
        ("GET /**/models", "only be the last"),
    ],
)
def test_bad_rules_say_why(text: str, why: str) -> None:
    result = parse_path_rule(text)
    assert isinstance(result, str) and why in result


# -- route ----------------------------------------------------------------------------
def test_post_to_a_metered_api_is_metered_however_spelled() -> None:
    for path in (
        "/v1/chat/completions",
        "/openai/v1/chat/%2563ompletions;x/",
        "/V1/CHAT/completions",
    ):
        assert route("POST", path, DEFAULT).api is Api.OPENAI_CHAT
    assert route("post", "/v1/messages", DEFAULT).api is Api.ANTHROPIC_MESSAGES
    # Listing it cannot free it.
    assert route("POST", "/v1/embeddings", (rule("* /**"),)).api is Api.OPENAI_EMBEDDINGS


def test_the_default_frees_only_the_models_listing() -> None:
    assert route("GET", "/v1/models", DEFAULT).unmetered
    assert route("GET", "/v1/models/gpt-4o?x=1", DEFAULT).unmetered
    for method, path in [
        ("GET", "/v1/files"),
        ("POST", "/v1/images/generations"),  # a metered API the service cannot price
        ("POST", "/v1/messages/batches"),
        ("POST", "/v1/models"),
        ("DELETE", "/v1/models/ft-1"),
    ]:
        r = route(method, path, DEFAULT)
        assert (r.api, r.unmetered, r.status, r.detail) == (None, False, 403, "not_listed")
        assert "requests.unmetered" in r.message and path in r.message


def test_a_non_post_to_a_metered_api_is_refused_unless_listed() -> None:
    r = route("GET", "/v1/chat/completions", DEFAULT)
    assert (r.api, r.status) == (None, 403) and "only POST is metered" in r.message
    assert route("GET", "/v1/chat/completions", (rule("GET /v1/chat/completions"),)).unmetered


def test_free_only_when_every_reading_is_listed() -> None:
    # One reading is /v1/models/<one segment>; another is /chat/completions.
    r = route("GET", "/v1/models/..%2F..%2Fchat%2Fcompletions", DEFAULT)
    assert r.status == 403 and not r.unmetered


def test_readings_naming_two_apis_take_the_most_specific_or_are_refused() -> None:
    # One reading is /v1/embeddings (the decoded ? cuts), another /v1/chat/completions.
    assert route("POST", "/v1/embeddings%3F/../chat/completions", DEFAULT).api is Api.OPENAI_CHAT
    r = route("POST", "/v1/embeddings%3F/../completions", DEFAULT)
    assert (r.api, r.status, r.detail) == (None, 400, "ambiguous_path")
    assert "openai.completions" in r.message and "openai.embeddings" in r.message
    assert api_for_path("/v1/embeddings%3F/../completions") is None
    r = route("POST", "/v1/chat/%2525252563ompletions", DEFAULT)
    assert (r.status, r.detail) == (400, "ambiguous_path")


def test_messages_show_a_bounded_path() -> None:
    r = route("GET", "/x" * 500, DEFAULT)
    assert r.status == 403 and len(r.message) < 300


def test_a_path_too_long_to_read_every_way_is_refused() -> None:
    assert route("POST", "/x" * (MAX_PATH // 2 - 11) + "/v1/chat/completions", DEFAULT).api
    r = route("POST", "/x" * (MAX_PATH // 2) + "/v1/chat/completions", DEFAULT)
    assert (r.api, r.status, r.detail) == (None, 400, "path_too_long")
    # The query does not count: it is cut before anything is read.
    assert route("GET", "/v1/models?" + "q" * 10 * MAX_PATH, DEFAULT).unmetered


# -- requests.unmetered in the policy ---------------------------------------------------
def _policy(requests: Any) -> Any:
    data = yaml.safe_load((FIXTURES / "good.yaml").read_text())
    data["requests"] = requests
    return parse_policy(data, SOURCE)


def test_unmetered_defaults_and_lists() -> None:
    assert _policy({}).requests.unmetered == DEFAULT
    listed = _policy({"unmetered": ["GET /v1/files/**", "post /v1/messages/count_tokens"]})
    assert [str(r) for r in listed.requests.unmetered] == [
        "GET /v1/files/**",
        "post /v1/messages/count_tokens",
    ]
    assert listed.requests.unmetered[1].method == "POST"
    assert _policy({"unmetered": []}).requests.unmetered == ()


def test_other_paths_deny_keeps_its_meaning() -> None:
    assert _policy({"other_paths": "deny"}).requests.unmetered == ()
    both = _policy({"other_paths": "deny", "unmetered": ["GET /v1/models"]})
    assert [str(r) for r in both.requests.unmetered] == ["GET /v1/models"]


@pytest.mark.parametrize(
    ("requests", "error"),
    [
        (
            {"other_paths": "allow"},
            "p.yaml:requests.other_paths: allow is no longer supported (it let unrecognised"
            " paths, including metered APIs, through free); list what may pass free in"
            ' requests.unmetered, e.g. ["GET /v1/models", "GET /v1/models/*"] (got \'allow\')',
        ),
        (
            {"other_paths": "maybe"},
            "p.yaml:requests.other_paths: must be deny (retired: use requests.unmetered)"
            " (got 'maybe')",
        ),
        (
            {"unmetered": "GET /v1/models"},
            'p.yaml:requests.unmetered: must be a list of "METHOD /path" strings'
            " (got 'GET /v1/models')",
        ),
        (
            {"unmetered": ["GET /v1/models", 3]},
            'p.yaml:requests.unmetered[1]: must be a string "METHOD /path", e.g.'
            ' "GET /v1/models" (got 3)',
        ),
        (
            {"unmetered": ["GET /v1/models", "GET /v1/mo%64els"]},
            "p.yaml:requests.unmetered[1]: the path must be plain: no %-escapes, query,"
            " fragment, ;params or backslash (got 'GET /v1/mo%64els')",
        ),
        (
            {"unmetered": ["POST /v1/*"]},
            "p.yaml:requests.unmetered[0]: would free /v1/completions: a POST to a metered"
            " API is always metered (got 'POST /v1/*')",
        ),
    ],
)
def test_bad_unmetered_names_file_path_and_value(requests: Any, error: str) -> None:
    with pytest.raises(PolicyError) as err:
        _policy(requests)
    assert str(err.value) == error.replace("p.yaml:", f"{SOURCE}:", 1)
