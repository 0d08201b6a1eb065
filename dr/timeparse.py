"""Restore times as people type them: UK local time by default, checked for clock changes.

`parse_restore_time("2026-10-25 01:30")` in Europe/London is AMBIGUOUS (the hour is
repeated when BST ends) and `"2026-03-29 01:30"` does NOT EXIST (skipped when BST
starts): both are refused with the candidate UTC times, unless the person gives an
explicit offset (`+01:00`, `+00:00`, `Z`). The result is always an aware UTC datetime,
truncated to whole seconds (the resolution of Azure's point-in-time restore).
"""

from __future__ import annotations

import re
from datetime import datetime, timedelta, timezone
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from dr.errors import InvalidRestoreTime

#: the widest UTC offsets in use anywhere (UTC-12:00 to UTC+14:00)
MAX_OFFSET = timedelta(hours=14)
#: restore times before this are refused as nonsense (no backup or WAL goes back that far)
EARLIEST_YEAR = 1990

_FORMAT = re.compile(
    r"^\s*(?P<date>\d{4}-\d{2}-\d{2})[ T](?P<time>\d{2}:\d{2}(?::\d{2})?)"
    r"\s*(?P<off>Z|[+-]\d{2}:?\d{2}|UTC|GMT|BST)?\s*$",
    re.IGNORECASE,
)


def _zone(name: str) -> ZoneInfo:
    """The IANA zone `name`, or `InvalidRestoreTime` naming it."""
    try:
        if not isinstance(name, str) or not name:
            raise ValueError(name)
        return ZoneInfo(name)
    except (ZoneInfoNotFoundError, ValueError, TypeError, OSError):
        raise InvalidRestoreTime(f"unknown time zone {name!r} for the restore time; use an IANA name such as "
                                 "Europe/London") from None


def fmt_both(dt: datetime, zone: str) -> str:
    """`2026-07-01 10:00:00 UTC (11:00:00 BST Europe/London)`."""
    local = dt.astimezone(ZoneInfo(zone))
    return f"{dt.astimezone(timezone.utc):%Y-%m-%d %H:%M:%S} UTC ({local:%Y-%m-%d %H:%M:%S %Z} {zone})"


def parse_restore_time(text: str, zone: str = "Europe/London") -> datetime:
    """Turn a typed time into an aware UTC datetime, refusing anything unclear.

    Args:
        text: `YYYY-MM-DD HH:MM[:SS]` in `zone`'s local time, or with an explicit offset
            (`Z`, `+01:00`, `UTC`, `GMT`, or `BST` meaning +01:00).
        zone: the IANA zone of times typed without an offset.

    Raises:
        InvalidRestoreTime: malformed, ambiguous, or non-existent in `zone`; an unknown zone, an
            offset more than 14 hours from UTC, or a time before 1990 (an epoch or a typo).
    """
    if not isinstance(text, str):
        raise InvalidRestoreTime(f"the restore time must be text like '2026-07-01 14:30', not {type(text).__name__}")
    z = _zone(zone)
    m = _FORMAT.match(text)
    if not m:
        raise InvalidRestoreTime(
            f"cannot read the restore time {text!r}: write it as YYYY-MM-DD HH:MM[:SS] in UK time, "
            "or with an offset, e.g. '2026-07-01 14:30' or '2026-07-01 13:30Z'"
        )
    t = m.group("time") if len(m.group("time")) == 8 else m.group("time") + ":00"
    try:
        naive = datetime.fromisoformat(f"{m.group('date')}T{t}")
    except ValueError as exc:
        raise InvalidRestoreTime(f"the restore time {text!r} is not a real date or time: {exc}") from exc
    if naive.year < EARLIEST_YEAR:
        raise InvalidRestoreTime(f"the restore time {text!r} is before {EARLIEST_YEAR}: no backup goes back that far "
                                 "(a Unix epoch or a typo?)")
    off = (m.group("off") or "").upper()
    if off:
        if off in ("Z", "UTC", "GMT"):
            tz = timezone.utc
        elif off == "BST":
            tz = timezone(timedelta(hours=1))
        else:
            sign = 1 if off[0] == "+" else -1
            digits = off[1:].replace(":", "")
            hours, minutes = int(digits[:2]), int(digits[2:])
            if minutes > 59 or timedelta(hours=hours, minutes=minutes) > MAX_OFFSET:
                raise InvalidRestoreTime(f"the offset {m.group('off')} of {text!r} is not a real UTC offset "
                                         "(at most 14 hours either side of UTC)")
            tz = timezone(sign * timedelta(hours=hours, minutes=minutes))
        try:
            return naive.replace(tzinfo=tz).astimezone(timezone.utc)
        except OverflowError as exc:
            raise InvalidRestoreTime(f"the restore time {text!r} is out of range") from exc

    first = naive.replace(tzinfo=z, fold=0)
    second = naive.replace(tzinfo=z, fold=1)
    if first.utcoffset() != second.utcoffset():
        a, b = first.astimezone(timezone.utc), second.astimezone(timezone.utc)
        back = a.astimezone(z).replace(tzinfo=None)
        if back != naive:  # the wall clock never showed this time
            raise InvalidRestoreTime(
                f"{naive:%Y-%m-%d %H:%M:%S} does not exist in {zone}: the clocks went forward then. "
                f"Give an explicit offset, e.g. '{naive:%Y-%m-%d %H:%M:%S}+00:00' ({a:%H:%M:%S} UTC) "
                f"or '{naive:%Y-%m-%d %H:%M:%S}+01:00' ({b:%H:%M:%S} UTC)"
            )
        early, late = sorted((a, b))
        raise InvalidRestoreTime(
            f"{naive:%Y-%m-%d %H:%M:%S} happened twice in {zone} (the clocks went back): "
            f"{early:%H:%M:%S} UTC (+01:00, BST) or {late:%H:%M:%S} UTC (+00:00, GMT). "
            f"Say which with an offset, e.g. '{naive:%Y-%m-%d %H:%M:%S}+01:00'"
        )
    return first.astimezone(timezone.utc)


def check_in_window(when: datetime, earliest: datetime, latest: datetime, zone: str, *,
                    now: datetime | None = None) -> None:
    """Refuse a restore time in the future or outside [earliest, latest], showing the window.

    Raises:
        InvalidRestoreTime: naming the window in UTC and local time.
    """
    now = now or datetime.now(timezone.utc)
    window = f"the restore window is {fmt_both(earliest, zone)} to {fmt_both(latest, zone)}"
    if when > now:
        raise InvalidRestoreTime(f"{fmt_both(when, zone)} is in the future; {window}")
    if when < earliest or when > latest:
        raise InvalidRestoreTime(f"{fmt_both(when, zone)} is outside the restore window; {window}")
