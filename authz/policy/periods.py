"""Calendar-aligned budget periods in the policy's timezone.

A "day" is midnight to midnight local time, so a DST change makes it 23 or 25 hours
long; a "week" starts on Monday (ISO 8601); a "month" on the 1st.
"""

from __future__ import annotations

from datetime import datetime, timedelta
from zoneinfo import ZoneInfo

__all__ = ["PeriodWindows", "window"]


def _start(period: str, local: datetime) -> datetime:
    if period == "minute":
        return local.replace(second=0, microsecond=0)
    if period == "hour":
        return local.replace(minute=0, second=0, microsecond=0)
    day = local.replace(hour=0, minute=0, second=0, microsecond=0)
    if period == "day":
        return day
    if period == "week":
        return day - timedelta(days=day.weekday())
    if period == "month":
        return day.replace(day=1)
    raise ValueError(f"unknown period {period!r}")


def _next(period: str, start: datetime) -> datetime:
    if period in ("minute", "hour"):
        # Add in UTC: local wall-clock hours repeat or vanish at DST changes.
        step = timedelta(minutes=1) if period == "minute" else timedelta(hours=1)
        return (start.astimezone(ZoneInfo("UTC")) + step).astimezone(start.tzinfo)
    if period == "day":
        naive = start.replace(tzinfo=None) + timedelta(days=1)
    elif period == "week":
        naive = start.replace(tzinfo=None) + timedelta(days=7)
    else:
        year, month = (start.year + 1, 1) if start.month == 12 else (start.year, start.month + 1)
        naive = start.replace(tzinfo=None, year=year, month=month)
    return naive.replace(tzinfo=start.tzinfo)


def window(period: str, tz: ZoneInfo, now: float) -> tuple[float, float]:
    """The [start, end) of the period that contains ``now``, as epoch seconds."""
    local = datetime.fromtimestamp(now, tz)
    start = _start(period, local)
    return start.timestamp(), _next(period, start).timestamp()


class PeriodWindows:
    """Caches the current window per period: the hot path asks on every check."""

    def __init__(
        self, tz: ZoneInfo, *, previous: ZoneInfo | None = None, since: float = 0.0
    ) -> None:
        self._tz = tz
        self._cache: dict[str, tuple[float, float, float]] = {}
        # A reload changed the timezone at ``since``: the window then current continues
        # the old timezone's window of that moment (issue 16: edits keep what was spent).
        self._previous, self._since = previous, since

    def replaced_start(self, period: str, start: float) -> float | None:
        """The start of the old timezone's window that the window starting at ``start``
        continues, if a timezone change happened inside it; else None."""
        if self._previous is None or start > self._since:
            return None
        old = window(period, self._previous, self._since)[0]
        return None if old == start else old

    def get(self, period: str, now: float) -> tuple[float, float]:
        start, end, _ = self.get_with_previous(period, now)
        return start, end

    def get_with_previous(self, period: str, now: float) -> tuple[float, float, float]:
        """(start, end, previous window's start): burst payback needs the last window."""
        hit = self._cache.get(period)
        if hit is not None and hit[0] <= now < hit[1]:
            return hit
        start, end = window(period, self._tz, now)
        win = (start, end, window(period, self._tz, start - 0.5)[0])
        self._cache[period] = win
        return win
