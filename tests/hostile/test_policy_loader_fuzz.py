"""Fuzzing the policy loader: any YAML gives a Policy or a PolicyError naming file:path.

A policy is written by people, reloaded on SIGHUP and checked offline by
``authz check-config``; a crash there (a TypeError, a RecursionError, an OverflowError)
would be a traceback instead of ``policy.yaml:budgets[2].tokens: ...``, and a failed
reload must keep the last good policy rather than take the service down. Three
sources: random YAML-shaped trees, the shipped example with one node replaced, removed
or added, and random text parsed as YAML from a file.
"""

from __future__ import annotations

import contextlib
import copy
from pathlib import Path
from typing import Any

import pytest
import yaml
from hypothesis import given, settings
from hypothesis import strategies as st

from authz.errors import PolicyError
from authz.policy.loader import load_policy, parse_policy
from authz.policy.model import Policy

pytestmark = [pytest.mark.unit]

ROOT = Path(__file__).resolve().parents[2]
EXAMPLE_FILE = ROOT / "examples" / "policy.yaml"
EXAMPLE = yaml.safe_load(EXAMPLE_FILE.read_text())
FILE = str(EXAMPLE_FILE)  # jwks_file resolves next to it

# Keys the loader knows, so random trees reach past the first "unknown key" check.
_KEYS = sorted(
    {
        "version", "timezone", "identity", "subject", "weights", "budgets", "models",
        "requests", "reservations", "ledger", "rates", "prices", "queue", "schedule",
        "audit", "alerts", "source", "jwt", "api_keys", "issuer", "audience", "algorithms",
        "jwks_file", "jwks_url", "leeway_s", "name", "sha256", "claims", "org", "department",
        "team", "leaf", "claim", "pattern", "missing", "fallback", "level", "require",
        "match", "tokens", "cost", "period", "soft", "grace", "burst", "input", "output",
        "cached_input", "rules", "unknown", "max_output_tokens", "url", "breaker", "mode",
        "ttl_s", "on_expiry", "bad_body", "other_paths", "peak", "from", "to", "days",
        "non_critical", "during_peak", "priority", "max_wait_s", "max_depth", "default",
        "currency", "unpriced", "requests_per_minute", "tokens_per_minute", "concurrent",
        "thresholds", "webhooks", "enabled", "levels", "path", "redis",
    }
)  # fmt: skip


class Deep(list[Any]):
    """A list nested ``depth`` deep, which hypothesis can show when a test fails."""

    def _repr_pretty_(self, p: Any, cycle: bool) -> None:
        p.text(f"<a list nested {self.depth} deep>")

    depth = 0


def _nest(depth: int) -> Any:
    """A list inside a list, ``depth`` deep: deeper than Python's recursion limit."""
    value: Any = "x"
    for _ in range(depth - 1):
        value = [value]
    deep = Deep([value])
    deep.depth = depth
    return deep


scalars = (
    st.none()
    | st.booleans()
    | st.integers(min_value=-(10**400), max_value=10**400)
    | st.integers(min_value=-(2**64), max_value=2**64)
    | st.floats(allow_nan=True, allow_infinity=True)
    | st.text(max_size=12)
    | st.integers(200, 5000).map(lambda n: "a" * n)  # past every name-length limit
    | st.integers(1, 5000).map(_nest)
    | st.sampled_from(["*", "10%", "1e400", "09:00", "24:00", "deny", "memory://",
                       "redis://", "redis+cluster://", "day", "UTC", "Mars/Olympus", "([",
                       "a{99999999999}", "(?P<name>x)", "redis://[::1", "9999%"])
)  # fmt: skip
keys = st.sampled_from(_KEYS) | st.text(max_size=6)
trees = st.recursive(
    scalars,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(keys, inner, max_size=5),
    max_leaves=25,
)


def _outcome(data: Any) -> None:
    try:
        policy = parse_policy(data, FILE)
    except PolicyError as exc:
        assert str(exc).startswith(f"{FILE}:"), str(exc)
        assert exc.message
    else:
        assert isinstance(policy, Policy)


