"""Retention: exactly the right nightlies go; newest, young, incomplete, held and non-nightly ones never do."""

from __future__ import annotations

import json
import logging
import os
import time
from datetime import date, datetime, timedelta, timezone
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from dr.config import Retention
from dr.errors import BackupError, BackupNotFound, InvalidInput
from dr.platforms.base import BackupInfo
from dr.platforms.local.store import META_SUFFIX, LocalBackupStore
from dr.retention import apply_retention, is_nightly, select_keep

NOW = datetime(2026, 11, 26, 3, 0, tzinfo=timezone.utc)
POLICY = Retention(daily=7, weekly=4, monthly=6)


def _at(day: date, hour: int = 1) -> datetime:
    return datetime(day.year, day.month, day.day, hour, 0, tzinfo=timezone.utc)


def _days(first: date, last: date) -> list[date]:
    return [first + timedelta(days=i) for i in range((last - first).days + 1)]


def put(store: LocalBackupStore, name: str, kind: str, when: datetime) -> BackupInfo:
    """A backup of ours, committed through the store's own writer."""
    with store.writer(name) as w:
        w.write(b"x" * 16)
        return w.commit(BackupInfo(name=name, size=0, complete=True, created_at=when - timedelta(minutes=20),
                                   finished_at=when, kind=kind, format="plain-gzip"))


def put_foreign(store: LocalBackupStore, name: str, when: datetime) -> None:
    """A file the existing tooling uploaded: no sidecar, its mtime the upload time."""
    path = store.root / name
    path.write_bytes(b"\x1f\x8b foreign")
    os.utime(path, (when.timestamp(), when.timestamp()))


def put_incomplete(store: LocalBackupStore, name: str, when: datetime) -> None:
    """What a crash between linking the data and completing the sidecar leaves behind."""
    (store.root / name).write_bytes(b"partial")
    info = BackupInfo(name=name, size=7, complete=False, created_at=when, finished_at=when, kind="nightly",
                      sha256="0" * 64, format="plain-gzip")
    (store.root / (name + META_SUFFIX)).write_text(json.dumps(info.to_json()))


def names(store: LocalBackupStore) -> set[str]:
    return {b.name for b in store.list_backups()}


@pytest.fixture
def store(tmp_path: Path) -> LocalBackupStore:
    return LocalBackupStore(tmp_path / "store")


@pytest.fixture
def seeded(store: LocalBackupStore) -> LocalBackupStore:
    """Five months of history: 120 of our nightlies, older foreign ones, adhoc and odd ones."""
    for d in _days(date(2026, 7, 29), date(2026, 11, 25)):  # 120 nights
        put(store, f"apply_dv_{d:%Y-%m-%d}.sql.gz", "nightly", _at(d))
    for d in [date(2026, 5, 31), *_days(date(2026, 6, 10), date(2026, 6, 20))]:
        put_foreign(store, f"apply_dv_{d:%Y-%m-%d}.sql.gz", _at(d, 2))
    put_foreign(store, "find_dv_2026-03-01.sql.gz", _at(date(2026, 3, 1)))  # another service's only backup
    put_foreign(store, "apply_dv_manual-copy.sql.gz", _at(date(2026, 4, 1)))  # not the nightly naming
    put(store, "apply_dv_adhoc_20260401T100000Z.sql.gz", "adhoc", _at(date(2026, 4, 1), 10))
    put(store, "apply_dv_pre-restore-safety_inc-1_20260702T100000Z.pgdump", "pre-restore-safety",
        _at(date(2026, 7, 2), 10))
    put(store, "apply_dv_ptr_inc-1_20260702T110000Z.pgdump", "ptr", _at(date(2026, 7, 2), 11))
    put_incomplete(store, "apply_dv_2026-06-25.sql.gz", _at(date(2026, 6, 25)))
    return store


