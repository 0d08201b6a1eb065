"""Retention of nightly backups: a grandfather-father-son policy, and applying it to a store.

`select_keep` is the pure policy: given the nightly backups of a store, it says which
to keep and why the others may go. `apply_retention` lists a `BackupStore`, runs the
policy, leaves alone whatever a running restore holds, and deletes the rest (only
when not a dry run).

What retention never deletes, whatever the policy says:

- any backup that is not a nightly (adhoc, pre-restore-safety, ptr, drill, or a file of
  unknown origin): those are for people and for tidy-up;
- an incomplete backup (its upload never finished): it is reported for a person to look at;
- the newest complete nightly, hence also the only one;
- any nightly younger than `PTR_WINDOW` (Azure's point-in-time-restore window): if the
  server itself is lost, its PTR history goes with it and the nightly is the way back;
- a backup held by a running restore (`BackupStore.hold`; see `dr.platforms.holds`).

The GFS buckets count only periods that have a complete backup, like restic's
``--keep-daily``: "the last 7 days" means the 7 most recent days on which a nightly
completed, so a fortnight of failed nightlies does not make retention eat the good
ones. Days, ISO weeks and months are UTC, like the dates in the nightly names.
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass, field
from datetime import date, datetime, timedelta, timezone
from typing import Callable

from dr.config import ENVIRONMENTS, Retention
from dr.errors import DrError, InvalidInput
from dr.platforms.base import BackupInfo, BackupStore

log = logging.getLogger("dr.retention")

#: A nightly younger than this is never deleted (Azure Database for PostgreSQL's default PTR retention).
PTR_WINDOW = timedelta(days=7)

#: The existing tooling's nightly naming, ``<service>_<env short>_<YYYY-MM-DD>.sql.gz``
#: (this tool's own nightlies may also be ``.pgdump`` or ``.pgdump.zst``).
NIGHTLY_NAME = re.compile(
    r"^(?P<service>[a-z][a-z0-9]{1,19})_(?P<env>[a-z]{2})_(?P<day>\d{4}-\d{2}-\d{2})(?P<ext>\.sql\.gz|\.pgdump|\.pgdump\.zst)$"
)
_ENV_SHORTS = frozenset(ENVIRONMENTS.values())


# --- which backups are nightlies -------------------------------------------------------


@dataclass(frozen=True)
class _Nightly:
    info: BackupInfo
    series: tuple[str, str]  # (service, env short); ("", "") when the name says neither
    day: date
    taken_at: datetime


def _aware(when: datetime) -> datetime:
    return when if when.tzinfo else when.replace(tzinfo=timezone.utc)


def _parse_name(name: str) -> tuple[tuple[str, str], date] | None:
    m = NIGHTLY_NAME.match(name)
    if not m or m["env"] not in _ENV_SHORTS:
        return None
    try:
        day = date.fromisoformat(m["day"])
    except ValueError:
        return None
    return (m["service"], m["env"]), day


def is_nightly(info: BackupInfo) -> bool:
    """Whether retention manages this backup: our nightlies, and the existing tooling's `.sql.gz` ones."""
    if info.kind == "nightly":
        return True
    return info.kind == "unknown" and info.name.endswith(".sql.gz") and _parse_name(info.name) is not None


def _nightly(info: BackupInfo) -> _Nightly:
    taken_at = _aware(info.finished_at or info.created_at)
    parsed = _parse_name(info.name)
    if parsed:
        series, day = parsed
    else:
        series, day = ("", ""), taken_at.astimezone(timezone.utc).date()
    return _Nightly(info, series, day, taken_at)


# --- the policy ---------------------------------------------------------------------------


def _young(n: _Nightly, now: datetime) -> bool:
    # either clock says young: the recorded time, or the date in the name
    return now - n.taken_at < PTR_WINDOW or (now.astimezone(timezone.utc).date() - n.day).days < PTR_WINDOW.days


def _newest_per_period(nightlies: list[_Nightly], period: Callable[[date], tuple[int, ...]],
                       count: int) -> dict[str, tuple[int, ...]]:
    """Names of the newest complete backup in each of the `count` most recent periods that have one."""
    newest: dict[tuple[int, ...], _Nightly] = {}
    for n in nightlies:
        key = period(n.day)
        best = newest.get(key)
        if best is None or (n.taken_at, n.info.name) > (best.taken_at, best.info.name):
            newest[key] = n
    recent = sorted(newest, reverse=True)[:count]
    return {newest[k].info.name: k for k in recent}


