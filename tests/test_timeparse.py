"""Restore times typed by people: UK time, BST, clock changes, windows."""

from __future__ import annotations

from datetime import datetime, timedelta, timezone

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from dr.errors import InvalidRestoreTime
from dr.timeparse import check_in_window, parse_restore_time

UTC = timezone.utc


class TestUkLocalTime:
    def test_summer_time_is_one_hour_ahead(self):
        assert parse_restore_time("2026-07-01 14:30") == datetime(2026, 7, 1, 13, 30, tzinfo=UTC)

    def test_winter_time_is_utc(self):
        assert parse_restore_time("2026-01-15 14:30:15") == datetime(2026, 1, 15, 14, 30, 15, tzinfo=UTC)

    def test_ambiguous_time_when_clocks_go_back_is_refused_with_both_candidates(self):
        with pytest.raises(InvalidRestoreTime) as err:
            parse_restore_time("2026-10-25 01:30")
        msg = str(err.value)
        assert "happened twice" in msg and "00:30:00 UTC" in msg and "01:30:00 UTC" in msg

    def test_non_existent_time_when_clocks_go_forward_is_refused(self):
        with pytest.raises(InvalidRestoreTime) as err:
            parse_restore_time("2026-03-29 01:30")
        assert "does not exist" in str(err.value) and "went forward" in str(err.value)

    @pytest.mark.parametrize("text, expected", [
        ("2026-10-25 01:30+01:00", datetime(2026, 10, 25, 0, 30, tzinfo=UTC)),
        ("2026-10-25 01:30+00:00", datetime(2026, 10, 25, 1, 30, tzinfo=UTC)),
        ("2026-10-25 01:30 BST", datetime(2026, 10, 25, 0, 30, tzinfo=UTC)),
        ("2026-10-25 01:30 GMT", datetime(2026, 10, 25, 1, 30, tzinfo=UTC)),
        ("2026-03-29T01:30:00Z", datetime(2026, 3, 29, 1, 30, tzinfo=UTC)),
    ])
    def test_an_explicit_offset_settles_it(self, text, expected):
        assert parse_restore_time(text) == expected

    @pytest.mark.parametrize("text", ["", "yesterday", "2026-13-01 10:00", "2026-02-30 10:00", "1700000000",
                                      "2026-07-01", "2026-07-01 25:00", "2026-07-01 10:00; DROP DATABASE x"])
    def test_malformed(self, text):
        with pytest.raises(InvalidRestoreTime):
            parse_restore_time(text)

    def test_other_zone(self):
        assert parse_restore_time("2026-07-01 09:00", "America/New_York") == datetime(2026, 7, 1, 13, 0, tzinfo=UTC)


class TestWindow:
    def test_future_time_is_refused_showing_the_window(self):
        now = datetime(2026, 7, 1, 12, 0, tzinfo=UTC)
        with pytest.raises(InvalidRestoreTime, match="in the future.*restore window is 2026-06-24"):
            check_in_window(now + timedelta(minutes=1), now - timedelta(days=7), now - timedelta(minutes=5),
                            "Europe/London", now=now)

    def test_before_window_shows_both_utc_and_uk_time(self):
        now = datetime(2026, 7, 1, 12, 0, tzinfo=UTC)
        with pytest.raises(InvalidRestoreTime) as err:
            check_in_window(now - timedelta(days=8), now - timedelta(days=7), now, "Europe/London", now=now)
        assert "UTC" in str(err.value) and "BST" in str(err.value)

    def test_inside_is_fine(self):
        now = datetime(2026, 7, 1, 12, 0, tzinfo=UTC)
        check_in_window(now - timedelta(hours=1), now - timedelta(days=7), now, "Europe/London", now=now)


@settings(max_examples=300, deadline=None)
@given(st.datetimes(min_value=datetime(2000, 1, 1), max_value=datetime(2099, 12, 31)))
def test_any_local_time_is_either_refused_or_round_trips(naive):
    """Property: an accepted time converts back to exactly what was typed."""
    from zoneinfo import ZoneInfo

    naive = naive.replace(microsecond=0)
    text = naive.strftime("%Y-%m-%d %H:%M:%S")
    try:
        got = parse_restore_time(text)
    except InvalidRestoreTime as exc:
        assert "twice" in str(exc) or "does not exist" in str(exc)
        assert naive.month in (3, 10) and naive.weekday() == 6 and naive.hour == 1
        return
    assert got.tzinfo == UTC
    assert got.astimezone(ZoneInfo("Europe/London")).replace(tzinfo=None) == naive


@settings(max_examples=200, deadline=None)
@given(st.text(max_size=40))
def test_arbitrary_text_never_crashes_with_anything_but_invalid_restore_time(text):
    try:
        parse_restore_time(text)
    except InvalidRestoreTime:
        pass