#: Worked out by hand for NOW (Thursday 2026-11-26) and 7 daily / 4 weekly / 6 monthly.
EXPECTED_NIGHTLIES_KEPT = {
    # the 7 most recent days (2026-11-20 onwards are also inside the 7-day PTR window)
    *(f"apply_dv_2026-11-{d}.sql.gz" for d in range(19, 26)),
    # newest of ISO weeks 47 (Nov 16-22 → 22nd, already daily), 46 (→ 15th), 45 (→ 8th), 48 (→ 25th)
    "apply_dv_2026-11-15.sql.gz", "apply_dv_2026-11-08.sql.gz",
    # newest of the 6 most recent months: Nov (25th), Oct, Sep, Aug, Jul (ours), Jun (foreign); not May
    "apply_dv_2026-10-31.sql.gz", "apply_dv_2026-09-30.sql.gz", "apply_dv_2026-08-31.sql.gz",
    "apply_dv_2026-07-31.sql.gz", "apply_dv_2026-06-20.sql.gz",
    # the only backup of its series
    "find_dv_2026-03-01.sql.gz",
}
NEVER_MANAGED = {
    "apply_dv_manual-copy.sql.gz", "apply_dv_adhoc_20260401T100000Z.sql.gz",
    "apply_dv_pre-restore-safety_inc-1_20260702T100000Z.pgdump", "apply_dv_ptr_inc-1_20260702T110000Z.pgdump",
    "apply_dv_2026-06-25.sql.gz",  # incomplete
}


class TestSeededStore:
    def test_keeps_exactly_the_expected_set(self, seeded):
        before = names(seeded)
        assert len(before) == 120 + 12 + 1 + 1 + 3 + 1  # ours, foreign apply, find, odd name, others, incomplete

        report = apply_retention(seeded, POLICY, NOW, dry_run=False)

        after = names(seeded)
        assert after == EXPECTED_NIGHTLIES_KEPT | NEVER_MANAGED
        assert {b.name for b, _ in report.deleted} == before - after
        assert {b.name for b, _ in report.kept} == EXPECTED_NIGHTLIES_KEPT
        assert {b.name for b, _ in report.skipped} == NEVER_MANAGED
        assert report.ok and not report.dry_run
        assert "apply_dv_2026-05-31.sql.gz" in before - after  # newest of May, but May is the 7th month
        assert not (seeded.root / "apply_dv_2026-11-01.sql.gz").exists()
        assert not (seeded.root / ("apply_dv_2026-11-01.sql.gz" + META_SUFFIX)).exists()

    def test_reasons_say_why(self, seeded):
        report = apply_retention(seeded, POLICY, NOW)
        kept = {b.name: why for b, why in report.kept}
        skipped = {b.name: why for b, why in report.skipped}
        assert "newest complete" in kept["apply_dv_2026-11-25.sql.gz"]
        assert "point-in-time-restore window" in kept["apply_dv_2026-11-21.sql.gz"]
        assert "ISO week 2026-W46" in kept["apply_dv_2026-11-15.sql.gz"]
        assert "month 2026-06" in kept["apply_dv_2026-06-20.sql.gz"]
        assert "only one" in kept["find_dv_2026-03-01.sql.gz"]
        assert "incomplete" in skipped["apply_dv_2026-06-25.sql.gz"]
        assert "kind 'adhoc'" in skipped["apply_dv_adhoc_20260401T100000Z.sql.gz"]

    def test_dry_run_deletes_nothing_but_reports_the_same(self, seeded):
        before = names(seeded)
        dry = apply_retention(seeded, POLICY, NOW)
        assert dry.dry_run is True
        assert names(seeded) == before
        assert {b.name for b, _ in dry.deleted} == before - EXPECTED_NIGHTLIES_KEPT - NEVER_MANAGED
        assert "would delete" in dry.summary()

    def test_a_second_run_deletes_nothing_more(self, seeded):
        apply_retention(seeded, POLICY, NOW, dry_run=False)
        again = apply_retention(seeded, POLICY, NOW, dry_run=False)
        assert again.deleted == []
        assert names(seeded) == EXPECTED_NIGHTLIES_KEPT | NEVER_MANAGED


