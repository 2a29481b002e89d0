from __future__ import annotations

from datetime import datetime
from pathlib import Path
from zoneinfo import ZoneInfo

import pytest

from authz.policy.loader import load_policy
from authz.policy.model import Node, SubjectPath
from authz.policy.periods import PeriodWindows, window
from authz.policy.subject import SubjectUnmapped, map_subject

pytestmark = pytest.mark.unit
POLICY = load_policy(Path(__file__).parent.parent / "fixtures" / "policies" / "good.yaml")


def ts(text: str, tz: str = "UTC") -> float:
    return datetime.fromisoformat(text).replace(tzinfo=ZoneInfo(tz)).timestamp()


def test_full_path_from_claims() -> None:
    path = map_subject(
        POLICY.subject,
        {
            "org_id": "acme",
            "department": "research",
            "groups": ["admins", "team-nlp"],
            "sub": "alice",
        },
    )
    assert path.nodes == (
        Node("org", "acme"),
        Node("department", "research"),
        Node("team", "nlp"),
        Node("user", "alice"),
    )
    assert path.prefix_key("department") == "org:acme/department:research"


def test_fallback_skip_and_app_leaf() -> None:
    path = map_subject(POLICY.subject, {"org_id": "acme", "client_id": "bot", "sub": "svc-1"})
    assert str(path) == "org:acme/department:unassigned/app:bot"


def test_missing_org_denied_with_reason() -> None:
    with pytest.raises(SubjectUnmapped, match="no org_id claim for org"):
        map_subject(POLICY.subject, {"sub": "alice"})


def test_missing_leaf_denied() -> None:
    with pytest.raises(SubjectUnmapped, match="names no user or app"):
        map_subject(POLICY.subject, {"org_id": "acme"})


def test_budget_specificity() -> None:
    path = SubjectPath((Node("org", "acme"), Node("user", "alice")))
    assert [b.name for b in POLICY.budgets_for(path)] == ["org-month", "user-day"]
    other = SubjectPath((Node("org", "globex"), Node("user", "bob")))
    assert [b.name for b in POLICY.budgets_for(other)] == ["user-day"]


@pytest.mark.parametrize(
    ("period", "now", "start", "end"),
    [
        ("hour", "2026-03-29T01:30:00", "2026-03-29T01:00:00", "2026-03-29T03:00:00"),
        ("day", "2026-03-29T12:00:00", "2026-03-29T00:00:00", "2026-03-30T00:00:00"),
        ("week", "2026-12-31T12:00:00", "2026-12-28T00:00:00", "2027-01-04T00:00:00"),
        ("month", "2026-12-31T23:59:59", "2026-12-01T00:00:00", "2027-01-01T00:00:00"),
    ],
)
def test_calendar_windows_in_timezone(period: str, now: str, start: str, end: str) -> None:
    tz = ZoneInfo("Europe/Berlin")
    got = window(period, tz, ts(now, "Europe/Berlin"))
    assert got == (ts(start, "Europe/Berlin"), ts(end, "Europe/Berlin"))


def test_dst_day_is_23_hours() -> None:
    start, end = window(
        "day", ZoneInfo("Europe/Berlin"), ts("2026-03-29T12:00:00", "Europe/Berlin")
    )
    assert end - start == 23 * 3600


def test_window_cache_rolls_over() -> None:
    w = PeriodWindows(ZoneInfo("UTC"))
    first = w.get("day", ts("2026-05-01T23:59:59"))
    second = w.get("day", ts("2026-05-02T00:00:00"))
    assert first[1] == second[0]
