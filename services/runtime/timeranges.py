"""Local time in a time zone, and daily time ranges ("22:00-06:00"): night hours, schedules, quiet hours.

A range runs from its start up to (not including) its end; when the end is not later than the start it
runs overnight. Times are the wall clock of the zone at that instant (zoneinfo), so a range means the
same hours on the day a DST change moves the clock.
"""

from __future__ import annotations

import datetime as dt
import zoneinfo
from functools import lru_cache


@lru_cache(maxsize=64)
def _zone(name: str) -> zoneinfo.ZoneInfo:
    return zoneinfo.ZoneInfo(name)


def local(t: float, tz: str | None) -> dt.datetime:
    """The instant `t` (seconds since the epoch) on the wall clock of zone `tz` (None: the machine's)."""
    if tz is None:
        return dt.datetime.fromtimestamp(t).astimezone()
    return dt.datetime.fromtimestamp(t, _zone(tz))


def parse_range(text: str) -> tuple[int, int]:
    """ "22:00-06:00" -> (1320, 360): minutes of the day (the config checked the form)."""
    start, end = text.split("-")
    return _minutes(start), _minutes(end)


def _minutes(hhmm: str) -> int:
    h, m = hhmm.split(":")
    return int(h) * 60 + int(m)


def minute_of_day(when: dt.datetime) -> int:
    return when.hour * 60 + when.minute


def in_range(minute: int, rng: tuple[int, int]) -> bool:
    start, end = rng
    if start < end:
        return start <= minute < end
    return minute >= start or minute < end  # overnight (or the whole day when start == end)


def overnight(rng: tuple[int, int]) -> bool:
    return rng[1] <= rng[0]


def in_any(when: dt.datetime, ranges: list[str]) -> bool:
    m = minute_of_day(when)
    return any(in_range(m, parse_range(r)) for r in ranges)
