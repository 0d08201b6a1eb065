"""Tasks that find and remove what the tool left behind: PTR servers, replaced and half-restored databases."""

from __future__ import annotations

import re
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone

from dr import database as db
from dr.platforms.base import TAG_INCIDENT, TAG_SOURCE
from dr.runtime import Ref
from tasks.common import dr_task


@dataclass(frozen=True)
class Leftover:
    kind: str  # "ptr-server", "replaced-database", "restore-database", "hold"
    name: str
    created_at: datetime
    deletable: bool
    reason: str


def _stamp(name: str) -> datetime | None:
    m = re.search(r"_(\d{14})(?:_\d+)?$", name)  # `_2`, `_3`...: a second one within the same second
    return datetime.strptime(m.group(1), "%Y%m%d%H%M%S").replace(tzinfo=timezone.utc) if m else None


@dr_task
def find_leftovers(ref: Ref, older_than_hours: float = 0.0, incident: str | None = None) -> list[Leftover]:
    """What this tool created for the environment and may delete, with the reason for each."""
    rt = ref.rt()
    cutoff = datetime.now(timezone.utc) - timedelta(hours=older_than_hours)
    out: list[Leftover] = []
    for srv in rt.servers.list_servers():
        if not srv.created_by_us or srv.tags.get(TAG_SOURCE) != rt.target.server:
            continue
        if incident and srv.tags.get(TAG_INCIDENT) != incident:
            continue
        old = srv.created_at <= cutoff
        out.append(Leftover("ptr-server", srv.name, srv.created_at, old,
                            "created by dr for a point-in-time restore" if old else f"younger than {older_than_hours} h"))
    if rt.servers.server_exists(rt.target.server) and rt.servers.get_server(rt.target.server).state == "Ready":
        admin = rt.servers.connection(rt.target.server, "postgres")
        live = rt.target.database
        safety = [b for b in rt.store.list_backups() if b.complete and b.kind == "pre-restore-safety"
                  and b.database == live]
        for name in db.list_databases(admin):
            stamp = _stamp(name)
            comment = db.database_comment(admin, name) or ""
            if stamp is None:
                continue
            if name.startswith(live[:40]) and "_replaced_" in name and comment.startswith(db.REPLACED_COMMENT):
                covered = any(b.finished_at and stamp - timedelta(days=1) <= b.finished_at <= stamp + timedelta(minutes=1)
                              for b in safety)
                ok = stamp <= cutoff and covered
                reason = ("replaced by a restore; a safety backup of it is in the store" if ok else
                          f"younger than {older_than_hours} h" if stamp > cutoff else
                          "no safety backup of it in the store: back it up first "
                          f"(dr backup --database {name} --kind pre-restore-safety)")
                out.append(Leftover("replaced-database", name, stamp, ok, reason))
            elif name.startswith(live[:40]) and "_restore_" in name and comment.startswith("dr: restoring "):
                ok = stamp <= cutoff
                out.append(Leftover("restore-database", name, stamp, ok,
                                    "half-finished restore (never swapped in)" if ok else f"younger than {older_than_hours} h"))
    from dr.retention import dead_holds

    for marker in dead_holds(rt.store):  # a restore killed with -9 never released its hold on the backup
        out.append(Leftover("hold", marker, datetime.fromtimestamp((rt.store.root / marker).stat().st_mtime, timezone.utc),
                            True, "hold of a restore process that no longer runs"))
    return out


@dr_task
def delete_leftover(ref: Ref, item: Leftover) -> None:
    """Delete one leftover found by `find_leftovers`."""
    rt = ref.rt()
    if item.kind == "ptr-server":
        rt.servers.delete_server(item.name)
    elif item.kind == "hold":
        from dr.retention import release_dead_hold

        release_dead_hold(rt.store, item.name)
    else:
        db.drop_database(rt.servers.connection(rt.target.server, "postgres"), item.name)