class TestSmallCases:
    def test_the_only_backup_is_kept_however_old(self, store):
        put(store, "apply_dv_2024-01-01.sql.gz", "nightly", _at(date(2024, 1, 1)))
        report = apply_retention(store, Retention(daily=1, weekly=0, monthly=0), NOW, dry_run=False)
        assert names(store) == {"apply_dv_2024-01-01.sql.gz"}
        assert report.deleted == []

    def test_the_newest_complete_is_kept_when_newer_ones_are_incomplete(self, store):
        put(store, "apply_dv_2026-01-01.sql.gz", "nightly", _at(date(2026, 1, 1)))
        put(store, "apply_dv_2026-01-02.sql.gz", "nightly", _at(date(2026, 1, 2)))
        put_incomplete(store, "apply_dv_2026-01-03.sql.gz", _at(date(2026, 1, 3)))
        apply_retention(store, Retention(daily=1, weekly=0, monthly=0), NOW, dry_run=False)
        assert names(store) == {"apply_dv_2026-01-02.sql.gz", "apply_dv_2026-01-03.sql.gz"}

    def test_two_nightlies_on_one_day_keep_the_later(self, store):
        day = date(2026, 10, 1)
        put(store, "apply_dv_2026-10-01.sql.gz", "nightly", _at(day, 1))
        put(store, "apply_dv_2026-10-01.pgdump", "nightly", _at(day, 5))
        put(store, "apply_dv_2026-11-25.sql.gz", "nightly", _at(date(2026, 11, 25)))
        apply_retention(store, Retention(daily=2, weekly=0, monthly=0), NOW, dry_run=False)
        assert names(store) == {"apply_dv_2026-10-01.pgdump", "apply_dv_2026-11-25.sql.gz"}

    def test_failed_nightlies_do_not_use_up_the_daily_buckets(self, store):
        # nothing since 2026-10-10: the 3 most recent nights WITH a backup are kept, not 3 empty days
        for d in _days(date(2026, 10, 1), date(2026, 10, 10)):
            put(store, f"apply_dv_{d:%Y-%m-%d}.sql.gz", "nightly", _at(d))
        apply_retention(store, Retention(daily=3, weekly=0, monthly=0), NOW, dry_run=False)
        assert names(store) == {f"apply_dv_2026-10-{d:02d}.sql.gz" for d in (8, 9, 10)}

    def test_foreign_file_dated_by_name_is_young_even_with_an_old_mtime(self, store):
        put(store, "apply_dv_2026-11-25.sql.gz", "nightly", _at(date(2026, 11, 25)))
        put_foreign(store, "apply_dv_2026-11-22.sql.gz", _at(date(2026, 1, 1)))  # copied with an old mtime
        apply_retention(store, Retention(daily=1, weekly=0, monthly=0), NOW, dry_run=False)
        assert "apply_dv_2026-11-22.sql.gz" in names(store)

    def test_an_old_foreign_nightly_is_deleted(self, store):
        put(store, "apply_dv_2026-11-25.sql.gz", "nightly", _at(date(2026, 11, 25)))
        put_foreign(store, "apply_dv_2026-01-05.sql.gz", _at(date(2026, 1, 5)))
        apply_retention(store, Retention(daily=1, weekly=0, monthly=0), NOW, dry_run=False)
        assert names(store) == {"apply_dv_2026-11-25.sql.gz"}

    def test_naive_now_is_refused(self, store):
        with pytest.raises(InvalidInput, match="aware"):
            apply_retention(store, POLICY, datetime(2026, 11, 26))

    def test_nightly_recognition(self):
        def info(name: str, kind: str) -> BackupInfo:
            return BackupInfo(name=name, size=1, complete=True, created_at=NOW, kind=kind)

        assert is_nightly(info("apply_dv_2026-01-01.sql.gz", "unknown"))
        assert is_nightly(info("whatever.pgdump", "nightly"))
        assert not is_nightly(info("apply_xx_2026-01-01.sql.gz", "unknown"))  # no such environment
        assert not is_nightly(info("apply_dv_2026-02-30.sql.gz", "unknown"))  # no such day
        assert not is_nightly(info("apply_dv_2026-01-01.sql.gz", "adhoc"))


