"""Tasks on the backup store: take a backup, find one, list them."""

from __future__ import annotations

from datetime import datetime, timezone

from dr.backup import DEFAULT_FORMAT, BackupResult, backup_name, take_backup
from dr.platforms.base import BackupInfo
from dr.restore import latest_complete_backup
from dr.runtime import Ref
from tasks.common import dr_task, progress_artifact_hook


@dr_task
def backup_database_task(ref: Ref, *, kind: str, fmt: str = DEFAULT_FORMAT, server: str | None = None,
                         database: str | None = None, name: str | None = None, label: str | None = None) -> BackupResult:
    """Stream a pg_dump of the database into the store."""
    rt = ref.rt()
    server = server or rt.target.server
    database = database or rt.target.database
    name = name or backup_name(rt.target.service, rt.target.env_short, kind, fmt, datetime.now(timezone.utc), label)
    return take_backup(rt.servers, rt.store, rt.tools, server=server, database=database, name=name, kind=kind, fmt=fmt,
                       extra={"service": rt.target.service, "environment": rt.target.environment, **({"label": label} if label else {})},
                       progress_hooks=[progress_artifact_hook(f"backup {name}")])


@dr_task(retries=2)
def find_backup(ref: Ref, name: str | None = None, kinds: tuple[str, ...] | None = None,
                label: str | None = None) -> BackupInfo:
    """The named backup, or the newest complete one (optionally of some kinds / with a label)."""
    rt = ref.rt()
    if name:
        return rt.store.get_backup(name)
    if label:
        for info in rt.store.list_backups():
            if info.complete and info.extra.get("label") == label and (not kinds or info.kind in kinds):
                return info
        from dr.errors import BackupNotFound

        raise BackupNotFound(f"no complete backup labelled {label!r}" + (f" of kind {', '.join(kinds)}" if kinds else ""))
    return latest_complete_backup(rt.store, kinds=kinds)


@dr_task(retries=2)
def list_backups_task(ref: Ref) -> list[BackupInfo]:
    """Every backup in the store, newest first."""
    return ref.rt().store.list_backups()


@dr_task(retries=2)
def backup_exists(ref: Ref, name: str) -> bool:
    """Whether the store holds a backup with this name."""
    return ref.rt().store.backup_exists(name)


@dr_task(retries=2)
def find_incident_backup(ref: Ref, kind: str, incident: str) -> BackupInfo | None:
    """The incident's complete backup of this kind, or None (used to resume without redoing it)."""
    for info in ref.rt().store.list_backups():
        if info.complete and info.kind == kind and info.extra.get("label") == incident:
            return info
    return None
