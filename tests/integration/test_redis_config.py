"""Ledger URLs, the policy's ledger.url, and the hash tags that keep an org in one slot.

Unit tests (no Redis needed) for the Redis ledger's pure parts.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from authz.clock import FakeClock
from authz.errors import PolicyError
from authz.ledger import Limit, MemoryLedger, open_ledger
from authz.ledger.lease import LeasedLedger
from authz.ledger.redis.config import parse_redis_url, redact_url
from authz.ledger.redis.keys import FALLBACK_TAG, Keys
from authz.ledger.redis.ledger import RedisLedger
from authz.policy.loader import load_policy
from authz.policy.model import Weights

pytestmark = pytest.mark.unit

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures" / "policies"
SECRET = "hunter2-secret"


def test_urls_of_every_scheme() -> None:
    single = parse_redis_url("redis://:pw@cache.internal:6380/3?pool=8&timeout=0.2&lease=off")
    assert (single.hosts, single.db, single.password, single.pool) == (
        (("cache.internal", 6380),), 3, "pw", 8)  # fmt: skip
    assert single.timeout_s == 0.2 and not single.lease.enabled and not single.cluster
    tls = parse_redis_url("rediss://user:pw@[::1]:6390")
    assert tls.tls and tls.username == "user" and tls.hosts == (("::1", 6390),)
    cluster = parse_redis_url("redis+cluster://a:7000,b:7001,c?lease_flush_ms=20&prefix=q")
    assert cluster.cluster and cluster.hosts == (("a", 7000), ("b", 7001), ("c", 6379))
    assert cluster.lease.flush_s == 0.02 and cluster.prefix == "q"
    assert parse_redis_url("rediss+cluster://a:1").tls


def test_password_from_the_environment_and_never_shown(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("AUTHZ_REDIS_PASSWORD", SECRET)
    opts = parse_redis_url("redis://cache:6379/0")
    assert opts.password == SECRET
    assert SECRET not in repr(opts) and SECRET not in opts.safe()
    assert redact_url(f"redis://u:{SECRET}@h:1/0") == "redis://u:***@h:1/0"


@pytest.mark.parametrize(
    ("url", "message"),
    [
        ("memcached://h", "unsupported ledger URL scheme"),
        ("redis://a:1,b:2", "several hosts need redis+cluster://"),
        ("redis+cluster://a:1/2", "no database number"),
        ("redis://h/x", "the database must be a number"),
        ("redis://h:99999", "bad port"),
        ("redis://h?lease=maybe", "lease must be on or off"),
        ("redis://h?lease_fraction=2", "between 0.0 and 1.0"),
        ("redis://h?colour=blue", "unknown ledger URL option(s): colour"),
        ("redis://h?prefix={x}", "without braces"),
    ],
)
def test_bad_urls_say_what_is_wrong(url: str, message: str) -> None:
    scheme, _, rest = url.partition("://")
    with pytest.raises(ValueError) as err:
        parse_redis_url(f"{scheme}://:{SECRET}@{rest}")
    assert message in str(err.value) and SECRET not in str(err.value)


def test_open_ledger_by_url() -> None:
    clock = FakeClock()
    assert isinstance(open_ledger("memory://", clock), MemoryLedger)
    assert isinstance(open_ledger("redis://127.0.0.1:1/0?lease=off", clock), RedisLedger)
    assert isinstance(open_ledger("redis+cluster://127.0.0.1:1", clock), RedisLedger)  # default
    assert isinstance(open_ledger("redis+cluster://127.0.0.1:1?lease=on", clock), LeasedLedger)
    with pytest.raises(ValueError, match="unsupported"):
        open_ledger("etcd://x", clock)


def _policy(tmp_path: Path, url: str) -> Path:
    shutil.copy(FIXTURES / "jwks.json", tmp_path / "jwks.json")
    path = tmp_path / "policy.yaml"
    path.write_text((FIXTURES / "good.yaml").read_text() + f"ledger:\n  url: {url!r}\n")
    return path


def test_policy_accepts_redis_urls_and_names_a_bad_one(tmp_path: Path) -> None:
    for url in ("redis://r:6379/0", "rediss://r:6380", "redis+cluster://a:1,b:2"):
        assert load_policy(_policy(tmp_path, url)).ledger_url == url
    with pytest.raises(PolicyError) as err:
        load_policy(_policy(tmp_path, f"redis://:{SECRET}@r:6379/0?nope=1"))
    assert str(err.value).startswith(f"{tmp_path / 'policy.yaml'}:ledger.url: unknown")
    assert SECRET not in str(err.value) and "***" in str(err.value)


def _limit(node: str) -> Limit:
    return Limit(f"b|{node}|0", "b", node, 10, 0.0, Weights())


def test_one_org_one_hash_tag() -> None:
    keys = Keys("authz")
    limits = (_limit("org:acme"), _limit("org:acme/department:r/user:u"))
    assert keys.tag_for("0" * 32 + "@acme", limits) == "acme"
    assert keys.counter("acme", "b|org:acme|0") == "authz:{acme}:c:b|org:acme|0"
    with pytest.raises(ValueError, match="spans orgs"):
        keys.tag_for("0" * 32 + "@acme", (_limit("org:other"),))
    # A brace in a name would cut the hash tag short: such orgs get a digest.
    weird = keys.tag_for_node("org:a{b}c/user:x")
    assert weird.startswith("#") and "{" not in weird
    assert keys.tag_for("r1@a{b}c", (_limit("org:a{b}c/user:x"),)) == weird
    # An org named "a/b" and its nodes agree on the part both can see.
    assert keys.tag_for("r1@a/b", (_limit("org:a/b/user:x"),)) == "a"
    # Ids and nodes that follow neither convention share one fallback slot.
    assert keys.tag_for("r1", (_limit("org|a"), _limit("user|u"))) == FALLBACK_TAG
