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
    #: replaced databases: the backup that holds it exactly
    backup: str | None = None


def _stamp(name: str) -> datetime | None:
    m = re.search(r"_(\d{14})(?:_\d+)?$", name)  # `_2`, `_3`...: a second one within the same second
    return datetime.strptime(m.group(1), "%Y%m%d%H%M%S").replace(tzinfo=timezone.utc) if m else None


def _holding_backup(rt, admin, name: str, comment: str) -> tuple[str | None, str]:
    """The backup that holds database `name` exactly (same database, no write since), or None and why none does.

    The backup the swap named in the database's comment is tried first, then any other backup of
    the store taken of this same database (e.g. one taken by hand after tidy-up asked for it).
    """
    server = rt.target.server
    db.allow_connections(admin, name)  # a tidy-up killed while checking it left it refusing them
    with db.connect(admin.with_db(name)) as c:
        identity, fingerprint = db.database_identity(c), db.write_fingerprint(c)
    named = re.search(r"held by backup (\S+) sha256=", comment) or re.search(r"not held by backup (\S+):", comment)
    candidates = [b for b in rt.store.list_backups()
                  if (b.manifest or {}).get("identity", {}).get("database_oid") == identity["database_oid"]
                  and b.source_server == server]
    candidates.sort(key=lambda b: not (named and b.name == named.group(1)))  # the named one first
    why = "no backup in the store was taken of this database"
    for b in candidates:
        reason = db.held_by(b, server, identity, fingerprint)
        if reason is None:
            return b.name, f"held by backup {b.name} (this very database, no write since it was taken)"
        why = reason
    return None, why


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
        for name in db.list_databases(admin):
            stamp = _stamp(name)
            comment = db.database_comment(admin, name) or ""
            if stamp is None:
                continue
            if name.startswith(live[:40]) and "_replaced_" in name and comment.startswith(db.REPLACED_COMMENT):
                if stamp > cutoff:
                    out.append(Leftover("replaced-database", name, stamp, False, f"younger than {older_than_hours} h"))
                    continue
                backup, why = _holding_backup(rt, admin, name, comment)
                out.append(Leftover(
                    "replaced-database", name, stamp, backup is not None,
                    why if backup else (f"kept: {why}; back it up first (dr backup --database {name} "
                                        "--kind pre-restore-safety), then tidy up again"),
                    backup=backup))
            elif name.startswith(live[:40]) and "_restore_" in name and comment.startswith(
                    ("dr: restoring ", RESTORED)):  # restored and verified, but killed before its swap: a copy of a backup
                ok = stamp <= cutoff
                out.append(Leftover("restore-database", name, stamp, ok,
                                    "half-finished restore (never swapped in)" if ok else f"younger than {older_than_hours} h"))
    for marker in rt.store.dead_holds():  # a restore killed with -9 never released its hold on the backup
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


def _places(rt) -> dict[str, list[Path]]:
    """Where each kind of `_OWNED_BY_PID` is looked for."""
    import tempfile

    places = {"passfile-directory": [Path(tempfile.gettempdir())]}
    if rt.target.platform == "local":
        places["staging-file"] = [rt.store.root] if hasattr(rt.store, "root") else []
        places["spool-directory"] = [rt.config.local.state_dir.absolute()]
    return places


def _left_by_dead_process(kind: str, path: Path) -> datetime | None:
    """When `path` was last modified, if it is a `kind` of `_OWNED_BY_PID` whose process no longer runs."""
    from dr.platforms.holds import running_since

    pattern = next(p for k, p, _ in _OWNED_BY_PID if k == kind)
    m = pattern.match(path.name)
    if m is None:
        return None
    try:
        when = datetime.fromtimestamp(path.lstat().st_mtime, timezone.utc)
    except FileNotFoundError:
        return None
    return None if running_since(int(m.group(1)), when) else when


def _left_by_dead_processes(rt) -> list[tuple[str, Path, datetime, str]]:
    """(kind, path, modified, reason) of each such thing on this machine whose process no longer runs."""
    places = _places(rt)
    out = []
    for kind, _, why in _OWNED_BY_PID:
        for place in places.get(kind, []):
            for path in place.glob("dr-*" if kind != "staging-file" else ".*"):
                if (when := _left_by_dead_process(kind, path)) is not None:
                    out.append((kind, path, when, why))
    return out


@dr_task
def delete_leftover(ref: Ref, item: Leftover) -> str | None:
    """Delete one leftover found by `find_leftovers`; returns None, or why it was kept after all.

    A replaced database is dropped only after its backup's bytes verify against the checksum
    recorded when it was taken, and only if, with every session of it ended, it is still exactly
    what that backup holds.
    """
    from dr.backup import CHUNK
    from dr.errors import BackupCorrupted, BackupNotFound

    rt = ref.rt()
    if item.kind == "ptr-server":
        rt.servers.delete_server(item.name)
        return None
    if item.kind == "hold":
        rt.store.release_dead_hold(item.name)
        return None
    if item.kind in ("staging-file", "spool-directory", "passfile-directory"):
        import shutil

        path = Path(item.name)
        if path.parent in _places(rt).get(item.kind, []) and _left_by_dead_process(item.kind, path) is not None:
            # still where such things are, still its process's, and that process still gone
            shutil.rmtree(path, ignore_errors=True) if path.is_dir() else path.unlink(missing_ok=True)
            return None
        return "kept: its process runs again (or it is gone already)"
    admin = rt.servers.connection(rt.target.server, "postgres")
    if item.kind != "replaced-database":
        db.drop_database(admin, item.name)
        return None
    try:
        info = rt.store.get_backup(item.backup)
        with rt.store.reader(item.backup) as r:
            while r.read(CHUNK):
                pass
            r.verify()
    except (BackupCorrupted, BackupNotFound) as exc:
        return f"kept: backup {item.backup} does not verify ({exc.message})"
    why = db.drop_if_held(admin, item.name, lambda identity, fingerprint: db.held_by(
        info, rt.target.server, identity, fingerprint))
    return None if why is None else f"kept: {why}"
