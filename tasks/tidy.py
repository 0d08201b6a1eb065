"""Tasks that find and remove what the tool left behind: PTR servers, replaced and half-restored databases."""

from __future__ import annotations

import re
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from pathlib import Path

from dr import database as db
from dr.platforms.base import TAG_INCIDENT, TAG_SOURCE
from dr.restore import COMMENT_PREFIX as RESTORED
from dr.runtime import Ref
from tasks.common import dr_task


@dataclass(frozen=True)
class Leftover:
    kind: str  # "ptr-server", "replaced-database", "restore-database", "hold", "staging-file", "spool-directory",
    #            "passfile-directory"
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
            elif name.startswith(live[:40]) and "_restore_" in name and comment.startswith(
                    ("dr: restoring ", RESTORED)):  # restored and verified, but killed before its swap: a copy of a backup
                ok = stamp <= cutoff
                out.append(Leftover("restore-database", name, stamp, ok,
                                    "half-finished restore (never swapped in)" if ok else f"younger than {older_than_hours} h"))
    from dr.retention import dead_holds

    for marker in dead_holds(rt.store):  # a restore killed with -9 never released its hold on the backup
        out.append(Leftover("hold", marker, datetime.fromtimestamp((rt.store.root / marker).stat().st_mtime, timezone.utc),
                            True, "hold of a restore process that no longer runs"))
    out += [Leftover(kind, str(path), when, True, why) for kind, path, when, why in _left_by_dead_processes(rt)]
    return out


#: what a process killed with -9 leaves, named with its pid: the store's staging files, a restore's
#: spool directory, a PostgreSQL tool's passfile directory (it holds the password)
_OWNED_BY_PID = (
    ("staging-file", re.compile(r"^\..+\.(\d+)-[0-9a-f]{32}\.(?:partial|tmp)$"),
     "staging file of a backup whose process no longer runs (never listed as a backup)"),
    ("spool-directory", re.compile(r"^dr-spool-(\d+)-"), "work directory of a restore whose process no longer runs"),
    ("passfile-directory", re.compile(r"^dr-pass-(\d+)-"),
     "passfile of a PostgreSQL tool whose process no longer runs (it holds the password)"),
)


def _left_by_dead_processes(rt) -> list[tuple[str, Path, datetime, str]]:
    """(kind, path, modified, reason) of each such thing on this machine whose process no longer runs."""
    import tempfile

    from dr.retention import running_since

    places = {"passfile-directory": [Path(tempfile.gettempdir())]}
    if rt.target.platform == "local":
        places["staging-file"] = [rt.store.root] if hasattr(rt.store, "root") else []
        places["spool-directory"] = [rt.config.local.state_dir.absolute()]
    out = []
    for kind, pattern, why in _OWNED_BY_PID:
        for place in places.get(kind, []):
            for path in place.glob("dr-*" if kind != "staging-file" else ".*"):
                m = pattern.match(path.name)
                try:
                    when = datetime.fromtimestamp(path.lstat().st_mtime, timezone.utc)
                except FileNotFoundError:
                    continue
                if m and not running_since(int(m.group(1)), when):
                    out.append((kind, path, when, why))
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
    elif item.kind in ("staging-file", "spool-directory", "passfile-directory"):
        import shutil

        path = Path(item.name)
        if any(str(p) == item.name for _, p, _, _ in _left_by_dead_processes(rt)):  # still its process's, still dead
            shutil.rmtree(path, ignore_errors=True) if path.is_dir() else path.unlink(missing_ok=True)
    else:
        db.drop_database(rt.servers.connection(rt.target.server, "postgres"), item.name)
