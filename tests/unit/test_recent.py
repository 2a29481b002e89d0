"""authz.recent: memos that forget idle callers and never keep one seen only once."""

from __future__ import annotations

import pytest

from authz.recent import Doorkeeper, Recent

pytestmark = [pytest.mark.unit]


def test_recent_keeps_what_was_used_in_the_last_two_rotations() -> None:
    memo: Recent[str, int] = Recent()
    memo["a"], memo["b"] = 1, 2
    assert memo.rotate() == 0
    assert memo.get("a") == 1  # moved to the young generation
    assert memo.rotate() == 1  # b was not asked for since
    assert (memo.get("a"), memo.get("b")) == (1, None)


def test_recent_rotates_early_when_full() -> None:
    memo: Recent[int, int] = Recent(max_entries=10)
    for i in range(100):
        memo[i] = i
    assert len(memo) <= 20


def test_offer_keeps_an_entry_only_from_its_second_offer() -> None:
    memo: Recent[str, int] = Recent()
    assert not memo.offer("once", 1)
    assert memo.get("once") is None and len(memo) == 0
    assert memo.offer("once", 1)
    assert memo.get("once") == 1


def test_offer_by_another_key_and_forgets_offers_two_rotations_old() -> None:
    memo: Recent[int, str] = Recent()
    assert not memo.offer(1, "x", seen="caller")
    assert memo.offer(2, "y", seen="caller")  # same caller, another key: kept
    assert not memo.offer(3, "z", seen="other")
    memo.rotate()
    assert memo.offer(3, "z", seen="other")  # offered in the last rotation: kept
    assert not memo.offer(4, "w", seen="third")
    memo.rotate()
    memo.rotate()
    assert not memo.offer(4, "w", seen="third")  # two rotations ago: a stranger again


def test_a_burst_of_one_off_keys_keeps_nothing_and_counts_as_forgotten() -> None:
    """200k callers once each: no entry, so nothing to pin memory once they are gone;
    the rotation reports them, so authz.reclaim gives memory back after such a burst."""
    memo: Recent[str, int] = Recent()
    kept = sum(memo.offer(f"user-{i}", i) for i in range(200_000))
    assert len(memo) == kept < 200_000 * 0.2  # hash collisions only
    assert memo.rotate() == 200_000 - kept


def test_doorkeeper_size_must_be_a_power_of_two() -> None:
    with pytest.raises(ValueError, match="power of two"):
        Doorkeeper(1000)
    door = Doorkeeper(8)
    assert not door.admit(3) and door.admit(3)


def test_reclaim_trims_after_a_burst_and_once_more_when_its_tail_is_gone() -> None:
    """The memos turn away a burst at one rotation; the ledger's minute windows and
    settled ids of those callers go a minute or two later: a second trim then."""
    from authz import reclaim

    if reclaim._malloc_trim() is None:  # not glibc: nothing to give back this way
        assert not reclaim.release_memory(reclaim.RECLAIM_AT, now=0.0)
        return
    assert reclaim.release_memory(reclaim.RECLAIM_AT, now=1000.0)
    assert not reclaim.release_memory(0, now=1060.0)  # a quiet rotation, too soon
    assert reclaim.release_memory(0, now=1000.0 + reclaim.TAIL_S)
    assert not reclaim.release_memory(0, now=2000.0)  # once only