def _spots(tree: Any, where: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    """Every path into the tree (dict keys and list indexes), the root included."""
    out = [where]
    if isinstance(tree, dict):
        for k, v in tree.items():
            out += _spots(v, (*where, k))
    elif isinstance(tree, list):
        for i, v in enumerate(tree):
            out += _spots(v, (*where, i))
    return out


SPOTS = _spots(EXAMPLE)[1:]


def _apply(doc: Any, where: tuple[Any, ...], how: str, new: Any) -> None:
    """Change ``doc`` in place at ``where``: replace, delete, or add beside."""
    parent = doc
    for step in where[:-1]:
        parent = parent[step]
    last = where[-1]
    if how == "delete":
        del parent[last]
    elif how == "add" and isinstance(parent[last], dict):
        parent[last]["extra_" + type(new).__name__] = new
    elif how == "add" and isinstance(parent[last], list):
        parent[last].append(new)
    else:
        parent[last] = new


def _mutate(where: tuple[Any, ...], how: str, new: Any) -> Any:
    doc = copy.deepcopy(EXAMPLE)
    _apply(doc, where, how, new)
    return doc


def test_the_example_loads() -> None:
    assert isinstance(parse_policy(copy.deepcopy(EXAMPLE), FILE), Policy)


# What the fuzzing found, kept as plain examples: each was a traceback (OverflowError,
# OSError, RecursionError) or a silently accepted NaN before.
FOUND: list[tuple[tuple[Any, ...], Any, str]] = [
    (("reservations", "ttl_s"), 10**400, "reservations.ttl_s: must be at most"),
    (("reservations", "ttl_s"), float("nan"), "reservations.ttl_s: must be a number"),
    (("identity", "jwt", "leeway_s"), float("inf"), "identity.jwt.leeway_s: must be a number"),
    (("weights", "output"), 10**400, "weights.output: must be at most"),
    (("budgets", 0, "tokens"), 2**64, "budgets[0].tokens: must be at most"),
    (("timezone",), "a" * 5000, "timezone: is not a known IANA timezone"),
    (("subject", "org", "pattern"), "a{99999999999}", "subject.org.pattern: is not a valid"),
    (("identity", "jwt", "jwks_file"), "a" * 5000, "identity.jwt.jwks_file: cannot be read"),
    (("budgets", 0, "match", "org"), _nest(5000), "budgets[0].match.org: must be a name"),
    (("subject", "leaf", 0, "require"), {"x": _nest(5000)}, "leaf[0].require.x: must be"),
    (("budgets",), _nest(5000), "budgets[0]: must be a mapping (got [[[[...]]]])"),
]


@pytest.mark.parametrize(("where", "new", "message"), FOUND)
def test_what_fuzzing_found(where: tuple[Any, ...], new: Any, message: str) -> None:
    doc = copy.deepcopy(EXAMPLE)
    if where[:2] == ("subject", "leaf"):
        doc["subject"]["leaf"][0]["require"] = {}
    _apply(doc, where, "replace", new)
    with pytest.raises(PolicyError) as err:
        parse_policy(doc, FILE)
    assert str(err.value).startswith(f"{FILE}:") and message in str(err.value), str(err.value)


@pytest.mark.parametrize(
    ("text", "message"),
    [(b"[" * 5000, "is nested too deeply"), (b"version: 1\n\xff\xfe", "is not UTF-8 text")],
)
def test_unreadable_files_are_policy_errors(tmp_path: Path, text: bytes, message: str) -> None:
    path = tmp_path / "policy.yaml"
    path.write_bytes(text)
    with pytest.raises(PolicyError, match=message):
        load_policy(path)


@given(trees)
def test_random_trees_load_or_fail_with_file_and_path(data: Any) -> None:
    _outcome(data)


@given(st.dictionaries(keys, trees, max_size=8))
def test_random_top_level_mappings(data: dict[str, Any]) -> None:
    _outcome({"version": 1, **data})


@given(st.sampled_from(SPOTS), st.sampled_from(["replace", "delete", "add"]), trees)
def test_one_change_to_the_example(where: tuple[Any, ...], how: str, new: Any) -> None:
    _outcome(_mutate(where, how, new))


@given(st.lists(st.tuples(st.sampled_from(SPOTS), trees), min_size=2, max_size=4))
def test_several_changes_to_the_example(changes: list[tuple[tuple[Any, ...], Any]]) -> None:
    doc = copy.deepcopy(EXAMPLE)
    for where, new in changes:
        with contextlib.suppress(KeyError, IndexError, TypeError):
            _apply(doc, where, "replace", new)  # unless an earlier change removed the spot
    _outcome(doc)


_TEXT = EXAMPLE_FILE.read_text()


texts = st.text(max_size=20) | st.integers(100, 1500).map(lambda n: "[" * n)


@pytest.fixture(scope="module")
def workdir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One directory for every example (a fresh one each would cost more than the parse)."""
    path = tmp_path_factory.mktemp("fuzz")
    (path / "dev").mkdir()
    (path / "dev" / "jwks.json").write_text((ROOT / "examples" / "dev" / "jwks.json").read_text())
    return path


@settings(max_examples=60)
@given(st.integers(0, len(_TEXT)), st.integers(0, 40), texts)
def test_text_edits_of_the_example_file(workdir: Path, at: int, cut: int, insert: str) -> None:
    path = workdir / "policy.yaml"
    path.write_text(_TEXT[:at] + insert + _TEXT[at + cut :], encoding="utf-8",
                    errors="surrogatepass")  # fmt: skip
    try:
        policy = load_policy(path)
    except PolicyError as exc:
        assert str(exc).startswith(f"{path}:"), str(exc)
    else:
        assert isinstance(policy, Policy)