class TestHolds:
    def test_a_held_backup_is_never_deleted_and_goes_once_released(self, store):
        old = "apply_dv_2026-01-01.sql.gz"
        put(store, old, "nightly", _at(date(2026, 1, 1)))
        put(store, "apply_dv_2026-11-25.sql.gz", "nightly", _at(date(2026, 11, 25)))
        policy = Retention(daily=1, weekly=0, monthly=0)
        with store.hold(old, "inc-20261126-0300-ab12"):
            assert store.held(old)
            report = apply_retention(store, policy, NOW, dry_run=False)
            assert old in names(store)
            assert [(b.name, why) for b, why in report.skipped] == [(old, "held by a running restore")]
            assert report.deleted == []
        assert not store.held(old)
        apply_retention(store, policy, NOW, dry_run=False)
        assert old not in names(store)

    def test_hold_is_released_when_the_block_fails(self, store):
        put(store, "b.sql.gz", "adhoc", NOW)
        with pytest.raises(RuntimeError):
            with store.hold("b.sql.gz", "run1"):
                raise RuntimeError("restore failed")
        assert not store.held("b.sql.gz")
        assert not list(store.root.glob(".b.sql.gz.hold-*"))

    def test_two_holders_and_one_holder_twice(self, store):
        put(store, "b.sql.gz", "adhoc", NOW)
        with store.hold("b.sql.gz", "run1"):
            with store.hold("b.sql.gz", "run2"):
                pass
            assert store.held("b.sql.gz")  # run1 still holds it
            with pytest.raises(BackupError, match="already held by 'run1'"):
                with store.hold("b.sql.gz", "run1"):
                    pass
        assert not store.held("b.sql.gz")

    def test_hold_on_a_missing_backup_fails_and_leaves_no_file(self, store):
        with pytest.raises(BackupNotFound):
            with store.hold("gone.sql.gz", "run1"):
                pass
        assert not list(store.root.glob(".*hold*"))

    def test_bad_holder_name_is_refused(self, store):
        put(store, "b.sql.gz", "adhoc", NOW)
        with pytest.raises(InvalidInput, match="holder"):
            with store.hold("b.sql.gz", "../x"):
                pass

    def test_a_stale_hold_is_ignored_with_a_warning(self, store, caplog):
        put(store, "b.sql.gz", "adhoc", NOW)
        stale = store.root / ".b.sql.gz.hold-crashed"
        stale.write_text("{}")
        past = time.time() - 25 * 3600
        os.utime(stale, (past, past))
        with caplog.at_level(logging.WARNING, logger="dr.retention"):
            assert store.held("b.sql.gz") is False
        assert "stale hold" in caplog.text

    def test_stores_without_holds_refuse_retention(self):
        from dr.platforms.base import BackupStore

        class NoHolds(BackupStore):
            def list_backups(self):
                return [BackupInfo(name="apply_dv_2020-01-01.sql.gz", size=1, complete=True,
                                   created_at=_at(date(2020, 1, 1)), kind="nightly"),
                        BackupInfo(name="apply_dv_2026-11-25.sql.gz", size=1, complete=True,
                                   created_at=_at(date(2026, 11, 25)), kind="nightly")]

            def get_backup(self, name):
                raise NotImplementedError

            def open_writer(self, name):
                raise NotImplementedError

            def open_reader(self, name):
                raise NotImplementedError

            def delete_backup(self, name):
                raise AssertionError("must not delete")

        with pytest.raises(BackupError, match="holds are not implemented for NoHolds"):
            apply_retention(NoHolds(), Retention(daily=1, weekly=0, monthly=0), NOW, dry_run=False)


# --- properties -------------------------------------------------------------------------------

KINDS = ["nightly", "unknown-named", "adhoc", "pre-restore-safety", "ptr", "drill", "unknown-other"]