def _decide(backups: list[BackupInfo], policy: Retention, now: datetime) -> tuple[
        list[tuple[BackupInfo, str]], list[tuple[BackupInfo, str]]]:
    """The policy, with a reason for every decision: (keep with reason, delete with reason)."""
    if now.tzinfo is None:
        raise InvalidInput("retention needs an aware 'now' (with a time zone), e.g. datetime.now(timezone.utc)")
    series: dict[tuple[str, str], list[_Nightly]] = {}
    for info in backups:
        if is_nightly(info):
            n = _nightly(info)
            series.setdefault(n.series, []).append(n)

    keep: list[tuple[BackupInfo, str]] = []
    delete: list[tuple[BackupInfo, str]] = []
    for nightlies in series.values():
        complete = [n for n in nightlies if n.info.complete]
        newest = max(complete, key=lambda n: (n.taken_at, n.info.name), default=None)
        daily = _newest_per_period(complete, lambda d: (d.year, d.month, d.day), policy.daily)
        weekly = _newest_per_period(complete, lambda d: tuple(d.isocalendar())[:2], policy.weekly)
        monthly = _newest_per_period(complete, lambda d: (d.year, d.month), policy.monthly)
        for n in sorted(nightlies, key=lambda n: (n.taken_at, n.info.name), reverse=True):
            name = n.info.name
            if not n.info.complete:
                keep.append((n.info, "incomplete (its upload never finished): retention never deletes it; check it"))
            elif n is newest:
                only = " (and the only one)" if len(complete) == 1 else ""
                keep.append((n.info, f"the newest complete nightly{only}"))
            elif _young(n, now):
                keep.append((n.info, f"younger than the {PTR_WINDOW.days}-day point-in-time-restore window"))
            elif name in daily or name in weekly or name in monthly:
                why = [f"day {n.day}"] if name in daily else []
                if name in weekly:
                    why.append("ISO week {}-W{:02d}".format(*weekly[name]))
                if name in monthly:
                    why.append("month {}-{:02d}".format(*monthly[name]))
                keep.append((n.info, "the newest of " + ", ".join(why)))
            else:
                delete.append((n.info, (
                    f"older than {PTR_WINDOW.days} days and not the newest complete nightly of any of the last "
                    f"{policy.daily} days, {policy.weekly} weeks or {policy.monthly} months with backups")))
    return keep, delete


def select_keep(backups: list[BackupInfo], policy: Retention, now: datetime) -> tuple[
        list[BackupInfo], list[tuple[BackupInfo, str]]]:
    """Decide which nightly backups the grandfather-father-son policy keeps.

    Only nightlies are considered (`is_nightly`); any other backup in `backups` is left
    out of both lists. Each series (service and environment, read from the name) is
    decided on its own.

    Args:
        backups: the store's backups, in any order; other kinds may be mixed in.
        policy: how many of the most recent days, ISO weeks and months with a complete
            nightly keep their newest one.
        now: the current time, time-zone aware; ages and "recent" count from it.

    Returns:
        (the nightlies to keep, the nightlies that may be deleted with the reason why),
        newest first; together they are exactly the nightlies in `backups`.

    Raises:
        InvalidInput: `now` has no time zone.
    """
    keep, delete = _decide(backups, policy, now)
    return [b for b, _ in keep], delete


# --- applying the policy to a store -------------------------------------------------------


@dataclass
class RetentionReport:
    """What retention kept, deleted (or would delete, in a dry run), left alone and failed to delete."""

    dry_run: bool
    kept: list[tuple[BackupInfo, str]] = field(default_factory=list)
    deleted: list[tuple[BackupInfo, str]] = field(default_factory=list)
    skipped: list[tuple[BackupInfo, str]] = field(default_factory=list)
    failed: list[tuple[BackupInfo, str]] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.failed

    def summary(self) -> str:
        verb = "would delete" if self.dry_run else "deleted"
        text = f"kept {len(self.kept)}, {verb} {len(self.deleted)}, left alone {len(self.skipped)}"
        return text + (f", FAILED to delete {len(self.failed)}" if self.failed else "")


def apply_retention(store: BackupStore, policy: Retention, now: datetime, *, dry_run: bool = True) -> RetentionReport:
    """Apply the retention policy to a store: delete the nightlies it does not keep.

    Args:
        store: the backup store of one service environment.
        policy: the retention policy (`Target.retention`).
        now: the current time, time-zone aware.
        dry_run: only report what would be deleted; nothing is deleted unless this is False.

    Returns:
        The report; `failed` lists deletions the store refused (the rest still went ahead).

    Raises:
        InvalidInput: `now` has no time zone.
        BackupError: the store has no holds yet, so it cannot be known what a restore is reading.
    """
    backups = store.list_backups()
    keep, delete = _decide(backups, policy, now)
    report = RetentionReport(dry_run=dry_run)
    for info, why in keep:
        (report.skipped if not info.complete else report.kept).append((info, why))
    decided = {b.name for b, _ in keep} | {b.name for b, _ in delete}
    for info in backups:
        if info.name not in decided:
            report.skipped.append((info, f"kind '{info.kind}' is not a nightly: retention never deletes it"))

    for info, why in delete:
        if store.held(info.name):
            report.skipped.append((info, "held by a running restore"))
            log.info("retention: keeping %s: held by a running restore", info.name)
            continue
        if not dry_run:
            try:
                store.delete_backup(info.name)
            except (DrError, OSError) as exc:
                report.failed.append((info, f"{type(exc).__name__}: {exc}"))
                log.warning("retention: could not delete %s: %s", info.name, exc)
                continue
        report.deleted.append((info, why))
        log.info("retention: %s %s: %s", "would delete" if dry_run else "deleted", info.name, why)
    log.info("retention on %r: %s", store, report.summary())
    return report


__all__ = ["PTR_WINDOW", "RetentionReport", "apply_retention", "is_nightly", "select_keep"]
