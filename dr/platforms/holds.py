"""Holds: a running restore's claim on a backup, so that retention leaves it alone.

Every store that supports holds (`BackupStore.supports_holds`) keeps them the same way:
one small marker per holder and backup, named `.<backup>.hold-<holder>`, holding who took
it, from which host and process, and since when; created only if absent (never over
another's hold), removed when the `with` block of `BackupStore.hold` ends however it ends.
A marker older than `HOLD_STALE_AFTER` was left by a crashed restore: `held` ignores it
with a warning, and the same holder may take it over. Markers need no lease bookkeeping
and allow several readers of one backup.

The stores carry the implementations (`LocalBackupStore`: files beside the backups;
`AzureBackupStore`: blobs in the container); this module holds what they share.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import socket
from datetime import datetime, timedelta, timezone
from typing import TYPE_CHECKING, Callable, Iterator

from dr.errors import BackupError, InvalidInput

if TYPE_CHECKING:
    from dr.platforms.base import BackupStore

log = logging.getLogger("dr.retention")

#: A hold older than this is taken to be left behind by a crashed restore and is ignored.
HOLD_STALE_AFTER = timedelta(hours=24)

HOLDER_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_-]{0,63}$")


def check_holder(holder: str) -> str:
    """The holder's name, refused unless it is 1-64 letters, digits, '_' and '-'."""
    if not isinstance(holder, str) or not HOLDER_NAME.match(holder):
        raise InvalidInput(f"invalid hold holder {holder!r}: use 1-64 letters, digits, '_' and '-' "
                           "(an incident id or a flow run id)")
    return holder


def marker_name(backup: str, holder: str = "") -> str:
    """The marker of `holder`'s hold on `backup` (with no holder: the prefix of every hold on it)."""
    from dr.platforms.local.store import check_backup_name

    return f".{check_backup_name(backup)}.hold-{check_holder(holder) if holder else ''}"


def marker_body(holder: str) -> str:
    """What a marker holds: who, where and since when (JSON)."""
    return json.dumps({"holder": holder, "host": socket.gethostname(), "pid": os.getpid(),
                       "since": datetime.now(timezone.utc).isoformat()})


def is_stale(age: timedelta) -> bool:
    """Whether a hold of this age was left behind by a crashed restore."""
    return age > HOLD_STALE_AFTER


def already_held(backup: str, holder: str, marker: str) -> BackupError:
    """The refusal of a second hold by the same holder."""
    return BackupError(f"backup '{backup}' is already held by '{holder}'; use a holder name of its own "
                       f"(or remove {marker} if no restore is running)", backup=backup)


def not_supported(store: object, backup: str) -> BackupError:
    """The refusal of a store that keeps no holds (retention will not delete from it)."""
    return BackupError(f"holds are not implemented for {type(store).__name__}; retention will not run on it",
                       backup=backup)


@contextlib.contextmanager
def holding(store: "BackupStore", backup: str, holder: str, *, create: Callable[[], None],
            remove: Callable[[], None]) -> Iterator[None]:
    """The life of one hold, given how a store creates and removes its marker.

    Args:
        store: the store (the backup is looked up there once the marker exists).
        backup: the backup held.
        holder: who holds it.
        create: makes the marker only if absent (replacing a stale one), raising
            `already_held` when a live one is there.
        remove: removes the marker (succeeds when it is already gone).
    """
    create()
    try:
        store.get_backup(backup)  # checked once the hold exists: from here on retention leaves it alone
    except BaseException:
        remove()
        raise
    log.info("hold on backup %s taken by %s", backup, holder)
    try:
        yield
    finally:
        remove()
        log.info("hold on backup %s released by %s", backup, holder)


def holder_gone(record: dict) -> bool:
    """Whether the restore that wrote a hold's record (`marker_body`) provably ended: taken on this host by a
    process that no longer runs, or whose pid now belongs to a process started after the hold. A hold taken
    elsewhere cannot be proved dead (False)."""
    try:
        since = datetime.fromisoformat(record["since"])
        pid = int(record["pid"])
    except (ValueError, KeyError, TypeError):
        return False
    if record.get("host") != socket.gethostname():
        return False
    return not running_since(pid, since)


def running_since(pid: int, since: datetime) -> bool:
    """Whether process `pid` runs on this host and started no later than `since` (so it may be the one that
    wrote something at `since`; a pid reused by a later process is not)."""
    from pathlib import Path

    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
        boot = next(int(ln.split()[1]) for ln in Path("/proc/stat").read_text().splitlines() if ln.startswith("btime "))
    except (OSError, StopIteration, ValueError):
        return False  # no such process
    started = boot + int(stat[stat.rindex(")") + 2:].split()[19]) / os.sysconf("SC_CLK_TCK")
    return started <= since.timestamp() + 1