@st.composite
def backup_lists(draw) -> list[BackupInfo]:
    out: dict[str, BackupInfo] = {}
    for i in range(draw(st.integers(0, 40))):
        age_days = draw(st.integers(0, 400))
        hour = draw(st.integers(0, 23))
        kind = draw(st.sampled_from(KINDS))
        complete = draw(st.booleans())
        when = (NOW - timedelta(days=age_days)).replace(hour=hour, minute=0)
        day = when.date()
        service = draw(st.sampled_from(["apply", "find"]))
        if kind == "nightly":
            name = f"{service}_dv_{day:%Y-%m-%d}" + draw(st.sampled_from([".sql.gz", ".pgdump"]))
            info = BackupInfo(name=name, size=1, complete=complete, created_at=when, finished_at=when,
                              kind="nightly", sha256="0" * 64)
        elif kind == "unknown-named":
            name = f"{service}_dv_{day:%Y-%m-%d}.sql.gz"
            info = BackupInfo(name=name, size=1, complete=True, created_at=when, kind="unknown")
        elif kind == "unknown-other":
            info = BackupInfo(name=f"other-{i}.sql.gz", size=1, complete=True, created_at=when, kind="unknown")
        else:
            info = BackupInfo(name=f"{service}_dv_{kind}_{i}.pgdump", size=1, complete=complete,
                              created_at=when, finished_at=when, kind=kind, sha256="0" * 64)
        out.setdefault(info.name, info)  # names are unique in a store
    return list(out.values())


def _series(b: BackupInfo) -> str:
    return b.name.split("_")[0]


def _ts(b: BackupInfo) -> datetime:
    return b.finished_at or b.created_at


def _day(b: BackupInfo) -> date:
    return date.fromisoformat(b.name.split("_")[2][:10])


def _newest_of_recent_periods(complete: list[BackupInfo], count: int, period) -> set[str]:
    by_period: dict = {}
    for b in complete:
        by_period.setdefault(period(_day(b)), []).append(b)
    return {max(by_period[p], key=lambda b: (_ts(b), b.name)).name for p in sorted(by_period, reverse=True)[:count]}


class TestProperties:
    @settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
    @given(backups=backup_lists(), daily=st.integers(1, 10), weekly=st.integers(0, 6), monthly=st.integers(0, 8))
    def test_invariants(self, backups, daily, weekly, monthly):
        policy = Retention(daily=daily, weekly=weekly, monthly=monthly)
        keep, delete = select_keep(backups, policy, NOW)
        kept = {b.name for b in keep}
        deleted = {b.name for b, _ in delete}
        nightly = {b.name for b in backups if b.kind == "nightly" or
                   (b.kind == "unknown" and not b.name.startswith("other-"))}

        # keep and delete split the nightlies exactly; nothing else is mentioned
        assert kept | deleted == nightly
        assert not kept & deleted
        for b, why in delete:
            assert b.kind in ("nightly", "unknown") and b.complete and why
            # nothing younger than the PTR window, by clock or by name
            assert NOW - _ts(b) >= timedelta(days=7)
            assert (NOW.date() - _day(b)).days >= 7

        for s in {_series(b) for b in backups if b.name in nightly}:
            complete = [b for b in backups if b.name in nightly and _series(b) == s and b.complete]
            if not complete:
                continue
            # the newest complete nightly of each series stays
            newest = max(complete, key=lambda b: (_ts(b), b.name))
            assert newest.name in kept
            # the newest of each of the N most recent days / weeks / months that have one stays ...
            wanted = {newest.name}
            for count, period in ((daily, lambda d: d), (weekly, lambda d: d.isocalendar()[:2]),
                                  (monthly, lambda d: (d.year, d.month))):
                wanted |= _newest_of_recent_periods(complete, count, period)
            assert wanted <= kept
            # ... and an old complete one is kept only when one of those rules asks for it
            old = {b.name for b in complete
                   if NOW - _ts(b) >= timedelta(days=7) and (NOW.date() - _day(b)).days >= 7}
            assert old & kept <= wanted

        # incomplete nightlies are always kept
        assert {b.name for b in backups if b.name in nightly and not b.complete} <= kept
